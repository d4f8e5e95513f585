"""The steering evaluation report (vectors and the LoRA baseline): a strength sweep on held-out problems.

`steering_report(module, datamodule, strengths, ...)` reads the run's test split (reasoning and control prompts of
the same problems; `--n_prompts` caps the problems) and, for every strength s (0 always included: the unsteered
backbone), with the module's steering at s (`module.steered`: the vectors times s, or every adapter's output
times s):
    gold_nll     per reasoning prompt, the teacher-forced mean NLL per token of its gold solution
                 (`interp.metrics.gold_solution_nll`, first max_solution_tokens tokens); mean and percentile
                 bootstrap 95% CI over problems, and the paired change vs s = 0 with its CI
    control_kl   per control prompt, KL(unsteered || steered) of the next-token distribution after the prompt
                 (`last_token_kl` of `next_token_logits`); mean and max
`write_steering_report` writes steering_results.json and visualizations/steering_nll.png. JSON shape:
    {"checkpoint", "module", "backbone", "layers", "trainable_parameters", "split": "test", "n_problems",
     "max_solution_tokens", "n_bootstrap", "strengths": [float],
     "conditions": [{"strength", "gold_nll": {"mean", "ci", "per_prompt"}, "gold_nll_change": {"mean", "ci"},
                     "control_kl": {"mean", "max"}}],
     "not_measured": [str]}      what the issue asks that this report does not compute yet
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from interp.errors import UserError
from interp.metrics import gold_solution_nll, last_token_kl, next_token_logits
from interp.plots import plot_layer_curves
from interp.selection import bootstrap_ci
from lightning_modules.protocol import write_report_files

RESULTS_FILE = "steering_results.json"
FIGURE_FILE = "steering_nll.png"
NOT_MEASURED = ["graded answer accuracy under steering", "degeneration measures",
                "cosine of the vectors to a directions run's directions"]  # fmt: skip


def steering_report(module, datamodule, strengths, checkpoint: str, n_prompts: int | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, max_solution_tokens: int | None = 256,
                    batch_size: int = 8) -> dict:  # fmt: skip
    """The strength sweep of `module` (a SteeringObjectiveModule loaded from `checkpoint`) on the test split."""
    datamodule.setup("test")
    module.pad_id = datamodule.pad_id
    by_pair: dict[int, dict[str, object]] = {}
    for row in datamodule.prompts.rows:
        if row.split == "test":
            by_pair.setdefault(row.pair_index, {})[row.kind] = row
    pairs = [kinds for _, kinds in sorted(by_pair.items()) if len(kinds) == 2][:n_prompts]
    if not pairs:
        raise UserError("the run has no test problems with a reasoning and a control prompt")
    reasoning, control = [p["reasoning"] for p in pairs], [p["control"] for p in pairs]
    model, tokenizer = module.backbone_model, datamodule.prompts.tokenizer
    strengths = sorted({0.0, *(float(s) for s in strengths)})
    measured = {}
    for s in strengths:
        with torch.no_grad(), module.steered(None, s):
            nll = gold_solution_nll(model, tokenizer, [r.prompt for r in reasoning], [r.gold_solution for r in reasoning],
                                    batch_size, max_solution_tokens)  # fmt: skip
            logits = next_token_logits(model, tokenizer, [r.prompt for r in control], batch_size)
        measured[s] = (nll, logits)
    base_nll, base_logits = measured[0.0]
    conditions = []
    for s, (nll, logits) in measured.items():
        change, kl = nll - base_nll, last_token_kl(base_logits, logits)
        conditions.append({
            "strength": s,
            "gold_nll": {"mean": float(nll.mean()), "ci": list(bootstrap_ci(nll, n_bootstrap, seed=seed)),
                         "per_prompt": nll.tolist()},
            "gold_nll_change": {"mean": float(change.mean()), "ci": list(bootstrap_ci(change, n_bootstrap, seed=seed))},
            "control_kl": {"mean": float(kl.mean()), "max": float(kl.max())},
        })  # fmt: skip
    spec = module.backbone_spec or datamodule.backbone
    return {
        "checkpoint": str(checkpoint), "module": type(module).__name__, "backbone": spec.name_or_path,
        "layers": list(module.layers), "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        "split": "test", "n_problems": len(pairs), "max_solution_tokens": max_solution_tokens,
        "n_bootstrap": n_bootstrap, "strengths": strengths, "conditions": conditions, "not_measured": NOT_MEASURED,
    }  # fmt: skip


def write_steering_report(report: dict, output_dir: Path) -> dict[str, Path]:
    """Write steering_results.json and visualizations/steering_nll.png into output_dir, print a table."""
    rows = report["conditions"]
    fig = plot_layer_curves([row["strength"] for row in rows], {"gold-solution NLL": [r["gold_nll"]["mean"] for r in rows]},
                            ylabel="nats per token", xlabel="steering strength",
                            title=f"{report['module']} on {report['backbone']} ({report['split']})")  # fmt: skip
    paths = write_report_files(report, output_dir, RESULTS_FILE, fig, FIGURE_FILE)
    table = Table(title=f"Steering sweep (n={report['n_problems']} test problems, "
                        f"{report['trainable_parameters']} trained parameters)")  # fmt: skip
    for column in ("strength", "gold NLL", "95% CI", "change", "control KL"):
        table.add_column(column, justify="right")
    for row in rows:
        low, high = row["gold_nll"]["ci"]
        table.add_row(f"{row['strength']:g}", f"{row['gold_nll']['mean']:.3f}", f"[{low:.3f}, {high:.3f}]",
                      f"{row['gold_nll_change']['mean']:+.3f}", f"{row['control_kl']['mean']:.4f}")  # fmt: skip
    Console().print(table)
    return paths
