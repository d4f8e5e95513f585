"""Choosing among candidate directions, and the statistics that say whether an effect is real.

Pure functions on numbers and score tables; nothing here calls a model.

Selection adapts refusal_direction (Arditi et al. 2024) to reasoning. One candidate per (position, layer),
scored with the gold-solution NLL (`interp.metrics.gold_solution_nll`, higher = worse reasoning). SIGN
CONVENTION: both scores are signed so that POSITIVE supports "this is a reasoning direction":
    ablation_score   mean over reasoning prompts of NLL(direction ablated) - NLL(baseline):
                     > 0 when removing the direction HURTS reasoning. Highest wins.
    induction_score  mean over control prompts of NLL(baseline) - NLL(direction added) (or the caller's
                     metric, signed the same way): > 0 when adding the direction moves the control prompts
                     toward reasoning. Candidates with induction_score < min_induction_score (default 0) are
                     discarded; min_induction_score None turns this filter off (adding a vector of norm |r| at
                     every position also moves the NLL of an unlikely continuation, so its sign alone can mislead:
                     README "The toy pair").
    kl               mean KL(baseline || ablated) of the last-token distribution on control prompts: how much
                     ablation disturbs behaviour unrelated to reasoning. Discarded above kl_threshold.
(refusal_direction's "lowest ablation score wins" is the same rule: its score is refusal log-odds, which
ablation should lower; ours is NLL, which ablation should raise.)

`select_reasoning_direction` is the whole protocol with the scoring injected (no model here): candidates are
scored and one is chosen on a SELECTION set of problems; the chosen direction and its null directions are
re-scored on a disjoint REPORT set, and only those report-set numbers carry z-scores and CIs. (Scoring the
winner on the prompts that chose it inflates both: with no real effect, the maximum over many candidates
still looks significant.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy.stats import t as student_t

from interp.errors import UserError

SCORE_KEYS = ("ablation_score", "induction_score", "kl")


def zscore(effect: float, null_effects: torch.Tensor) -> float:
    """(effect - mean(null)) / std(null) with the unbiased std (ddof=1).

    A null with zero spread (all null effects equal) cannot scale a difference: it gives 0.0 when effect equals
    the common value and NaN otherwise (never +-inf; `null_pvalues` then names the reason).
    """
    null = torch.as_tensor(null_effects, dtype=torch.float64).flatten()
    if null.numel() < 2:
        raise UserError(f"zscore needs at least 2 null effects, got {null.numel()}")
    if not bool(torch.isfinite(null).all()) or not math.isfinite(effect):
        raise UserError("zscore got a non-finite effect or null effect")
    mean, std = float(null.mean()), float(null.std(unbiased=True))
    if std == 0.0:
        return 0.0 if effect == mean else math.nan
    return (effect - mean) / std


def null_pvalues(effect: float, null_effects: torch.Tensor) -> dict[str, float]:
    """How surprising `effect` is among m null effects (e.g. scores of placebo directions on the same prompts).

    Returns {"t": two-sided p of t = (effect - mean) / (std * sqrt(1 + 1/m)) under Student's t with m - 1 degrees
    of freedom: the prediction-interval test, exact when effect and nulls are iid normal (the plain z-score is
    NOT standard normal for small m: |z| > 1.96 happens far more than 5% of the time at m = 8);
    "rank": one-sided (1 + #{null >= effect}) / (m + 1), exact under exchangeability, no normality, but never
    below 1 / (m + 1): with m nulls it cannot go below 0.05 unless m >= 19}. Positive effects support the
    hypothesis (the module's sign convention). A zero-spread null (all m null effects equal) with effect != their
    value leaves t undefined: "t" is NaN and a "reason" key says why (effect equal to it: t = 0, p_t = 1); the
    rank p-value stays defined.
    """
    null = torch.as_tensor(null_effects, dtype=torch.float64).flatten()
    m = null.numel()
    z = zscore(effect, null)  # checks m >= 2 and finiteness
    p_rank = (1 + int((null >= effect).sum())) / (m + 1)
    if math.isnan(z):
        return {"t": math.nan, "rank": p_rank, "reason": f"zero-spread null: all {m} null effects equal "
                f"{float(null[0]):.6g} and the effect differs, so t is undefined"}  # fmt: skip
    t = z / math.sqrt(1 + 1 / m)
    return {"t": float(2 * student_t.sf(abs(t), m - 1)), "rank": p_rank}


def pvalue_definitions(m: int) -> dict[str, str]:
    """What `null_pvalues` computes with m null directions, in words (for result files)."""
    return {
        "t": f"two-sided p of t = (score - mean(null)) / (std(null, ddof 1) * sqrt(1 + 1/m)) under Student's t "
        f"with m - 1 degrees of freedom (m = {m}); null (with a reason) when the null scores have zero spread",
        "rank": f"one-sided (1 + #{{null >= score}}) / (m + 1); with m = {m} it is >= {1 / (m + 1):.4g}",
    }


def _mean(samples: torch.Tensor) -> torch.Tensor:
    return samples.mean(-1)


def bootstrap_ci(
    values: torch.Tensor,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    statistic: Callable[[torch.Tensor], torch.Tensor] = _mean,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (1 - alpha) of statistic(values).

    Args:
        values: [n] (e.g. per-prompt NLL changes).
        statistic: reduces the LAST axis: [n_boot, n] -> [n_boot] (default: mean; e.g.
            `lambda x: x.median(-1).values`).
    Returns:
        (low, high): the alpha/2 and 1 - alpha/2 quantiles (linear interpolation, as numpy.percentile)
        of the statistic over n_boot resamples drawn with replacement, all in float64.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise UserError("bootstrap_ci got no values")
    if not 0.0 < alpha < 1.0 or n_boot < 1:
        raise UserError(f"bootstrap_ci needs 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, values.numel(), (n_boot, values.numel()), generator=generator)  # [n_boot, n]
    stats = statistic(values[index]).to(torch.float64)  # [n_boot]
    low, high = torch.quantile(stats, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(low), float(high)


def _discard_reasons(row: dict, max_layer: float, kl_threshold: float, min_induction: float | None) -> list[str]:
    nan = [key for key in SCORE_KEYS if math.isnan(float(row[key]))]
    if nan:
        return [f"nan {', '.join(nan)}"]
    reasons = []
    if row["layer"] >= max_layer:
        reasons.append(f"layer {row['layer']} >= {max_layer:g}")
    if row["kl"] > kl_threshold:
        reasons.append(f"kl {row['kl']:.4g} > {kl_threshold:g}")
    if min_induction is not None and row["induction_score"] < min_induction:
        reasons.append(f"induction_score {row['induction_score']:.4g} < {min_induction:g}")
    return reasons


def select_direction(
    table: list[dict],
    *,
    n_layers: int,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    min_induction_score: float | None = 0.0,
) -> tuple[dict | None, list[dict]]:
    """Pick the candidate direction whose ablation hurts reasoning most among those passing the filters.

    Args:
        table: one dict per candidate with "position", "layer", "ablation_score", "induction_score", "kl"
            (signs as in the module docstring); other keys are kept.
        n_layers: the model's depth. Candidates at layer >= max_layer_fraction * n_layers are discarded
            (late layers mostly act on the output vocabulary, not on the computation).
        kl_threshold: discard when kl > kl_threshold.
        min_induction_score: discard when induction_score < min_induction_score; None = never.
    Returns:
        (best, annotated): best is a copy of the winning row (highest ablation_score, first in table order on
        ties) or None when every candidate was discarded; annotated has a copy of every row with
        "filtered": None (kept) or the reasons it was discarded ("; "-joined), and "selected": bool.
    """
    if not table:
        raise UserError("select_direction got an empty candidate table")
    max_layer = max_layer_fraction * n_layers
    annotated, best = [], None
    for i, row in enumerate(table):
        missing = [key for key in ("position", "layer", *SCORE_KEYS) if key not in row]
        if missing:
            raise UserError(f"candidate {i} lacks {', '.join(missing)}")
        reasons = _discard_reasons(row, max_layer, kl_threshold, min_induction_score)
        entry = {**row, "filtered": "; ".join(reasons) or None, "selected": False}
        annotated.append(entry)
        if not reasons and (best is None or entry["ablation_score"] > best["ablation_score"]):
            best = entry
    if best is None:
        return None, annotated
    best["selected"] = True
    return dict(best), annotated


# ---- the protocol: choose on one set of problems, report on another ---------------------------------------------
PER_PROMPT_KEYS = {"ablation_score": "ablation_per_prompt", "induction_score": "induction_per_prompt",
                   "kl": "kl_per_prompt"}  # fmt: skip

# scorer(directions [k, d_model], layers [k], problems) -> k dicts holding the three scores (means over the
# problems' prompts) and their per-prompt float64 tensors (PER_PROMPT_KEYS), scored at each direction's layer.
Scorer = Callable[[torch.Tensor, Sequence[int], Sequence], list[dict]]
# null_factory(selected row, r [d_model]) -> null directions [n_null, d_model] at the selected (position, layer).
NullFactory = Callable[[dict, torch.Tensor], torch.Tensor]
# null_candidates(draw j) -> NULL candidates [n_pos, n_model_layers, d_model]: one null direction at every site
# searched (e.g. placebo contrasts of one random split of the train rows, the same split for every site).
NullCandidates = Callable[[int], torch.Tensor]


def split_selection_report(n_problems: int, n_selection: int, n_report: int, seed: int = 0) -> tuple[list, list]:
    """Two disjoint seeded sets of problem indices: (selection, report), each sorted.

    A seeded permutation of range(n_problems); its first n_selection entries are the selection set, the next
    n_report the report set. When n_problems < n_selection + n_report both sets shrink in proportion:
    n_selection' = clamp(int(n_problems * n_selection / (n_selection + n_report) + 0.5), 1, n_problems - 1),
    n_report' = n_problems - n_selection'. Fewer than 2 problems: UserError.
    """
    if n_selection < 1 or n_report < 1:
        raise UserError(f"need n_selection >= 1 and n_report >= 1, got {n_selection}, {n_report}")
    if n_problems < 2:
        raise UserError(f"{n_problems} val problem(s): choosing a direction on one set and reporting it on another "
                        "needs at least 2 (raise prompts.val_fraction or the source limits)")  # fmt: skip
    if n_problems < n_selection + n_report:
        share = int(n_problems * n_selection / (n_selection + n_report) + 0.5)
        n_selection = min(max(share, 1), n_problems - 1)
        n_report = min(n_problems - n_selection, n_report)
    order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n_selection]), sorted(order[n_selection : n_selection + n_report])


def _select_on(
    candidates: torch.Tensor, layers: Sequence[int], problems: Sequence, scorer: Scorer, **rule
) -> tuple[dict | None, list[dict]]:
    """Score every candidate (position p, layer l in `layers`) of candidates [n_pos, n_model_layers, d_model] on
    `problems` and choose with `select_direction(**rule)`: (best, annotated table)."""
    keys = [(p, layer) for p in range(candidates.shape[0]) for layer in layers]  # position-major
    stacked = torch.stack([candidates[p, layer] for p, layer in keys])  # [n_candidates, d_model]
    rows = scorer(stacked, [layer for _, layer in keys], problems)
    for i, ((p, layer), row) in enumerate(zip(keys, rows)):
        row.update(candidate=i, position=p, layer=layer, norm=float(stacked[i].to(torch.float64).norm()))
    return select_direction(rows, **rule)


def searched_null(
    null_candidates: NullCandidates,
    layers: Sequence[int],
    problems: Sequence,
    scorer: Scorer,
    *,
    selection_idx: Sequence[int],
    report_idx: Sequence[int],
    n_null: int,
    n_layers: int | None = None,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    min_induction_score: float | None = 0.0,
) -> list[dict]:
    """Max-statistic null for a selected direction: the report scores of the winners of n_null null searches.

    Draw j = 0 .. n_null - 1: `null_candidates(j)` gives null candidates [n_pos, n_model_layers, d_model], one per
    searched site. They go through exactly what the real candidates went through: every (position p, layer l in
    `layers`) is scored by `scorer` on the SELECTION problems, `select_direction` (n_layers default
    null_candidates(j).shape[1], max_layer_fraction, kl_threshold, min_induction_score) picks the winner; then the winners of all draws
    are scored together, each at its own layer, on the REPORT problems. Each winner's report score is one draw of
    "the best of as many null candidates as were searched, re-scored on new problems", the statistic the selected
    direction's report score is; when the real candidates are no better than null candidates (exchangeable with
    them), the selected direction's report score and the winners' are exchangeable.
    Cost: n_null x the selection scoring (one scorer call per draw, as many directions as candidates, on the
    selection problems) + one report call with at most n_null directions.
    Returns:
        the scorer's report-problem row of each draw's winner, in draw order, with "draw" (j), "position",
        "layer" and "selection_ablation_score" (the winner's selection-set score) added. A draw whose candidates
        were all discarded has no winner and no row (the real search reports nothing in that case either).
    """
    if n_null < 0:
        raise UserError(f"n_null must be >= 0, got {n_null}")
    if set(selection_idx) & set(report_idx):
        raise UserError("searched_null needs disjoint selection and report problems")
    selection = [problems[i] for i in selection_idx]
    winners = []  # (draw, best row, direction [d_model])
    for j in range(n_null):
        draw = torch.as_tensor(null_candidates(j))
        if draw.ndim != 3:
            raise UserError(f"null_candidates({j}) must be [n_pos, n_model_layers, d_model], got {tuple(draw.shape)}")
        best, _ = _select_on(draw, layers, selection, scorer, n_layers=n_layers or draw.shape[1],
                             max_layer_fraction=max_layer_fraction, kl_threshold=kl_threshold,
                             min_induction_score=min_induction_score)  # fmt: skip
        if best is not None:
            winners.append((j, best, draw[best["position"], best["layer"]].detach().cpu().float()))
    if not winners:
        return []
    directions = torch.stack([direction for _, _, direction in winners])  # [n_winners, d_model]
    rows = scorer(directions, [best["layer"] for _, best, _ in winners], [problems[i] for i in report_idx])
    for (j, best, _), row in zip(winners, rows):
        row.update(draw=j, position=best["position"], layer=best["layer"],
                   selection_ablation_score=float(best["ablation_score"]))  # fmt: skip
    return rows


def _against(chosen: dict, null_rows: list[dict]) -> tuple[list[dict], dict | None, dict | None]:
    """(null scores, zscores, pvalues) of the chosen row's scores among null rows' (None for < 2 null rows)."""
    null = [{key: float(row[key]) for key in SCORE_KEYS} for row in null_rows]
    if len(null) < 2:
        return null, None, None
    scores = {key: torch.tensor([row[key] for row in null], dtype=torch.float64) for key in SCORE_KEYS}
    zscores = {key: zscore(float(chosen[key]), scores[key]) for key in SCORE_KEYS}
    pvalues = {key: null_pvalues(float(chosen[key]), scores[key]) for key in SCORE_KEYS}
    return null, zscores, pvalues


@dataclass
class SelectionResult:
    """What `select_reasoning_direction` did. Selection-set numbers only choose; report-set numbers are the result.

    selection_problems / report_problems: indices into the `problems` given (disjoint, sorted).
    table: `select_direction`'s annotated rows, scores = means over the SELECTION problems, per-prompt tensors kept.
    selected: copy of the winning row (selection-set scores), None when every candidate was discarded.
    report: None when nothing was selected, else the selected direction re-scored on the REPORT problems:
        {"scores": {key: mean over report prompts}, "per_prompt": {key: float64 tensor},
         "ci": {key: [low, high]} percentile bootstrap (1 - alpha) of that mean (`bootstrap_ci`, seed),
         "null": [{key: score} per null direction, on the report problems],
         "zscores": {key: zscore(report score, null scores)} or None (fewer than 2 null directions),
         "pvalues": {key: null_pvalues(report score, null scores)} ({"t", "rank"}) or None,
         "searched_null": None (no searched_null_candidates) or [{"draw", "position", "layer", key: score} per
             searched-null winner (`searched_null`), scores on the report problems],
         "searched_zscores": {key: zscore(report score, searched-null scores)} or None (fewer than 2 winners),
         "searched_pvalues": {key: null_pvalues(report score, searched-null scores)} or None}
    null_directions: float32 [n_null, d_model] or None.
    """

    selection_problems: list[int]
    report_problems: list[int]
    table: list[dict]
    selected: dict | None
    report: dict | None
    null_directions: torch.Tensor | None


def select_reasoning_direction(
    candidates: torch.Tensor,
    layers: Sequence[int],
    problems: Sequence,
    scorer: Scorer,
    *,
    n_selection: int,
    n_report: int | None = None,
    seed: int = 0,
    n_layers: int | None = None,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
    min_induction_score: float | None = 0.0,
    null_factory: NullFactory | None = None,
    searched_null_candidates: NullCandidates | None = None,
    n_searched_null: int = 19,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
) -> SelectionResult:
    """Choose a candidate direction on one set of problems and report its effect on a disjoint one.

    1. `split_selection_report(len(problems), n_selection, n_report (default n_selection), seed)`.
    2. Every candidate (position p, layer l in `layers`; candidates [n_pos, n_model_layers, d_model]) is scored
       by `scorer` on the selection problems; `select_direction` (n_layers default candidates.shape[1],
       max_layer_fraction, kl_threshold, min_induction_score) picks one from these scores.
    3. The selected r = candidates[p, l] and the null directions `null_factory(selected, r)` are scored together
       at layer l on the report problems: z-scores of r's report scores among the nulls' (`zscore`, ddof 1) and
       bootstrap CIs of r's report per-prompt values. No report problem takes part in choosing.
    4. With `searched_null_candidates` (each draw shaped like `candidates`): r's report scores are also compared
       with the max-statistic null `searched_null(searched_null_candidates, ..., n_null=n_searched_null)` on the
       same selection and report problems ("searched_zscores", "searched_pvalues"). The site nulls of step 3 never
       went through the maximum over candidates, so when effects differ between directions they understate how
       well a selected direction does on new problems; the searched null does not. Cost: (n_searched_null + 1) x
       the selection scoring. Its rank p-value is never below 1 / (n_searched_null + 1).
    """
    candidates = torch.as_tensor(candidates)
    if candidates.ndim != 3:
        raise UserError(f"candidates must be [n_pos, n_model_layers, d_model], got {tuple(candidates.shape)}")
    selection_idx, report_idx = split_selection_report(len(problems), n_selection, n_report or n_selection, seed)
    rule = dict(n_layers=n_layers or candidates.shape[1], max_layer_fraction=max_layer_fraction,
                kl_threshold=kl_threshold, min_induction_score=min_induction_score)  # fmt: skip
    best, table = _select_on(candidates, layers, [problems[i] for i in selection_idx], scorer, **rule)
    if best is None:
        return SelectionResult(selection_idx, report_idx, table, None, None, None)
    r = candidates[best["position"], best["layer"]]  # [d_model]
    nulls = None if null_factory is None else torch.as_tensor(null_factory(best, r)).detach().cpu().float()
    scored = torch.cat([r[None].cpu().float(), nulls]) if nulls is not None else r[None]  # [1 + n_null, d_model]
    report_rows = scorer(scored, [best["layer"]] * len(scored), [problems[i] for i in report_idx])
    chosen = report_rows[0]
    null, zscores, pvalues = _against(chosen, report_rows[1:])
    searched = searched_zscores = searched_pvalues = None
    if searched_null_candidates is not None:

        def like_candidates(j: int) -> torch.Tensor:
            draw = torch.as_tensor(searched_null_candidates(j))
            if draw.shape != candidates.shape:
                raise UserError(f"searched_null_candidates({j}) has shape {tuple(draw.shape)}, "
                                f"the candidates {tuple(candidates.shape)}")  # fmt: skip
            return draw

        winners = searched_null(like_candidates, layers, problems, scorer, selection_idx=selection_idx,
                                report_idx=report_idx, n_null=n_searched_null, **rule)  # fmt: skip
        scores, searched_zscores, searched_pvalues = _against(chosen, winners)
        searched = [{"draw": row["draw"], "position": row["position"], "layer": row["layer"], **score}
                    for row, score in zip(winners, scores)]  # fmt: skip
    per_prompt = {key: torch.as_tensor(chosen[PER_PROMPT_KEYS[key]], dtype=torch.float64) for key in SCORE_KEYS}
    report = {
        "scores": {key: float(chosen[key]) for key in SCORE_KEYS},
        "per_prompt": per_prompt,
        "ci": {key: list(bootstrap_ci(values, n_boot=n_bootstrap, alpha=alpha, seed=seed))
               for key, values in per_prompt.items()},
        "null": null,
        "zscores": zscores,
        "pvalues": pvalues,
        "searched_null": searched,
        "searched_zscores": searched_zscores,
        "searched_pvalues": searched_pvalues,
    }  # fmt: skip
    return SelectionResult(selection_idx, report_idx, table, best, report, nulls)
