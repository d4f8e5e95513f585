"""Evaluate a trained run on its test split and write the run's result files.

    python evaluate.py --ckpt checkpoints/<run>/best.ckpt [--output_dir logs/<run>]

The checkpoint carries the run's config, so the same prompts, backbone and activation cache are used
(the cache is reused when complete, otherwise extracted first). The run's model class (its config's
model.class_path) builds and writes its own report through the study-module protocol
(lightning_modules/protocol.py); what each writes:
- probe runs: probe_accuracies.json + visualizations/probe_accuracy.png (lightning_modules/probe_report.py)
- directions runs: the selected direction ablated / added / vs random directions, answer accuracy,
  gold-solution NLL, control KL, degeneration: intervention_results.json + visualizations/interventions.png
  (lightning_modules/direction_report.py, interp/intervention_eval.py). Options below marked [directions].
- tuned-lens runs: tuned- and logit-lens KL per layer: tuned_lens_results.json + visualizations/tuned_lens_kl.png
  (lightning_modules/tuned_lens_report.py)
- steering runs (vectors or LoRA): a strength sweep with answer accuracy, gold-solution NLL, control KL,
  degeneration, null vectors and the cosine to a directions run: steering_results.json +
  visualizations/steering_sweep.png (lightning_modules/steering_report.py). Options marked [steering].
Every run also gets report.html beside those files: every result file in the folder, interactive, self-contained
(interp/report_html.py). `--compare RUN_A RUN_B` writes one report.html overlaying two result folders instead.
"""

import argparse
import json
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from cli import LOG_ROOT, datamodule_from_run_config, read_checkpoint, run_main
from interp.errors import UserError
from interp.generation import DEFAULT_MAX_NEW_TOKENS
from interp.report_html import provenance, write_comparison_html, write_report_html
from lightning_modules.protocol import (
    DIRECTION_STRENGTHS,
    STEERING_STRENGTHS,
    EvaluateOptions,
    study_module_class,
)


def check_not_another_checkpoints_results(results: Path, ckpt: Path) -> None:
    """Results of a different checkpoint (their "checkpoint" field) are never replaced silently, e.g. those of
    best.ckpt by an evaluation of last.ckpt; the same checkpoint's are (a rerun redoes them)."""
    if not results.is_file():
        return
    try:
        previous = json.loads(results.read_text()).get("checkpoint")
    except (json.JSONDecodeError, AttributeError):
        previous = None
    if previous is None or Path(previous).resolve() != ckpt.resolve():
        raise UserError(f"{results} holds the results of {previous or 'another evaluation'}, not of {ckpt}: pass "
                        "--output_dir to keep both, or --overwrite to replace them")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ckpt", help="checkpoint written by train.py (best.ckpt or last.ckpt)")
    target.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="two result folders (e.g. logs/a "
                        "logs/b): one report.html overlaying their results, in --output_dir (default "
                        "logs/compare/<a>_vs_<b>); nothing is evaluated")  # fmt: skip
    parser.add_argument("--output_dir", default=None, help="where result files go (default: logs/<run_name>)")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="[directions, steering] tokens generated per prompt (a generation with no final answer by "
                        "then counts as truncated and incorrect; see truncation_rate)")  # fmt: skip
    parser.add_argument("--greedy", action="store_true", help="[directions, steering] greedy decoding (default: "
                        "sampling, temperature 0.6, top_p 0.95)")  # fmt: skip
    parser.add_argument("--n_prompts", type=int, default=None, help="[directions, steering] test problems (default: all)")
    parser.add_argument("--strengths", type=float, nargs="+", default=None,
                        help="[directions, steering] multipliers of the added direction (default "
                        f"{' '.join(map(str, DIRECTION_STRENGTHS))}) or of the learned steering (default "
                        f"{' '.join(map(str, STEERING_STRENGTHS))}; 0 and 1 always added)")  # fmt: skip
    parser.add_argument("--n_random", type=int, default=1, help="[directions, steering] null directions: the run's "
                        "saved ones (its null, e.g. placebo), isotropic of the same norm if it saved none; steering "
                        "vectors: placebo contrasts of the train problems. p_rank is never below 1 / (n_random + 1): "
                        "19 for a test at 0.05")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="[directions, steering] sampling, nulls; [directions] the "
                        "problem sample")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace result files in the output folder that "
                        "another checkpoint wrote (by default that is refused: pick another --output_dir)")
    parser.add_argument("--directions", default=None, help="[steering] a directions run's "
                        "reasoning_directions.safetensors: cosine of each learned vector with its direction")  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare:
        first, second = (Path(folder) for folder in args.compare)
        output_dir = Path(args.output_dir or LOG_ROOT / "compare" / f"{first.name}_vs_{second.name}")
        print(f"Wrote {write_comparison_html(first, second, output_dir, provenance())}")
        return
    ckpt = Path(args.ckpt)
    checkpoint = read_checkpoint(ckpt)  # data only: a checkpoint from anyone runs no code
    config = yaml.safe_load(checkpoint["run_config"])
    module_class = study_module_class(config["model"]["class_path"])
    output_dir = Path(args.output_dir) if args.output_dir else LOG_ROOT / config["run_name"]
    if not args.overwrite:
        check_not_another_checkpoints_results(output_dir / module_class.results_file, ckpt)
    options = EvaluateOptions(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, n_prompts=args.n_prompts,
        strengths=None if args.strengths is None else tuple(args.strengths), n_random=args.n_random, seed=args.seed,
        directions=args.directions,
    )  # fmt: skip
    datamodule = datamodule_from_run_config(checkpoint["run_config"])
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        callbacks=[RichProgressBar(leave=True)])  # fmt: skip
    module = module_class.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    report = module.build_report(trainer, datamodule, "test", options, str(ckpt))
    paths = module_class.write_report(report, output_dir)
    backbone = getattr(datamodule, "backbone", None)
    fingerprint = backbone.fingerprint() if hasattr(backbone, "fingerprint") else None
    paths["html"] = write_report_html(output_dir, provenance(checkpoint["run_config"], fingerprint))
    print("Wrote " + ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    run_main(main)
