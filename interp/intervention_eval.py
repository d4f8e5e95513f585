"""Answer-graded evaluation of a reasoning direction: generate under interventions, grade, score.

`evaluate_conditions(model, tokenizer, rows, conditions, handler, generation)` measures any list of conditions
(`handler(condition)`: the context manager applying it; the first is the baseline) and gives the per-condition
entries below; `intervention_report` builds the direction CONDITIONS for it, and the steering report
(lightning_modules/steering_report.py) its own "steer" conditions, so both reports' numbers are the same numbers.

`intervention_report` runs held-out problems (PromptRows: reasoning prompts with their gold answers and
solutions, and the control prompts of the same problems) through the backbone under these CONDITIONS
(`build_conditions`, one `Condition` each):
    baseline                  no intervention
    ablated                   the direction r projected out everywhere (`AblateDirection`:
                              embedding output and every attention / MLP output, all positions)
    added@{s}                 x <- x + s * r at blocks.{selected_layer}.resid_post, on the prompt AND the
                              generated tokens (`AddDirection`, apply_to "all"), per strength s
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
    accuracy_change paired change vs baseline over the reasoning prompts, correct(condition) - correct(baseline)
                    per prompt: mean and percentile bootstrap 95% CI
    control_kl      on the control prompts: KL(baseline || condition) of the next-token distribution after the
                    prompt (`last_token_kl` of `next_token_logits`); 0 for the baseline
    control_accuracy  baseline and added conditions only (null elsewhere): the control prompts are generated too
                    and graded against their problem's gold answer: the share on which the model SOLVES the
                    problem it was asked to restate / copy / name ("does adding r move control prompts toward
                    solving?"); control_answer_rate: the share whose generation states any final answer
    degeneration    means over the reasoning generations of `ngram_repetition` (4-grams) and `compression_ratio`
VS_NULL (the selected direction against its null directions, prompt by prompt; needs n_random >= 1):
    ablated         accuracy: d_i = correct_i(ablated) - mean_k correct_i(random{k}_ablated) over the reasoning
                    prompts; < 0: ablating r costs more answers than ablating a null direction
    added           control_accuracy at the strength s of largest magnitude (s < 0 subtracts r): d_i =
                    solved_i(added@s) - mean_k solved_i(random{k}_added@s) over the control prompts; > 0: adding s r
                    moves control prompts toward solving more than adding a null direction of the same norm does
    each {"condition", "metric", "value", "null_values" [per null direction], "difference": mean d_i, "ci":
    percentile bootstrap 95% CI of mean d_i over prompts, "p_rank": (1 + #{null at least as extreme}) / (m + 1),
    one-sided in the direction stated}
    steered, steered_gold_nll   (steering reports) steered@1 vs its null vector sets on the reasoning prompts:
                    d_i = correct_i (resp. gold NLL_i) of steered@1 - mean_k of null k; > 0 (resp. < 0) = better
    How to read them: the CI resamples prompts only, with r and the m drawn null directions held fixed. It says
    whether r differs from THESE nulls on the prompt population, not whether r is unlike null directions in
    general (directions differ from one another; a no-effect simulation with direction-to-direction spread gave
    "CI excludes 0" in 26-64% of runs at n = 40-100). That test is p_rank, valid under exchangeability of r with
    the nulls but never below 1 / (m + 1) (m = 1: 0.5; m = 19 reaches 0.05). Near 0% or 100% accuracy and at
    small n the percentile interval is unreliable (zero width when every d_i is equal).
JSON written by `lightning_modules.direction_report.write_intervention_report` (intervention_results.json;
NaN -> null):
    {"selected_layer": int, "direction_norm": float, "strengths": [float], "n_random": int,
     "null": a `interp.directions.NULLS` kind, "n_null": int (= n_random),
     "null_source": "the run's saved null directions" | "isotropic, drawn here (the run saved none)",
     "generation": {"max_new_tokens", "do_sample", "temperature", "top_p", "seed"},
     "n_bootstrap": int, "max_solution_tokens": int | null,
     "reasoning_rows": [row_index], "control_rows": [row_index], "pair_indices": [pair_index],
     "conditions": [{"name": str, "intervention": "none" | "ablate" | "add", "direction": "none" | "selected" |
                     "random", "strength": float | null, "random_index": int | null,   (the `Condition`)
                     "accuracy": float, "n_correct": int, "n_prompts": int, "correct": [bool per reasoning row],
                     "extracted_answers": [str | null per reasoning row],
                     "truncation_rate": float, "n_truncated": int, "truncated": [bool per reasoning row],
                     "accuracy_among_finished": float | null (n_correct / generations with a final answer),
                     "gold_nll": {"mean": float, "ci": [low, high], "per_prompt": [float]},
                     "gold_nll_change": {"mean": float, "ci": [low, high]},
                     "accuracy_change": {"mean": float, "ci": [low, high]},
                     "control_kl": {"mean": float, "max": float, "per_prompt": [float]},
                     "control_accuracy": float | null, "control_answer_rate": float | null,
                     "control_correct": [bool per control row] | null,
                     "ngram_repetition": float, "compression_ratio": float,
                     "samples": [{"row_index", "pair_index", "dataset", "gold_answer", "generation",
                                  "extracted_answer", "correct", "truncated"}, ... the first n_samples rows],
                     "control_samples": the same for the control rows (added conditions and baseline) | null}],
     "vs_null": {"ablated": {...}, "added": {...}} (VS_NULL; {} when n_random is 0),
     ... plus what the caller adds (`lightning_modules.direction_report.directions_report`: "checkpoint",
     "backbone", "split", "position", "position_label", "layer")}
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from interp.backbone import decoder_layers
from interp.directions import random_directions
from interp.errors import UserError
from interp.generation import DEFAULT_MAX_NEW_TOKENS, generate
from interp.grading import extract_answer, grade_answer
from interp.interventions import AblateDirection, AddDirection, intervention_directions
from interp.metrics import gold_solution_nll, last_token_kl, next_token_logits
from interp.selection import bootstrap_ci
from interp.text_metrics import compression_ratio, ngram_repetition


@dataclasses.dataclass(frozen=True)
class Condition:
    """One of the CONDITIONS (module docstring). Its fields, in this order, open the condition's report entry."""

    name: str
    intervention: str  # "none" | "ablate" | "add" | "steer" (a steering module's vectors or adapter)
    direction: str  # "none" | "selected" | "random" (a null) | "learned" (a steering module's own)
    strength: float | None = None  # the multiplier s of an added direction or of the steering
    random_index: int | None = None  # which null direction, for direction "random"

    def handler(self, model, direction: torch.Tensor, randoms: torch.Tensor, layer: int):
        """The context manager that applies this condition (nullcontext for the baseline).
        direction: [d_model] (r); randoms: [n, d_model] null directions; layer: where "add" adds."""
        if self.intervention == "none":
            return contextlib.nullcontext()
        r = direction if self.direction == "selected" else randoms[self.random_index]
        if self.intervention == "ablate":
            return AblateDirection(model, r)
        return AddDirection(model, r, self.strength, layers=[layer])


CONTROL_GENERATED = ("none", "add", "steer")  # interventions under which the control prompts are generated too


def build_conditions(strengths: Sequence[float], n_random: int) -> list[Condition]:
    """baseline, ablated, added@{s} per strength, then per null direction k: added at the strength of largest
    magnitude and ablated."""
    largest = float(max(strengths, key=abs))
    conditions = [Condition("baseline", "none", "none"), Condition("ablated", "ablate", "selected")]
    conditions += [Condition(f"added@{s:g}", "add", "selected", strength=float(s)) for s in strengths]
    for k in range(n_random):
        conditions += [Condition(f"random{k}_added@{largest:g}", "add", "random", strength=largest, random_index=k),
                       Condition(f"random{k}_ablated", "ablate", "random", random_index=k)]  # fmt: skip
    return conditions


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
        rows: PromptRows (`datamodules.prompt_rows.PromptRow`); kind "reasoning" rows are generated, graded and
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
    reasoning, control = _split_rows(rows)
    if not strengths:
        raise UserError("give at least one strength")
    if n_random < 0 or n_bootstrap < 1:
        raise UserError(f"n_random must be >= 0 and n_bootstrap >= 1, got {n_random}, {n_bootstrap}")
    directions = intervention_directions(model, direction_by_layer)
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
    gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
           "seed": seed}  # fmt: skip
    conditions = build_conditions(strengths, n_random)
    results = evaluate_conditions(model, tokenizer, rows, conditions,
                                  lambda c: c.handler(model, direction, randoms, selected_layer), gen, batch_size,
                                  n_samples, n_bootstrap, max_solution_tokens)  # fmt: skip
    return {
        "selected_layer": int(selected_layer), "direction_norm": norm, "strengths": [float(s) for s in strengths],
        "n_random": n_random, "null": null, "n_null": n_random,
        "null_source": source or "isotropic, drawn here (the run saved none)", "generation": gen,
        "n_bootstrap": n_bootstrap, "max_solution_tokens": max_solution_tokens,
        "reasoning_rows": [row.row_index for row in reasoning], "control_rows": [row.row_index for row in control],
        "pair_indices": sorted({row.pair_index for row in rows}), "conditions": results,
        "vs_null": vs_null(results, n_bootstrap, seed),
    }  # fmt: skip


def evaluate_conditions(
    model,
    tokenizer,
    rows: Sequence,
    conditions: Sequence[Condition],
    handler: Callable[[Condition], AbstractContextManager],
    generation: dict,
    batch_size: int = 8,
    n_samples: int | None = 4,
    n_bootstrap: int = 1000,
    max_solution_tokens: int | None = 256,
) -> list[dict]:
    """The per-condition entries of the report (module docstring: "Per condition" and the "conditions" JSON), for
    any intervention: `handler(condition)` is the context manager that applies it (the first condition must be
    the unsteered baseline: the changes and the KL are measured against it). generation: `interp.generation.generate`
    keywords (max_new_tokens, do_sample, temperature, top_p, seed), the same in every condition. Control prompts
    are generated under conditions whose intervention is not "ablate" (CONTROL_GENERATED)."""
    reasoning, control = _split_rows(rows)
    if not conditions or conditions[0].intervention != "none":
        raise UserError("evaluate_conditions: the first condition must be the baseline (intervention 'none')")
    prompts = [row.prompt for row in reasoning]
    solutions = [row.gold_solution for row in reasoning]
    control_prompts = [row.prompt for row in control]
    seed = generation["seed"]  # the bootstrap's too
    results, base_nll, base_logits, base_correct = [], None, None, None
    for condition in conditions:
        with handler(condition):
            graded = _generate_and_grade(model, tokenizer, reasoning, generation, batch_size, n_samples)
            nll = gold_solution_nll(model, tokenizer, prompts, solutions, batch_size, max_solution_tokens)  # [n]
            logits = next_token_logits(model, tokenizer, control_prompts, batch_size)  # [n_control, vocab]
            graded_control = None  # control prompts are generated only where adding could make them solve
            if condition.intervention in CONTROL_GENERATED:
                graded_control = _generate_and_grade(model, tokenizer, control, generation, batch_size, n_samples)
        if base_nll is None:
            base_nll, base_logits, base_correct = nll, logits, _as_float(graded["correct"])
        kl = last_token_kl(base_logits, logits)  # [n_control] float64
        correct, truncated = graded["correct"], graded["truncated"]
        n_finished = len(truncated) - sum(truncated)
        change, accuracy_change = nll - base_nll, _as_float(correct) - base_correct
        results.append({
            **dataclasses.asdict(condition),
            "accuracy": sum(correct) / len(correct), "n_correct": sum(correct), "n_prompts": len(correct),
            "correct": correct, "extracted_answers": graded["answers"],
            "truncation_rate": sum(truncated) / len(truncated), "n_truncated": sum(truncated), "truncated": truncated,
            "accuracy_among_finished": sum(correct) / n_finished if n_finished else None,
            "accuracy_change": {"mean": float(accuracy_change.mean()),
                                "ci": list(bootstrap_ci(accuracy_change, n_bootstrap, seed=seed))},
            "gold_nll": {"mean": float(nll.mean()), "ci": list(bootstrap_ci(nll, n_bootstrap, seed=seed)),
                         "per_prompt": nll.tolist()},
            "gold_nll_change": {"mean": float(change.mean()), "ci": list(bootstrap_ci(change, n_bootstrap, seed=seed))},
            "control_kl": {"mean": float(kl.mean()), "max": float(kl.max()), "per_prompt": kl.tolist()},
            "control_accuracy": None if graded_control is None else _mean(graded_control["correct"]),
            "control_answer_rate": None if graded_control is None else 1 - _mean(graded_control["truncated"]),
            "control_correct": None if graded_control is None else graded_control["correct"],
            "ngram_repetition": sum(map(ngram_repetition, graded["texts"])) / len(prompts),
            "compression_ratio": sum(map(compression_ratio, graded["texts"])) / len(prompts),
            "samples": graded["samples"],
            "control_samples": None if graded_control is None else graded_control["samples"],
        })  # fmt: skip
    return results


def _split_rows(rows: Sequence) -> tuple[list, list]:
    """(reasoning rows, control rows); UserError unless both kinds are there."""
    reasoning = [row for row in rows if row.kind == "reasoning"]
    control = [row for row in rows if row.kind == "control"]
    if not reasoning or not control:
        raise UserError(f"the report needs reasoning and control prompts; got {len(reasoning)} and {len(control)}")
    return reasoning, control


def _as_float(flags: Sequence[bool]) -> torch.Tensor:
    return torch.tensor(flags, dtype=torch.float64)


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def _generate_and_grade(model, tokenizer, rows: Sequence, gen: dict, batch_size: int, n_samples: int | None) -> dict:
    """Generate for `rows` under whatever intervention is active and grade against each row's gold answer:
    {"texts", "correct", "answers", "truncated" (no final answer)} per row, and the first n_samples "samples"."""
    texts = generate(model, tokenizer, [row.prompt for row in rows], batch_size=batch_size, **gen)
    correct = [grade_answer(text, row.gold_answer, row.dataset) for text, row in zip(texts, rows)]
    answers = [extract_answer(text, row.dataset) for text, row in zip(texts, rows)]
    samples = [
        {"row_index": row.row_index, "pair_index": row.pair_index, "dataset": row.dataset,
         "gold_answer": row.gold_answer, "generation": text, "extracted_answer": answer, "correct": ok,
         "truncated": answer is None}
        for row, text, answer, ok in zip(rows, texts, answers, correct)
    ][:n_samples]  # fmt: skip
    return {"texts": texts, "correct": correct, "answers": answers,
            "truncated": [answer is None for answer in answers], "samples": samples}  # fmt: skip


# name -> (intervention, per-prompt key, sign): sign +1 when larger is the effect looked for
VS_NULL_TESTS = {
    "ablated": ("ablate", "correct", -1),
    "added": ("add", "control_correct", 1),
    "steered": ("steer", "correct", 1),
    "steered_gold_nll": ("steer", "gold_nll", -1),
}
VS_NULL_METRICS = {"correct": "accuracy", "control_correct": "control_accuracy", "gold_nll": "gold_nll"}


def _per_prompt(condition: dict, key: str) -> list | None:
    value = condition[key]
    return value["per_prompt"] if isinstance(value, dict) else value


def vs_null(conditions: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The tested intervention against its nulls, prompt by prompt (module docstring, VS_NULL): one entry per
    VS_NULL_TESTS name whose intervention has null conditions (direction "random").

    conditions: the report's condition entries (`evaluate_conditions`); {} when there are no null conditions."""
    out = {}
    for name, (kind, key, sign) in VS_NULL_TESTS.items():
        nulls = [c for c in conditions if c["direction"] == "random" and c["intervention"] == kind]
        if not nulls:
            continue
        strength = nulls[0]["strength"]
        if any(c["strength"] != strength for c in nulls):
            raise UserError(f"vs_null: the {kind} null conditions have different strengths")
        chosen = [c for c in conditions if c["direction"] in ("selected", "learned") and c["intervention"] == kind
                  and c["strength"] == strength]  # fmt: skip
        if not chosen:
            raise UserError(f"vs_null: no {kind} condition at strength {strength} to compare with its nulls")
        if not _per_prompt(chosen[0], key):
            raise UserError(f"vs_null: condition {chosen[0]['name']} has no {key}")
        value = _as_float(_per_prompt(chosen[0], key))  # [n_prompts]
        if any(_per_prompt(c, key) is None or len(_per_prompt(c, key)) != len(value) for c in nulls):
            raise UserError(f"vs_null: every {kind} null condition needs {key} for the same {len(value)} prompts")
        null = torch.stack([_as_float(_per_prompt(c, key)) for c in nulls])  # [m, n_prompts]
        d = value - null.mean(0)
        null_values = null.mean(1)
        extreme = int((sign * null_values >= sign * value.mean()).sum())
        out[name] = {
            "condition": chosen[0]["name"], "metric": VS_NULL_METRICS[key],
            "value": float(value.mean()), "null_values": null_values.tolist(), "difference": float(d.mean()),
            "ci": list(bootstrap_ci(d, n_bootstrap, seed=seed)), "p_rank": (1 + extreme) / (len(nulls) + 1),
        }  # fmt: skip
    return out
