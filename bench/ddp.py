"""DDP extraction benchmark (part of `make bench`, bench/suite.py): the activation cache written by train.py's
extraction path (`extract_activations`: Trainer.predict + ActivationCacheWriter) with Lightning DDP on 2 CPU
processes vs 1, each run a fresh subprocess timed from start to exit (so process start-up and model loading count,
as they do for a user). Rows: the time ratio (1 process / 2 processes), and whether both caches hold the same rows,
labels and activations (max abs difference; float32 batching differs, so ~1e-6, not 0).

    python bench/ddp.py CHILD DEVICES MODEL CACHE_DIR N_PROBLEMS      (what the suite runs in each subprocess)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def child(devices: int, model: str, cache_dir: str, n_problems: int) -> None:
    import lightning as L

    from datamodules.activations import CachedActivationDataModule
    from datamodules.problems import DatasetSource
    from datamodules.prompts import ReasoningPromptsDataModule
    from interp.backbone import BackboneSpec
    from lightning_modules.cache_writer import extract_activations

    prompts = ReasoningPromptsDataModule(sources=[DatasetSource("gsm8k", limit=n_problems)], batch_size=8)
    datamodule = CachedActivationDataModule(prompts=prompts, backbone=BackboneSpec(model), cache_dir=cache_dir)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    extract_activations(trainer, datamodule)


def _contents(cache_dir: Path):
    import torch

    from interp.cache import ActivationCache

    (directory,) = [d for d in cache_dir.iterdir() if d.is_dir()]
    shards = list(ActivationCache(directory).iter_shards())
    rows = torch.cat([s["row_index"] for s in shards])
    order = rows.argsort()
    return {name: torch.cat([s[name] for s in shards])[order] for name in shards[0]}


def ddp_rows(smoke: bool = False) -> list[dict]:
    from suite import row

    from interp.backbone import load_tokenizer

    n_problems = 8 if smoke else 200
    with tempfile.TemporaryDirectory() as tmp:
        model = "tiny"
        if not smoke:  # the bench model, saved like a real checkpoint
            from extraction import bench_model

            model = str(Path(tmp) / "bench-model")
            bench_model().save_pretrained(model)
            load_tokenizer("tiny").save_pretrained(model)
        seconds = {}
        for devices in (1, 2):
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "child", str(devices), model, str(Path(tmp) / f"cache{devices}"),
                            str(n_problems)], check=True, capture_output=True, text=True)  # fmt: skip
            seconds[devices] = time.perf_counter() - start
        one, two = _contents(Path(tmp) / "cache1"), _contents(Path(tmp) / "cache2")
    same_rows = one.keys() == two.keys() and all(bool((one[k] == two[k]).all()) for k in one if k != "activations")
    diff = float((one["activations"] - two["activations"]).abs().max())
    case = f"{2 * n_problems} prompts, {'tiny' if smoke else 'bench model'}"
    return [row("ddp", case, "extraction, DDP on 2 CPU processes", "1 process", seconds[1] / seconds[2], None, None,
                f"{seconds[1]:.1f} s vs {seconds[2]:.1f} s"),
            row("ddp", "same cache (max abs activation difference)", "2 processes", "1 process", diff, "<= 1e-4",
                same_rows and diff <= 1e-4)]  # fmt: skip


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
