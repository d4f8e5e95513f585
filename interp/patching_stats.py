"""What a patching sweep reports: the fraction of a metric's gap recovered, as a ratio of means over pairs.

Pair i is (reasoning prompt, control prompt); metric values are `reasoning[i]` (the clean run), `control[i]`
(the corrupt run) and `patched[i, l, k]` (the control run with the reasoning run's `blocks.{l}.resid_post`
at post-instruction token k written in). The headline is a ratio of means, never a mean of per-pair ratios:
one pair with a tiny gap would otherwise dominate (a pair recovering 0.5 next to a pair with gap 1e-3 averages
to ~25). Per-pair ratios are kept as a clearly named diagnostic only.

Also here: the metric factories the sweeps take (`logit_difference`, `target_log_prob`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from interp.errors import UserError
from interp.selection import bootstrap_ci

MetricFn = Callable[[torch.Tensor, dict], torch.Tensor]  # (logits_last [batch, vocab], batch_info) -> [batch]

DEFINITION = (
    "recovered[l, k] = (mean_i patched[i, l, k] - mean_i control[i]) / (mean_i reasoning[i] - mean_i control[i]), "
    "means over all pairs i (a ratio of means); NaN (cut) when |mean_i (reasoning[i] - control[i])| <= "
    "rel_tol * mean_i |reasoning[i] - control[i]|; CI: percentile bootstrap over pairs (resample pairs with "
    "replacement, recompute the ratio of means with the same cutoff; NaN if any resample is cut)"
)


# --------------------------------------------------------------------------------------------- ratio of means


def ratio_of_means(
    metric_r: torch.Tensor, metric_c: torch.Tensor, metric_patched: torch.Tensor, rel_tol: float
) -> torch.Tensor:
    """(mean patched - mean control) / (mean reasoning - mean control) over the LAST axis (pairs), NaN when cut.

    metric_r, metric_c: [..., n]; metric_patched: [..., n] (cells in front, e.g. [n_boot, n]) float64.
    Cut: |mean gap| <= rel_tol * mean |gap| (the pairs' gaps are zero or mostly cancel).
    """
    ratio = (metric_patched.mean(-1) - metric_c.mean(-1)) / (metric_r.mean(-1) - metric_c.mean(-1))
    return torch.where(_kept(metric_r, metric_c, rel_tol), ratio, torch.full_like(ratio, float("nan")))


def _kept(metric_r: torch.Tensor, metric_c: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """[..., n] -> [...] bool: |mean gap| > rel_tol * mean |gap| (False for all-zero gaps, whatever rel_tol)."""
    mean_gap = metric_r.mean(-1) - metric_c.mean(-1)
    return mean_gap.abs() > rel_tol * (metric_r - metric_c).abs().mean(-1)


def _ci(metric_r, metric_c, metric_patched, rel_tol, n_boot, alpha, seed) -> tuple[torch.Tensor, ...]:
    """Percentile bootstrap CI over pairs of every cell's ratio of means: [n_layers, n_post] low and high.

    Each cell calls `bootstrap_ci` on the pair indices with the same seed, so every cell sees the same resamples.
    A cell's bounds are NaN when any resample is cut (torch.quantile propagates NaN).
    """
    n = metric_r.numel()
    pair_ids = torch.arange(n, dtype=torch.float64)  # bootstrap_ci resamples these: [n_boot, n] index draws
    low = torch.full(metric_patched.shape[1:], float("nan"), dtype=torch.float64)
    high = low.clone()
    for cell in itertools.product(*map(range, low.shape)):
        patched = metric_patched[(slice(None), *cell)]  # [n]

        def statistic(draws: torch.Tensor, patched=patched) -> torch.Tensor:  # draws: [n_boot, n] pair ids
            index = draws.long()
            return ratio_of_means(metric_r[index], metric_c[index], patched[index], rel_tol)

        low[cell], high[cell] = bootstrap_ci(pair_ids, n_boot, alpha, seed, statistic)
    return low, high


# --------------------------------------------------------------------------------------------- result


@dataclass
class PatchingResult:
    """A layer x post-instruction-token heatmap of the fraction of the reasoning-control gap recovered.

    recovered[l, k] = (mean_i patched[i, l, k] - mean_i control[i]) / (mean_i reasoning[i] - mean_i control[i])
    over ALL pairs i, where patched is the control run with the reasoning run's `blocks.{layers[l]}.resid_post`
    at post-instruction token k written in (exact), or its first-order estimate (attribution).
    Cutoff (relative, shift- and scale-free like the ratio itself): the cell is NaN and `cut` when
    |mean gap| <= rel_tol * gap_scale, gap_scale = mean_i |reasoning[i] - control[i]|; i.e. the pairs' gaps
    are all zero or cancel to under rel_tol of their typical size, so the denominator is noise.
    ci_low / ci_high: percentile bootstrap (level 1 - alpha, n_boot resamples of the PAIRS with replacement,
    seeded; `interp.selection.bootstrap_ci`) of the same ratio of means with the same cutoff per resample;
    NaN where the cell is cut or where any resample is cut (the ratio is then unstable under resampling).
    per_pair_ratio[i, l, k] = (patched[i, l, k] - control[i]) / (reasoning[i] - control[i]): a DIAGNOSTIC
    only (never averaged into `recovered`), NaN where |reasoning[i] - control[i]| <= rel_tol * gap_scale.
    """

    recovered: torch.Tensor  # [n_layers, n_post] float64, NaN where cut
    ci_low: torch.Tensor  # [n_layers, n_post] float64
    ci_high: torch.Tensor  # [n_layers, n_post] float64
    cut: torch.Tensor  # [n_layers, n_post] bool: cells left NaN by the cutoff
    cut_reason: str | None  # why cells were cut (None when none were)
    ci_reason: str | None  # why uncut cells have no CI (None when all have one)
    mean_gap: float  # mean_i (reasoning[i] - control[i])
    gap_scale: float  # mean_i |reasoning[i] - control[i]|
    rel_tol: float
    per_pair_ratio: torch.Tensor  # [n_pairs, n_layers, n_post] float64 diagnostic, NaN for tiny per-pair gaps
    metric_patched: torch.Tensor  # [n_pairs, n_layers, n_post] float64 (exact: NaN where cut and not run)
    metric_reasoning: torch.Tensor  # [n_pairs] float64
    metric_control: torch.Tensor  # [n_pairs] float64
    layers: list[int]
    post_tokens: list[str]  # the template's post-instruction tokens, the heatmap's columns
    method: str  # "exact" | "attribution"
    n_boot: int
    alpha: float
    seed: int

    @property
    def cutoff(self) -> float:
        """The absolute threshold used: a cell is cut when |mean_gap| <= cutoff."""
        return self.rel_tol * self.gap_scale

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN -> None)."""

        def clean(values):
            if isinstance(values, list):
                return [clean(v) for v in values]
            return None if isinstance(values, float) and values != values else values

        return {
            "definition": DEFINITION, "method": self.method, "layers": self.layers, "post_tokens": self.post_tokens,
            "recovered": clean(self.recovered.tolist()), "recovered_ci_low": clean(self.ci_low.tolist()),
            "recovered_ci_high": clean(self.ci_high.tolist()), "ci_level": 1.0 - self.alpha,
            "n_bootstrap": self.n_boot, "bootstrap_seed": self.seed, "ci_reason": self.ci_reason,
            "mean_gap": self.mean_gap, "gap_scale": self.gap_scale, "rel_tol": self.rel_tol, "cutoff": self.cutoff,
            "cut": self.cut.tolist(), "cut_reason": self.cut_reason, "n_pairs": int(self.metric_control.numel()),
            "metric_reasoning": self.metric_reasoning.tolist(), "metric_control": self.metric_control.tolist(),
            "metric_patched": clean(self.metric_patched.tolist()), "per_pair_ratio": clean(self.per_pair_ratio.tolist()),
        }  # fmt: skip


def check_summary_settings(rel_tol: float, n_boot: int, alpha: float = 0.05) -> None:
    if not 0.0 <= rel_tol < 1.0:  # |mean gap| <= mean |gap| always: rel_tol >= 1 would cut everything
        raise UserError(f"rel_tol must be in [0, 1), got {rel_tol}")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise UserError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")


def mean_gap_is_cut(metric_r: torch.Tensor, metric_c: torch.Tensor, rel_tol: float) -> bool:
    """True when the ratio of means is undefined: |mean gap| <= rel_tol * mean |gap| (metrics [n_pairs])."""
    return not bool(_kept(metric_r.double(), metric_c.double(), rel_tol))


def summarise(
    method: str,
    metric_r: torch.Tensor,
    metric_c: torch.Tensor,
    metric_patched: torch.Tensor,
    layers: list[int],
    post_tokens: list[str],
    rel_tol: float = 0.1,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PatchingResult:
    """The `PatchingResult` of metric_r, metric_c [n_pairs] and metric_patched [n_pairs, n_layers, n_post]."""
    check_summary_settings(rel_tol, n_boot, alpha)
    metric_r, metric_c, metric_patched = (t.double().cpu() for t in (metric_r, metric_c, metric_patched))
    gap = metric_r - metric_c  # [n_pairs]
    mean_gap, gap_scale = float(metric_r.mean() - metric_c.mean()), float(gap.abs().mean())
    # [n_layers, n_post, n_pairs]: pairs on the last axis, as ratio_of_means reduces
    recovered = ratio_of_means(metric_r, metric_c, metric_patched.permute(1, 2, 0), rel_tol)
    is_cut = mean_gap_is_cut(metric_r, metric_c, rel_tol)  # one denominator: every cell is cut or none is
    cut, cut_reason = torch.full(recovered.shape, is_cut), None
    if is_cut:  # no point estimate, so no interval either (though some resamples might pass the cutoff)
        cut_reason = (
            f"|mean reasoning - control gap| = {abs(mean_gap):.4g} <= rel_tol {rel_tol:g} x mean |per-pair gap| "
            f"{gap_scale:.4g}: the pairs' gaps are zero or cancel, so no fraction of them can be recovered"
        )
        ci_low, ci_high = recovered.clone(), recovered.clone()
    else:
        ci_low, ci_high = _ci(metric_r, metric_c, metric_patched, rel_tol, n_boot, alpha, seed)
    no_ci = ~cut & (ci_low.isnan() | ci_high.isnan())
    ci_reason = None
    if bool(no_ci.any()):
        ci_reason = (
            f"{int(no_ci.sum())} uncut cells have no CI: some bootstrap resamples of the pairs fall under the "
            "cutoff (the ratio is unstable under resampling)"
        )
    per_pair_ok = gap.abs() > rel_tol * gap_scale  # [n_pairs]
    per_pair = (metric_patched - metric_c[:, None, None]) / gap[:, None, None]
    per_pair = torch.where(per_pair_ok[:, None, None], per_pair, torch.full_like(per_pair, float("nan")))
    return PatchingResult(
        recovered, ci_low, ci_high, cut, cut_reason, ci_reason, mean_gap, gap_scale, rel_tol, per_pair,
        metric_patched, metric_r, metric_c, layers, post_tokens, method, n_boot, alpha, seed,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- metrics


def logit_difference(token_a: int | Sequence[int], token_b: int | Sequence[int]) -> MetricFn:
    """metric_fn: logit[token_a] - logit[token_b] at the last position (ids per pair or one for all)."""
    a, b = torch.as_tensor(token_a).long(), torch.as_tensor(token_b).long()

    def metric(logits: torch.Tensor, info: dict) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        ia = (a[info["pair_index"]] if a.dim() else a.expand(logits.shape[0])).to(logits.device)
        ib = (b[info["pair_index"]] if b.dim() else b.expand(logits.shape[0])).to(logits.device)
        return logits[rows, ia] - logits[rows, ib]

    return metric


def target_log_prob(targets: int | Sequence[int]) -> MetricFn:
    """metric_fn: log-probability of the target token at the last position (one id per pair or one for all)."""
    t = torch.as_tensor(targets).long()

    def metric(logits: torch.Tensor, info: dict) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        it = (t[info["pair_index"]] if t.dim() else t.expand(logits.shape[0])).to(logits.device)
        return logits.log_softmax(-1)[rows, it]

    return metric
