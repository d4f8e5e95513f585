"""End to end: one flag switches the backbone; train -> resume -> evaluate. Configs: test_configs.py."""

import json

import numpy as np
import pytest
import torch
from pipeline_utils import tiny_config
from sklearn.metrics import accuracy_score, roc_auc_score

import evaluate
import train


def test_one_flag_switches_the_backbone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config("quickstart.yaml", tmp_path, limit=3)
    train.main(["--config", str(config), "--backbone", "tiny-r1-distill", "--trainer.fast_dev_run", "true"])
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    spec = json.loads(manifest.read_text())["spec"]
    assert spec["backbone"]["name_or_path"] == "tiny-r1-distill"
    assert spec["data"]["tokenizer"]["backbone"] == "tiny-r1-distill"


@pytest.mark.slow
def test_train_resume_evaluate(tmp_path, monkeypatch, shared_cache_dir):
    monkeypatch.chdir(tmp_path)
    config = tiny_config("quickstart.yaml", tmp_path, limit=30, cache_dir=str(shared_cache_dir))
    train.main(["--config", str(config), "--run_name", "run", "--trainer.max_epochs", "2"])
    ckpt_dir = tmp_path / "checkpoints" / "run"
    assert (ckpt_dir / "last.ckpt").is_file() and (ckpt_dir / "best.ckpt").is_file()
    first = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["epoch"] == 1
    # Only what was trained: two probes (weights, biases, standardization buffers) and metric states.
    assert all(key.startswith(("probe.", "control_probe.", "metrics.")) for key in first["state_dict"])
    assert not any("embed" in key or "layers." in key for key in first["state_dict"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "run"))
    events.Reload()
    assert "val/accuracy_vs_layer" in events.Tags()["images"]
    assert {"val/acc/L00", "val/auroc/L31", "val/selectivity/L05", "val/acc_max_over_layers"} <= set(events.Tags()["scalars"])

    train.main(["--config", str(config), "--run_name", "run", "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    resumed = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 3 and resumed["global_step"] == 2 * first["global_step"]

    evaluate.main(["--ckpt", str(ckpt_dir / "last.ckpt")])
    report = json.loads((tmp_path / "logs" / "run" / "probe_accuracies.json").read_text())
    assert (tmp_path / "logs" / "run" / "visualizations" / "probe_accuracy.png").is_file()
    assert len(report["layers"]) == 32 and report["label"] == "reasoning"

    # The reported test numbers equal an independent computation from the checkpoint's probe.
    from cli import datamodule_from_run_config
    from lightning_modules.probes import LayerProbeModule

    module = LayerProbeModule.load_from_checkpoint(ckpt_dir / "last.ckpt", map_location="cpu")
    dm = datamodule_from_run_config(resumed["run_config"])
    dm.setup()
    batches = list(dm.test_dataloader())
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches]).numpy()
    with torch.no_grad():
        probs = module.probe(x).softmax(-1).numpy()  # [n, L, C]
    for slot, row in enumerate(report["layers"]):
        assert row["accuracy"] == pytest.approx(accuracy_score(y, probs[:, slot].argmax(-1)), abs=1e-6)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, probs[:, slot, 1]), abs=1e-5)
        assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"], abs=1e-6)
    assert report["n_test"] == len(y)
    assert np.isfinite([r["sklearn_accuracy"] for r in report["layers"]]).all()
