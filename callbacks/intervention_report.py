"""Answer-graded evaluation of a reasoning direction: generate under interventions, grade, score, report.

`intervention_report` runs held-out problems (PromptRows: reasoning prompts with their gold answers and
solutions, and the control prompts of the same problems) through the backbone under these CONDITIONS:
    baseline                  no intervention
    ablated                   the direction r projected out everywhere (InterventionHandler mode="ablate":
                              embedding output and every attention / MLP output, all positions)
    added@{s}                 x <- x + s * r at blocks.{selected_layer}.resid_post, on the prompt AND the
                              generated tokens (InterventionHandler mode="add", positions="all"), per strength s
    random{k}_added@{s_max}   the same with null direction k (norm |r|) at the strength of largest magnitude:
                              the run's own null directions when given (`directions_report` passes the
                              directions run's, e.g. placebo), else isotropic random directions
    random{k}_ablated         null direction k ablated like r
Per condition:
    accuracy        on the reasoning prompts: share of generations that `grade_answer` marks correct against the
                    row's gold_answer (its dataset's rules); generation with `interp.generation.generate`
                    (sampling at temperature 0.6 / top_p 0.95 by default, greedy with do_sample=False) and the
                    same seed in every condition, so conditions differ only by the intervention
    gold_nll        on the reasoning prompts: teacher-forced mean NLL per token of the gold solution
                    (`interp.metrics.gold_solution_nll`, first max_solution_tokens tokens); mean, percentile
                    bootstrap 95% CI over prompts, per prompt; gold_nll_change = paired change vs baseline
    control_kl      on the control prompts: KL(baseline || condition) of the next-token distribution after the
                    prompt (`last_token_kl` of `next_token_logits`); 0 for the baseline
    degeneration    means over the reasoning generations of `ngram_repetition` (4-grams) and `compression_ratio`
JSON written by `write_intervention_report` (intervention_results.json; NaN -> null):
    {"selected_layer": int, "direction_norm": float, "strengths": [float], "n_random": int,
     "null": a `interp.directions.NULLS` kind, "n_null": int (= n_random),
     "null_source": "the run's saved null directions" | "isotropic, drawn here (the run saved none)",
     "generation": {"max_new_tokens", "do_sample", "temperature", "top_p", "seed"},
     "n_bootstrap": int, "max_solution_tokens": int | null,
     "reasoning_rows": [row_index], "control_rows": [row_index], "pair_indices": [pair_index],
     "conditions": [{"name": str, "intervention": "none" | "ablate" | "add", "direction": "none" | "selected" |
                     "random", "strength": float | null, "random_index": int | null,
                     "accuracy": float, "n_correct": int, "n_prompts": int, "correct": [bool per reasoning row],
                     "extracted_answers": [str | null per reasoning row],
                     "truncation_rate": float, "n_truncated": int, "truncated": [bool per reasoning row],
                     "accuracy_among_finished": float | null (n_correct / generations with a final answer),
                     "gold_nll": {"mean": float, "ci": [low, high], "per_prompt": [float]},
                     "gold_nll_change": {"mean": float, "ci": [low, high]},
                     "control_kl": {"mean": float, "max": float, "per_prompt": [float]},
                     "ngram_repetition": float, "compression_ratio": float,
                     "samples": [{"row_index", "pair_index", "dataset", "gold_answer", "generation",
                                  "extracted_answer", "correct", "truncated"}, ... the first n_samples rows]}],
     ... plus what the caller adds (`directions_report`: "checkpoint", "backbone", "split", "position",
     "position_label", "layer")}
Also visualizations/interventions.png (accuracy and gold NLL vs strength) and a rich table on stdout.
Shared with callbacks/ablation.py and callbacks/patching.py: `problem_pairs` (held-out (reasoning, control) row
pairs) and `HeldOutEvaluation` (when such a callback runs, and how it logs and writes its results).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table

from interp.backbone import decoder_layers
from interp.directions import random_directions
from interp.errors import UserError
from interp.generation import DEFAULT_MAX_NEW_TOKENS, generate
from interp.grading import compression_ratio, extract_answer, grade_answer, ngram_repetition
from interp.interventions import InterventionHandler, check_directions
from interp.metrics import gold_solution_nll, last_token_kl, next_token_logits
from interp.plots import plt  # pyplot with the Agg backend
from interp.selection import bootstrap_ci

RESULTS_FILE = "intervention_results.json"
FIGURE_FILE = "interventions.png"


def problem_pairs(
    datamodule, split: str, n: int | None = None, seed: int = 0, exclude: Sequence[int] = ()
) -> list[tuple]:
    """Up to n (reasoning PromptRow, control PromptRow) pairs of `split`, a seeded sample of its problems in
    pair order (n None: all), leaving out the problems whose pair_index is in `exclude` (e.g. those that chose
    a direction). `datamodule`: a prompt datamodule or one holding it as `.prompts`."""
    prompts = getattr(datamodule, "prompts", datamodule)
    prompts.setup()
    by_pair: dict[int, dict] = {}
    for row in prompts.rows:
        if row.split == split:
            by_pair.setdefault(row.pair_index, {})[row.kind] = row
    pairs = sorted(p for p, kinds in by_pair.items() if {"reasoning", "control"} <= set(kinds))
    if pairs and not set(pairs) - set(exclude):
        raise UserError(f"no {split} problems left once the {len(set(exclude))} used to select the direction are "
                        f"excluded: raise the prompts' {split}_fraction")  # fmt: skip
    pairs = [p for p in pairs if p not in set(exclude)]
    if not pairs:
        raise UserError(f"no {split} problems: set the prompts' {split}_fraction > 0")
    if n is not None:
        if n < 1:
            raise UserError(f"the number of prompts must be >= 1, got {n}")
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n]
        pairs = [pairs[i] for i in sorted(chosen.tolist())]
    return [(by_pair[p]["reasoning"], by_pair[p]["control"]) for p in pairs]


def _clean(value):
    """JSON-ready copy: NaN / inf -> None."""
    if isinstance(value, dict):
        return {key: _clean(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class HeldOutEvaluation(L.Callback):
    """Base of the evaluation callbacks: run `evaluate` once at the end of fit (every_n_epochs None) or after
    every N-th training epoch (after that epoch's validation), on rank zero only (every rank resolves
    trainer.log_dir, a collective under DDP). Scalars go to every logger, figures to TensorBoard, the results
    dict to <trainer.log_dir>/<results_file> (not written when the trainer has no log dir, e.g. fast_dev_run)
    and to `self.last_results`. Subclasses define results_file and evaluate(trainer, pl_module, fast) ->
    (results dict, {tag: scalar}, {tag: Figure}); fast (fast_dev_run) should only check the wiring."""

    results_file = "results.json"

    def __init__(self, every_n_epochs: int | None = None):
        if every_n_epochs is not None and every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be >= 1 or null (end of fit), got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.last_results: dict | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, fast: bool) -> tuple[dict, dict, dict]:
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module, trainer.current_epoch + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None:
            self.run(trainer, pl_module, trainer.current_epoch)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_completed: int) -> dict | None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return None
        for name in ("backbone_model", "tokenizer"):
            if not hasattr(pl_module, name):
                raise UserError(f"{type(self).__name__} needs a module with a `{name}` (e.g. ReasoningDirectionModule)")
        results, scalars, figures = self.evaluate(trainer, pl_module, bool(trainer.fast_dev_run))
        results = {"epochs_completed": epochs_completed, "global_step": trainer.global_step, **results}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for tag, fig in figures.items():
                    logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        for fig in figures.values():
            plt.close(fig)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / self.results_file).write_text(json.dumps(_clean(results), indent=2) + "\n")
        self.last_results = results
        return results


def _conditions(strengths: Sequence[float], n_random: int) -> list[dict]:
    conditions = [{"name": "baseline", "intervention": "none", "direction": "none", "strength": None},
                  {"name": "ablated", "intervention": "ablate", "direction": "selected", "strength": None}]
    conditions += [{"name": f"added@{s:g}", "intervention": "add", "direction": "selected", "strength": float(s)}
                   for s in strengths]  # fmt: skip
    largest = float(max(strengths, key=abs))
    for k in range(n_random):
        conditions += [
            {"name": f"random{k}_added@{largest:g}", "intervention": "add", "direction": "random", "strength": largest},
            {"name": f"random{k}_ablated", "intervention": "ablate", "direction": "random", "strength": None},
        ]  # fmt: skip
    for condition in conditions:
        condition["random_index"] = None
        if condition["direction"] == "random":
            condition["random_index"] = int(condition["name"][len("random") :].split("_")[0])
    return conditions


def _handler(model, condition: dict, direction: torch.Tensor, randoms: torch.Tensor, layer: int):
    """The context manager of one condition (nullcontext for the baseline)."""
    if condition["intervention"] == "none":
        return contextlib.nullcontext()
    r = direction if condition["direction"] == "selected" else randoms[condition["random_index"]]
    if condition["intervention"] == "ablate":
        return InterventionHandler(model, r, mode="ablate")
    return InterventionHandler(model, r, condition["strength"], layers=[layer], mode="add", positions="all")


def intervention_report(
    model,
    tokenizer,
    rows: Sequence,
    direction_by_layer,
    selected_layer: int,
    strengths: Sequence[float] = (-1.0, 1.0, 2.0, 4.0),
    n_random: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    do_sample: bool = True,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    n_samples: int | None = 4,
    n_bootstrap: int = 1000,
    max_solution_tokens: int | None = 256,
    null_directions: torch.Tensor | None = None,
    null: str = "isotropic",
) -> dict:
    """Evaluate the direction direction_by_layer[selected_layer] under every condition (module docstring).

    Args:
        rows: PromptRows (`datamodules.prompts.PromptRow`); kind "reasoning" rows are generated, graded and
            NLL-scored, kind "control" rows give the KL. Both kinds are needed.
        direction_by_layer: [n_model_layers, d_model] (e.g. `ReasoningDirectionModule.directions_by_layer`);
            only row `selected_layer` is used, unnormalised (|r| sets the scale of the strengths).
        strengths: multipliers s of the added conditions (0 reproduces the baseline exactly).
        n_random: null directions, each added at the strength of largest magnitude and ablated: the first
            n_random rows of `null_directions` ([n, d_model], named `null`, rescaled to |r|) when given, else
            isotropic random directions of |r| seeded by `seed`.
        n_samples: generations kept as text in "samples" per condition (None: all).
    Returns:
        the report dict (JSON shape in the module docstring).
    """
    reasoning = [row for row in rows if row.kind == "reasoning"]
    control = [row for row in rows if row.kind == "control"]
    if not reasoning or not control:
        raise UserError(f"the report needs reasoning and control prompts; got {len(reasoning)} and {len(control)}")
    if not strengths:
        raise UserError("give at least one strength")
    if n_random < 0 or n_bootstrap < 1:
        raise UserError(f"n_random must be >= 0 and n_bootstrap >= 1, got {n_random}, {n_bootstrap}")
    directions = check_directions(model, direction_by_layer)
    if directions.ndim != 2:
        raise UserError(f"direction_by_layer must be [n_layers, d_model], got {tuple(directions.shape)}")
    if not 0 <= selected_layer < len(decoder_layers(model)):
        raise UserError(f"selected_layer {selected_layer} out of range: the model has {directions.shape[0]} layers")
    direction = directions[selected_layer]  # [d_model]
    norm = float(direction.to(torch.float64).norm())
    if norm == 0.0:
        raise UserError(f"the direction at layer {selected_layer} has zero norm")
    if null_directions is None:
        randoms, null, source = random_directions(direction, max(n_random, 1), generator=seed), "isotropic", None
    else:
        randoms = torch.as_tensor(null_directions).detach().cpu().to(torch.float64)  # [n, d_model]
        source = "the run's saved null directions"
        if randoms.ndim != 2 or randoms.shape[1] != direction.shape[0] or len(randoms) < n_random:
            raise UserError(f"the run saved null directions {tuple(randoms.shape)}: ask for at most {len(randoms)} "
                            f"random directions of d_model {direction.shape[0]} (--n_random)")  # fmt: skip
        randoms = (randoms / randoms.norm(dim=-1, keepdim=True) * norm).to(direction.dtype)  # [n, d_model], |r|
    prompts = [row.prompt for row in reasoning]
    solutions = [row.gold_solution for row in reasoning]
    control_prompts = [row.prompt for row in control]
    gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
           "seed": seed}  # fmt: skip
    results, base_nll, base_logits = [], None, None
    for condition in _conditions(strengths, n_random):
        with _handler(model, condition, direction, randoms, selected_layer):
            texts = generate(model, tokenizer, prompts, batch_size=batch_size, **gen)
            nll = gold_solution_nll(model, tokenizer, prompts, solutions, batch_size, max_solution_tokens)  # [n]
            logits = next_token_logits(model, tokenizer, control_prompts, batch_size)  # [n_control, vocab]
        if base_nll is None:
            base_nll, base_logits = nll, logits
        kl = last_token_kl(base_logits, logits)  # [n_control] float64
        correct = [grade_answer(text, row.gold_answer, row.dataset) for text, row in zip(texts, reasoning)]
        answers = [extract_answer(text, row.dataset) for text, row in zip(texts, reasoning)]
        truncated = [answer is None for answer in answers]  # no final answer (`has_final_answer` is False)
        n_finished = len(truncated) - sum(truncated)
        change = nll - base_nll
        samples = [
            {"row_index": row.row_index, "pair_index": row.pair_index, "dataset": row.dataset,
             "gold_answer": row.gold_answer, "generation": text, "extracted_answer": answer, "correct": ok,
             "truncated": answer is None}
            for row, text, answer, ok in zip(reasoning, texts, answers, correct)
        ][:n_samples]  # fmt: skip
        results.append({
            **condition,
            "accuracy": sum(correct) / len(correct), "n_correct": sum(correct), "n_prompts": len(correct),
            "correct": correct, "extracted_answers": answers,
            "truncation_rate": sum(truncated) / len(truncated), "n_truncated": sum(truncated), "truncated": truncated,
            "accuracy_among_finished": sum(correct) / n_finished if n_finished else None,
            "gold_nll": {"mean": float(nll.mean()), "ci": list(bootstrap_ci(nll, n_bootstrap, seed=seed)),
                         "per_prompt": nll.tolist()},
            "gold_nll_change": {"mean": float(change.mean()), "ci": list(bootstrap_ci(change, n_bootstrap, seed=seed))},
            "control_kl": {"mean": float(kl.mean()), "max": float(kl.max()), "per_prompt": kl.tolist()},
            "ngram_repetition": sum(map(ngram_repetition, texts)) / len(texts),
            "compression_ratio": sum(map(compression_ratio, texts)) / len(texts),
            "samples": samples,
        })  # fmt: skip
    return {
        "selected_layer": int(selected_layer), "direction_norm": norm, "strengths": [float(s) for s in strengths],
        "n_random": n_random, "null": null, "n_null": n_random,
        "null_source": source or "isotropic, drawn here (the run saved none)", "generation": gen,
        "n_bootstrap": n_bootstrap, "max_solution_tokens": max_solution_tokens,
        "reasoning_rows": [row.row_index for row in reasoning], "control_rows": [row.row_index for row in control],
        "pair_indices": sorted({row.pair_index for row in rows}), "conditions": results,
    }  # fmt: skip


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
    output_dir = Path(output_dir)
    (output_dir / "visualizations").mkdir(parents=True, exist_ok=True)
    json_path = output_dir / RESULTS_FILE
    json_path.write_text(json.dumps(_clean(report), indent=2) + "\n")
    fig = plot_interventions(report)
    png_path = output_dir / "visualizations" / FIGURE_FILE
    fig.savefig(png_path)
    plt.close(fig)
    table = Table(title=f"Interventions at layer {report['selected_layer']} (n={len(report['reasoning_rows'])} problems)")
    for column in ("condition", "accuracy", "truncated", "gold NLL", "95% CI", "dNLL", "control KL", "4-gram rep.",
                   "compr."):
        table.add_column(column, justify="right", no_wrap=True)
    for c in report["conditions"]:
        nll = c["gold_nll"]
        table.add_row(
            c["name"], f"{c['accuracy']:.3f}", f"{c['truncation_rate']:.3f}", f"{nll['mean']:.3f}", f"[{nll['ci'][0]:.3f}, {nll['ci'][1]:.3f}]",
            f"{c['gold_nll_change']['mean']:+.3f}", f"{c['control_kl']['mean']:.4f}", f"{c['ngram_repetition']:.3f}",
            f"{c['compression_ratio']:.2f}",
        )  # fmt: skip
    Console(width=max(Console().width, 120)).print(table)
    return {"json": json_path, "figure": png_path}
