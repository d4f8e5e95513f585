"""The directions evaluation report: `interp.intervention_eval.intervention_report` of a directions run's
selected direction on held-out problems, and its files.

`directions_report` picks the run's selected (position, layer), its `split` problems
(`datamodules.prompts.problem_pairs`) and its null directions, and adds "backbone", "split", "position",
"position_label", "layer" to the report (JSON shape in interp/intervention_eval.py; the module's build_report
adds "checkpoint"). `write_intervention_report` writes intervention_results.json (NaN -> null) and
visualizations/interventions.png (accuracy and gold NLL vs strength) and prints a rich table on stdout.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from datamodules.prompts import problem_pairs
from interp.errors import UserError
from interp.intervention_eval import intervention_report
from interp.plots import plt  # pyplot with the Agg backend
from lightning_modules.protocol import write_report_files

RESULTS_FILE = "intervention_results.json"
FIGURE_FILE = "interventions.png"


def directions_report(module, datamodule, split: str = "test", n_prompts: int | None = None, **kwargs) -> dict:
    """`intervention_report` of a directions run's selected candidate on `split` problems (seeded sample of
    n_prompts problems, both of their prompts). `module`: a ReasoningDirectionModule (or anything with
    `selected`, `directions_by_layer`, `backbone_model`, `tokenizer`); kwargs go to intervention_report. The
    module's `null_directions` (kind `hparams.null_kind`), when it has them, are the null; else isotropic."""
    if module.selected is None:
        raise UserError("the run selected no direction (every candidate was discarded): nothing to evaluate")
    position, layer = int(module.selected["position"]), int(module.selected["layer"])
    pairs = problem_pairs(datamodule, split, n_prompts, seed=kwargs.get("seed", 0))
    rows = [row for pair in pairs for row in pair]
    nulls = getattr(module, "null_directions", None)
    if nulls is not None:  # the run's own null (e.g. placebo), not isotropic noise
        kwargs = {"null_directions": nulls, "null": module.hparams.null_kind, **kwargs}
    report = intervention_report(module.backbone_model, module.tokenizer, rows, module.directions_by_layer(position),
                                 layer, **kwargs)  # fmt: skip
    labels = getattr(module, "position_labels", None) or []
    spec = getattr(module, "backbone_spec", None)
    return {"backbone": getattr(spec, "name_or_path", None), "split": split, "position": position,
            "position_label": labels[position] if position < len(labels) else None, "layer": layer, **report}  # fmt: skip


def _value(condition: dict, key: str) -> float:
    return condition[key] if key == "accuracy" else condition[key]["mean"]


def plot_interventions(report: dict):
    """Accuracy and gold NLL (95% CI) vs strength: the added conditions as a curve through the baseline at 0,
    the ablated condition as a dashed line, random directions as crosses."""
    conditions = report["conditions"]
    by_name = {c["name"]: c for c in conditions}
    added = [c for c in conditions if c["direction"] == "selected" and c["intervention"] == "add"]
    if 0.0 not in [c["strength"] for c in added]:
        added.append(by_name["baseline"])  # the baseline is strength 0
    added.sort(key=lambda c: c["strength"] or 0.0)
    xs = [c["strength"] or 0.0 for c in added]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in ((axes[0], "accuracy", "answer accuracy"), (axes[1], "gold_nll", "gold-solution NLL")):
        ys = [_value(c, key) for c in added]
        if key == "gold_nll":
            low = [y - c[key]["ci"][0] for y, c in zip(ys, added)]
            high = [c[key]["ci"][1] - y for y, c in zip(ys, added)]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label="selected direction added")
        else:
            ax.plot(xs, ys, marker="o", label="selected direction added")
        ax.axhline(_value(by_name["ablated"], key), color="C3", linestyle="--", label="selected direction ablated")
        randoms = [c for c in conditions if c["direction"] == "random"]
        for i, c in enumerate(c for c in randoms if c["intervention"] == "add"):
            ax.plot([c["strength"]], [_value(c, key)], "x", color="grey", label="random added" if i == 0 else None)
        for i, c in enumerate(c for c in randoms if c["intervention"] == "ablate"):
            ax.axhline(_value(c, key), color="grey", linestyle=":", label="random ablated" if i == 0 else None)
        ax.set_xlabel(f"strength (x |r| = {report['direction_norm']:.3g}, layer {report['selected_layer']})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def write_intervention_report(report: dict, output_dir) -> dict[str, Path]:
    """Write intervention_results.json and visualizations/interventions.png into output_dir, print a table."""
    paths = write_report_files(report, output_dir, RESULTS_FILE, plot_interventions(report), FIGURE_FILE)
    table = Table(title=f"Interventions at layer {report['selected_layer']} (n={len(report['reasoning_rows'])} problems)")
    for column in ("condition", "accuracy", "truncated", "gold NLL", "95% CI", "dNLL", "control KL", "ctrl solved",
                   "4-gram rep.", "compr."):
        names = max(len(c["name"]) for c in report["conditions"]) if column == "condition" else None
        table.add_column(column, justify="right", no_wrap=True, min_width=names)
    for c in report["conditions"]:
        nll = c["gold_nll"]
        table.add_row(
            c["name"], f"{c['accuracy']:.3f}", f"{c['truncation_rate']:.3f}", f"{nll['mean']:.3f}", f"[{nll['ci'][0]:.3f}, {nll['ci'][1]:.3f}]",
            f"{c['gold_nll_change']['mean']:+.3f}", f"{c['control_kl']['mean']:.4f}",
            "-" if c["control_accuracy"] is None else f"{c['control_accuracy']:.3f}", f"{c['ngram_repetition']:.3f}",
            f"{c['compression_ratio']:.2f}",
        )  # fmt: skip
    console = Console(width=max(Console().width, 160))  # the whole table, whatever the terminal
    console.print(table)
    for result in report.get("vs_null", {}).values():
        nulls = ", ".join(f"{v:.3f}" for v in result["null_values"])
        console.print(f"{result['condition']} vs its null directions: {result['metric']} {result['value']:.3f} "
                      f"(nulls {nulls}), per-prompt difference {result['difference']:+.3f} "
                      f"[{result['ci'][0]:+.3f}, {result['ci'][1]:+.3f}], rank p {result['p_rank']:.3f}")  # fmt: skip
    return paths
