"""Evaluate a trained run on its test split and write the run's result files.

    python evaluate.py --ckpt checkpoints/<run>/best.ckpt [--output_dir logs/<run>]

The checkpoint carries the run's config, so the same prompts, backbone and activation cache are used
(the cache is reused when complete, otherwise extracted first).
- probe runs: probe_accuracies.json + visualizations/probe_accuracy.png (callbacks/probe_report.py)
- directions runs (ReasoningDirectionModule): the selected direction ablated / added / vs random directions,
  answer accuracy, gold-solution NLL, control KL, degeneration: intervention_results.json +
  visualizations/interventions.png (callbacks/intervention_report.py). Options below marked [directions].
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
from interp.generation import DEFAULT_MAX_NEW_TOKENS
from lightning_modules.probes import LayerProbeModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.ckpt or last.ckpt)")
    parser.add_argument("--output_dir", default=None, help="where result files go (default: logs/<run_name>)")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="[directions] tokens generated per prompt (a generation with no final answer by then "
                        "counts as truncated and incorrect; see truncation_rate)")  # fmt: skip
    parser.add_argument("--greedy", action="store_true", help="[directions] greedy decoding (default: sampling, "
                        "temperature 0.6, top_p 0.95)")  # fmt: skip
    parser.add_argument("--n_prompts", type=int, default=None, help="[directions] test problems (default: all)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[-1.0, 1.0, 2.0, 4.0],
                        help="[directions] multipliers of the added direction")  # fmt: skip
    parser.add_argument("--n_random", type=int, default=1, help="[directions] null directions: the run's saved ones "
                        "(its null, e.g. placebo), isotropic of the same norm if it saved none")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="[directions] sampling, problem sample, random directions")
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
    if config["model"]["class_path"].endswith(".ReasoningDirectionModule"):
        return evaluate_directions(args, ckpt, datamodule, output_dir)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        callbacks=[RichProgressBar(leave=True)])  # fmt: skip
    extract_activations(trainer, datamodule)
    model = LayerProbeModule.load_from_checkpoint(ckpt, map_location="cpu")
    paths = write_probe_report(probe_report(trainer, model, datamodule, str(ckpt)), output_dir)
    print(f"Wrote {paths['json']} and {paths['figure']}")


def evaluate_directions(args: argparse.Namespace, ckpt: Path, datamodule, output_dir: Path) -> None:
    """The intervention report of a directions run's selected direction on its test problems."""
    from callbacks.intervention_report import directions_report, write_intervention_report
    from lightning_modules.directions import ReasoningDirectionModule

    module = ReasoningDirectionModule.load_from_checkpoint(ckpt, map_location="cpu")
    module.to("cuda" if torch.cuda.is_available() else "cpu")  # the backbone follows the module's device
    report = directions_report(
        module, datamodule, split="test", n_prompts=args.n_prompts, strengths=args.strengths, n_random=args.n_random,
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, seed=args.seed,
    )  # fmt: skip
    paths = write_intervention_report({"checkpoint": str(ckpt), **report}, output_dir)
    print(f"Wrote {paths['json']} and {paths['figure']}")


if __name__ == "__main__":
    run_main(main)
