"""What a patching sweep reports: the fraction of a metric's gap recovered, as a ratio of means over pairs.

Pair i is (reasoning prompt, control prompt); metric values are `reasoning[i]` (the clean run), `control[i]`
(the corrupt run) and `patched[i, l, k]` (the control run with the reasoning run's `blocks.{l}.resid_post`
at post-instruction token k written in). The headline is a ratio of means, never a mean of per-pair ratios:
one pair with a tiny gap would otherwise dominate (a pair recovering 0.5 next to a pair with gap 1e-3 averages
to ~25). Per-pair ratios are kept as a clearly named diagnostic only. Its CI is Fieller's interval for a ratio
of two paired means (exact when the pairs' (patched - control, reasoning - control) are bivariate normal).

Also here: the metric factories the sweeps take (`logit_difference`, `target_log_prob`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from scipy import stats

from interp.errors import UserError

MetricFn = Callable[[torch.Tensor, dict], torch.Tensor]  # (logits_last [batch, vocab], batch_info) -> [batch]

DEFINITION = (
    "recovered[l, k] = (mean_i patched[i, l, k] - mean_i control[i]) / (mean_i reasoning[i] - mean_i control[i]), "
    "means over all pairs i (a ratio of means); NaN (cut) when |mean_i (reasoning[i] - control[i])| <= "
    "rel_tol * mean_i |reasoning[i] - control[i]|; CI (level 1 - alpha): Fieller's interval for the ratio of the "
    "paired means of a_i = patched[i, l, k] - control[i] and b_i = reasoning[i] - control[i], i.e. every rho with "
    "(mean a - rho mean b)^2 <= (t^2 / n) (s_aa - 2 rho s_ab + rho^2 s_bb), s = sample (co)variances (ddof 1), "
    "t = t_{n-1} quantile at 1 - alpha/2, n = number of pairs; NaN when n < 2 or when that set is unbounded, "
    "i.e. when (mean b)^2 <= t^2 s_bb / n (the mean gap is not significantly non-zero at level alpha)"
)


# --------------------------------------------------------------------------------------------- ratio of means


def ratio_of_means(
    metric_r: torch.Tensor, metric_c: torch.Tensor, metric_patched: torch.Tensor, rel_tol: float
) -> torch.Tensor:
    """(mean patched - mean control) / (mean reasoning - mean control) over the LAST axis (pairs), NaN when cut.

    metric_r, metric_c: [..., n]; metric_patched: [..., n] (cells in front, e.g. [n_layers, n_post, n]) float64.
    Cut: |mean gap| <= rel_tol * mean |gap| (the pairs' gaps are zero or mostly cancel).
    """
    ratio = (metric_patched.mean(-1) - metric_c.mean(-1)) / (metric_r.mean(-1) - metric_c.mean(-1))
    return torch.where(_kept(metric_r, metric_c, rel_tol), ratio, torch.full_like(ratio, float("nan")))


def _kept(metric_r: torch.Tensor, metric_c: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """[..., n] -> [...] bool: |mean gap| > rel_tol * mean |gap| (False for all-zero gaps, whatever rel_tol)."""
    mean_gap = metric_r.mean(-1) - metric_c.mean(-1)
    return mean_gap.abs() > rel_tol * (metric_r - metric_c).abs().mean(-1)


def t_quantile(n: int, alpha: float) -> float:
    """t_{n-1} quantile at 1 - alpha/2 (NaN for n < 2: no degrees of freedom)."""
    return float(stats.t.ppf(1.0 - alpha / 2, n - 1)) if n >= 2 else float("nan")


def fieller_ci(a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fieller's level 1 - alpha interval for mean(a) / mean(b), paired over the LAST axis: low, high [...].

    a, b: [..., n] float64, pair i giving a[..., i] and b[..., i]. The interval is every rho with
    (abar - rho bbar)^2 <= q (s_aa - 2 rho s_ab + rho^2 s_bb), q = t_{n-1, 1-alpha/2}^2 / n (s: ddof 1). It is
    bounded iff A = bbar^2 - q s_bb > 0; else (or n < 2) both bounds are NaN. Solved around rho0 = abar / bbar
    with residuals e = a - rho0 b, rho = rho0 + d: A d^2 + 2 q s_eb d - q s_ee <= 0, whose discriminant
    q^2 s_eb^2 + A q s_ee is a sum of non-negative terms when A > 0 (no cancellation; rho0 lies inside).
    """
    n = a.shape[-1]
    if n < 2:
        nan = torch.full(torch.broadcast_shapes(a.shape, b.shape)[:-1], float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    q = t_quantile(n, alpha) ** 2 / n
    abar, bbar = a.mean(-1), b.mean(-1)  # [...]
    rho0 = abar / bbar
    e = a - rho0[..., None] * b  # [..., n] residuals of the point estimate (mean e = 0 up to rounding)
    e_c, b_c = e - e.mean(-1, keepdim=True), b - bbar[..., None]
    s_ee, s_eb, s_bb = ((x * y).sum(-1) / (n - 1) for x, y in ((e_c, e_c), (e_c, b_c), (b_c, b_c)))
    big_a = bbar**2 - q * s_bb
    root = (q**2 * s_eb**2 + big_a * q * s_ee).clamp(min=0.0).sqrt()
    # the two roots d1 = -(q s_eb + sign(s_eb) root) / A and d2 = (-q s_ee / A) / d1, stable in either sign
    d1 = -(q * s_eb + torch.copysign(root, s_eb)) / big_a
    d2 = torch.where(d1 != 0, -q * s_ee / (big_a * d1), torch.zeros_like(d1))  # d1 = 0 only if s_ee = s_eb = 0
    bounded = big_a > 0
    nan = torch.full_like(rho0, float("nan"))
    low = torch.where(bounded, rho0 + torch.minimum(d1, d2), nan)
    high = torch.where(bounded, rho0 + torch.maximum(d1, d2), nan)
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
    ci_low / ci_high: Fieller's level 1 - alpha interval for the ratio of the paired means of
    a_i = patched[i, l, k] - control[i] and b_i = reasoning[i] - control[i] over the n pairs: every rho with
    (mean a - rho mean b)^2 <= (t^2 / n) (s_aa - 2 rho s_ab + rho^2 s_bb), s the sample (co)variances (ddof 1),
    t = t_quantile = the t_{n-1} quantile at 1 - alpha/2 (`fieller_ci`). Exact under bivariate normality of
    (a_i, b_i), no resampling, no seed. It is bounded iff |mean_gap| > t * mean_gap_se (mean_gap_se =
    sd_i(reasoning[i] - control[i]) / sqrt(n), ddof 1), i.e. the mean gap is significantly non-zero at level
    alpha; otherwise (and when n < 2, or in cut cells) both bounds are NaN, with `ci_reason` saying why. The
    interval has zero width only when every pair recovers exactly the same fraction (a_i = rho b_i for all i).
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
    mean_gap_se: float  # sd_i (reasoning[i] - control[i]) / sqrt(n), ddof 1; NaN for n < 2
    gap_scale: float  # mean_i |reasoning[i] - control[i]|
    rel_tol: float
    per_pair_ratio: torch.Tensor  # [n_pairs, n_layers, n_post] float64 diagnostic, NaN for tiny per-pair gaps
    metric_patched: torch.Tensor  # [n_pairs, n_layers, n_post] float64 (exact: NaN where cut and not run)
    metric_reasoning: torch.Tensor  # [n_pairs] float64
    metric_control: torch.Tensor  # [n_pairs] float64
    layers: list[int]
    post_tokens: list[str]  # the template's post-instruction tokens, the heatmap's columns
    method: str  # "exact" | "attribution"
    alpha: float
    t_quantile: float  # t_{n-1} quantile at 1 - alpha/2 used by the CI; NaN for n < 2

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
            "recovered_ci_high": clean(self.ci_high.tolist()), "ci_method": "fieller", "ci_level": 1.0 - self.alpha,
            "t_quantile": clean(self.t_quantile), "ci_reason": self.ci_reason, "mean_gap": self.mean_gap,
            "mean_gap_se": clean(self.mean_gap_se), "gap_scale": self.gap_scale, "rel_tol": self.rel_tol,
            "cutoff": self.cutoff, "cut": self.cut.tolist(), "cut_reason": self.cut_reason,
            "n_pairs": int(self.metric_control.numel()), "metric_reasoning": self.metric_reasoning.tolist(),
            "metric_control": self.metric_control.tolist(), "metric_patched": clean(self.metric_patched.tolist()),
            "per_pair_ratio": clean(self.per_pair_ratio.tolist()),
        }  # fmt: skip


def check_summary_settings(rel_tol: float, alpha: float = 0.05) -> None:
    if not 0.0 <= rel_tol < 1.0:  # |mean gap| <= mean |gap| always: rel_tol >= 1 would cut everything
        raise UserError(f"rel_tol must be in [0, 1), got {rel_tol}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha (1 - CI level) must be in (0, 1), got {alpha}")


def mean_gap_is_cut(metric_r: torch.Tensor, metric_c: torch.Tensor, rel_tol: float) -> bool:
    """True when the ratio of means is undefined: |mean gap| <= rel_tol * mean |gap| (metrics [n_pairs])."""
    return not bool(_kept(metric_r.double(), metric_c.double(), rel_tol))


def _check_finite(metric_r, metric_c, metric_patched, patched_not_run: bool) -> None:
    """UserError naming the metric values (and pairs) that are NaN or inf; patched is skipped when not run."""
    named = [("reasoning", metric_r), ("control", metric_c)]
    if not patched_not_run:
        named.append(("patched", metric_patched.flatten(1)))  # [n_pairs, n_layers * n_post]
    bad = []
    for name, values in named:
        pairs = (~values.isfinite()).reshape(values.shape[0], -1).any(-1).nonzero().flatten().tolist()
        if pairs:
            shown = ", ".join(map(str, pairs[:10])) + (f", ... ({len(pairs)} pairs)" if len(pairs) > 10 else "")
            bad.append(f"{name} at pairs [{shown}]")
    if bad:
        raise UserError(f"non-finite (NaN/inf) metric values: {'; '.join(bad)}; the metric_fn must return finite values")


def summarise(
    method: str,
    metric_r: torch.Tensor,
    metric_c: torch.Tensor,
    metric_patched: torch.Tensor,
    layers: list[int],
    post_tokens: list[str],
    rel_tol: float = 0.1,
    alpha: float = 0.05,
) -> PatchingResult:
    """The `PatchingResult` of metric_r, metric_c [n_pairs] and metric_patched [n_pairs, n_layers, n_post].

    metric_patched may be all NaN when the mean gap is cut (the exact sweep then runs no patched forward);
    any other NaN / inf metric value raises UserError.
    """
    check_summary_settings(rel_tol, alpha)
    metric_r, metric_c, metric_patched = (t.double().cpu() for t in (metric_r, metric_c, metric_patched))
    is_cut = mean_gap_is_cut(metric_r, metric_c, rel_tol)  # one denominator: every cell is cut or none is
    _check_finite(metric_r, metric_c, metric_patched, is_cut and bool(metric_patched.isnan().all()))
    n = metric_r.numel()
    gap = metric_r - metric_c  # [n_pairs]
    mean_gap, gap_scale = float(metric_r.mean() - metric_c.mean()), float(gap.abs().mean())
    mean_gap_se = float(gap.std() / math.sqrt(n)) if n >= 2 else float("nan")  # ddof 1
    # [n_layers, n_post, n_pairs]: pairs on the last axis, as ratio_of_means and fieller_ci reduce
    recovered = ratio_of_means(metric_r, metric_c, metric_patched.permute(1, 2, 0), rel_tol)
    cut, cut_reason, ci_reason = torch.full(recovered.shape, is_cut), None, None
    t = t_quantile(n, alpha)
    if is_cut:  # no point estimate, so no interval either
        cut_reason = (
            f"|mean reasoning - control gap| = {abs(mean_gap):.4g} <= rel_tol {rel_tol:g} x mean |per-pair gap| "
            f"{gap_scale:.4g}: the pairs' gaps are zero or cancel, so no fraction of them can be recovered"
        )
        ci_low, ci_high = recovered.clone(), recovered.clone()
    else:
        a = metric_patched.permute(1, 2, 0) - metric_c  # [n_layers, n_post, n_pairs]
        ci_low, ci_high = fieller_ci(a, gap.expand_as(a), alpha)
        if n < 2:
            ci_reason = f"the CI needs >= 2 pairs (got {n}): no spread of the pairs to estimate"
        elif bool(ci_low.isnan().any()):  # bounded iff bbar^2 > t^2 s_bb / n: the same for every cell
            ci_reason = (
                f"the mean reasoning - control gap {mean_gap:.4g} is not significantly non-zero at level "
                f"{alpha:g} (|gap| <= t_{n - 1} {t:.4g} x its standard error {mean_gap_se:.4g}): Fieller's "
                f"{100 * (1 - alpha):g}% interval for the ratio is unbounded"
            )
    per_pair_ok = gap.abs() > rel_tol * gap_scale  # [n_pairs]
    per_pair = (metric_patched - metric_c[:, None, None]) / gap[:, None, None]
    per_pair = torch.where(per_pair_ok[:, None, None], per_pair, torch.full_like(per_pair, float("nan")))
    return PatchingResult(
        recovered, ci_low, ci_high, cut, cut_reason, ci_reason, mean_gap, mean_gap_se, gap_scale, rel_tol,
        per_pair, metric_patched, metric_r, metric_c, layers, post_tokens, method, alpha, t,
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
