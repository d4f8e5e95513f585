"""Run extraction with N CPU processes (strategy="ddp" re-executes this script per rank): used by test_cache."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
from pipeline_utils import build_datamodule  # noqa: E402

from lightning_modules.cache_writer import extract_activations  # noqa: E402

if __name__ == "__main__":
    cache_dir, devices = sys.argv[1], int(sys.argv[2])
    datamodule = build_datamodule(cache_dir)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    extract_activations(trainer, datamodule)
