"""TensorBoard's custom-scalars layout (callbacks/tensorboard_layout.py): one chart per per-layer metric, layers as
its series, referencing only tags that exist; the headline metric in the HParams tab."""

import re

import torch
from pipeline_utils import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import train
from callbacks.tensorboard_layout import layout_for


def test_layout_groups_layers_and_sweeps():
    tags = ["val/acc/L00", "val/acc/L31", "val/kl/L02", "sweep/gold_nll@-1.0", "sweep/gold_nll@2.0", "train/loss"]
    assert layout_for(tags) == {
        "val": {"val/acc by layer": ["Multiline", [r"^val/acc/L\d+$"]], "val/kl by layer": ["Multiline", [r"^val/kl/L\d+$"]]},
        "sweep": {"sweep/gold_nll by value": ["Multiline", [r"^sweep/gold_nll@.+$"]]},
    }  # fmt: skip


def test_a_probe_run_opens_on_the_per_layer_charts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--config", str(tiny_config("quickstart.yaml", tmp_path, limit=6)), "--run_name", "run",
                "--trainer.max_epochs", "2"])  # fmt: skip
    events = EventAccumulator(str(tmp_path / "logs" / "run"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    regexes = [tag for category in layout.category for chart in category.chart for tag in chart.multiline.tag]
    assert sorted(regexes) == sorted(rf"^val/{name}/L\d+$" for name in
                                     ("acc", "balanced_acc", "auroc", "control_acc", "selectivity"))  # fmt: skip
    assert all(any(re.match(regex, tag) for tag in scalars) for regex in regexes)  # no chart of a missing tag
    per_layer = {tag for tag in scalars if re.search(r"/L\d+$", tag)}
    assert per_layer and all(any(re.match(regex, tag) for regex in regexes) for tag in per_layer)

    best = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["callbacks"]
    (score,) = [state["best_model_score"] for key, state in best.items() if "'monitor': None" not in key]
    assert events.Scalars("hp/best")[-1].value == float(score)
    assert events.PluginTagToContent("hparams")  # the session that the HPARAMS tab lists
