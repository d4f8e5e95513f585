"""Choosing among candidate directions, and the statistics that say whether an effect is real.

Pure functions on numbers and score tables; nothing here calls a model.

Selection adapts refusal_direction (Arditi et al. 2024) to reasoning. One candidate per (position, layer),
scored with the gold-solution NLL (`interp.metrics.gold_solution_nll`, higher = worse reasoning). SIGN
CONVENTION: both scores are signed so that POSITIVE supports "this is a reasoning direction":
    ablation_score   mean over reasoning prompts of NLL(direction ablated) - NLL(baseline):
                     > 0 when removing the direction HURTS reasoning. Highest wins.
    induction_score  mean over control prompts of NLL(baseline) - NLL(direction added) (or the caller's
                     metric, signed the same way): > 0 when adding the direction moves the control prompts
                     toward reasoning. Candidates with induction_score < 0 are discarded.
    kl               mean KL(baseline || ablated) of the last-token distribution on control prompts: how much
                     ablation disturbs behaviour unrelated to reasoning. Discarded above kl_threshold.
(refusal_direction's "lowest ablation score wins" is the same rule: its score is refusal log-odds, which
ablation should lower; ours is NLL, which ablation should raise.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from interp.errors import UserError

_SCORE_KEYS = ("ablation_score", "induction_score", "kl")


def zscore(effect: float, null_effects: torch.Tensor) -> float:
    """(effect - mean(null)) / std(null) with the unbiased std (ddof=1).

    A null with zero spread gives 0.0 when effect equals its mean and +-inf otherwise.
    """
    null = torch.as_tensor(null_effects, dtype=torch.float64).flatten()
    if null.numel() < 2:
        raise UserError(f"zscore needs at least 2 null effects, got {null.numel()}")
    if not bool(torch.isfinite(null).all()) or not math.isfinite(effect):
        raise UserError("zscore got a non-finite effect or null effect")
    mean, std = float(null.mean()), float(null.std(unbiased=True))
    if std == 0.0:
        return 0.0 if effect == mean else math.copysign(math.inf, effect - mean)
    return (effect - mean) / std


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


def _discard_reasons(row: dict, max_layer: float, kl_threshold: float) -> list[str]:
    nan = [key for key in _SCORE_KEYS if math.isnan(float(row[key]))]
    if nan:
        return [f"nan {', '.join(nan)}"]
    reasons = []
    if row["layer"] >= max_layer:
        reasons.append(f"layer {row['layer']} >= {max_layer:g}")
    if row["kl"] > kl_threshold:
        reasons.append(f"kl {row['kl']:.4g} > {kl_threshold:g}")
    if row["induction_score"] < 0:
        reasons.append(f"induction_score {row['induction_score']:.4g} < 0")
    return reasons


def select_direction(
    table: list[dict],
    *,
    n_layers: int,
    max_layer_fraction: float = 0.8,
    kl_threshold: float = 0.1,
) -> tuple[dict | None, list[dict]]:
    """Pick the candidate direction whose ablation hurts reasoning most among those passing the filters.

    Args:
        table: one dict per candidate with "position", "layer", "ablation_score", "induction_score", "kl"
            (signs as in the module docstring); other keys are kept.
        n_layers: the model's depth. Candidates at layer >= max_layer_fraction * n_layers are discarded
            (late layers mostly act on the output vocabulary, not on the computation).
        kl_threshold: discard when kl > kl_threshold.
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
        missing = [key for key in ("position", "layer", *_SCORE_KEYS) if key not in row]
        if missing:
            raise UserError(f"candidate {i} lacks {', '.join(missing)}")
        reasons = _discard_reasons(row, max_layer, kl_threshold)
        entry = {**row, "filtered": "; ".join(reasons) or None, "selected": False}
        annotated.append(entry)
        if not reasons and (best is None or entry["ablation_score"] > best["ablation_score"]):
            best = entry
    if best is None:
        return None, annotated
    best["selected"] = True
    return dict(best), annotated
