"""Evaluate a trained run on its test split and write the run's result files.

    python evaluate.py --ckpt checkpoints/<run>/best.ckpt [--output_dir logs/<run>]

The checkpoint carries the run's config, so the same prompts, backbone and activation cache are used
(the cache is reused when complete, otherwise extracted first).
"""

import argparse
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from callbacks.cache_writer import extract_activations
from callbacks.probe_report import probe_report, write_probe_report
from cli import LOG_ROOT, datamodule_from_run_config, run_main
from interp.errors import UserError
from lightning_modules.probes import LayerProbeModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.ckpt or last.ckpt)")
    parser.add_argument("--output_dir", default=None, help="where result files go (default: logs/<run_name>)")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} does not exist")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "run_config" not in checkpoint:
        raise UserError(f"checkpoint {ckpt} was not written by train.py (no run_config)")
    config = yaml.safe_load(checkpoint["run_config"])
    output_dir = Path(args.output_dir) if args.output_dir else LOG_ROOT / config["run_name"]
    datamodule = datamodule_from_run_config(checkpoint["run_config"])
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        callbacks=[RichProgressBar(leave=True)])  # fmt: skip
    extract_activations(trainer, datamodule)
    model = LayerProbeModule.load_from_checkpoint(ckpt, map_location="cpu")
    paths = write_probe_report(probe_report(trainer, model, datamodule, str(ckpt)), output_dir)
    print(f"Wrote {paths['json']} and {paths['figure']}")


if __name__ == "__main__":
    run_main(main)
