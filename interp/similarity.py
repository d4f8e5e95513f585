"""Linear CKA (centered kernel alignment) between two sets of representations of the same n examples.

Plain torch, float64 throughout (inputs are cast), no Lightning. Rows are examples, columns are features; X [n, d1]
and Y [n, d2] must describe the same n rows in the same order. Columns are centered first (Xc = X - mean_rows X);
with K = Xc Xc^T and L = Yc Yc^T [n, n]:

- biased (Kornblith et al. 2019): CKA = <K, L>_F / (||K||_F ||L||_F)
  = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).
- debiased (Nguyen et al. 2021): the same ratio of Song et al.'s (2012) unbiased HSIC estimator,
  HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)),
  K~, L~ = K, L with the diagonal set to zero; CKA_u = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)).
  HSIC_u is a U-statistic, invariant to adding a constant to the columns, so centering first changes only
  rounding. With r_i = ||xc_i||^2, s_i = ||yc_i||^2, R = sum r, S = sum s and centered columns (Xc^T 1 = 0),
  tr(K~ L~) = <K, L> - r.s, 1^T K~ 1 = -R, K~ 1 = -r, hence
  n(n-3) HSIC_u = <K, L> - n/(n-2) r.s + R S / ((n-1)(n-2)).

Every quantity above needs only the inner products <K, L> = ||Xc^T Yc||_F^2 and row norms, so there are two
forms giving the same number: the feature form builds Xc^T Yc [d1, d2] (n d1 d2 multiply-adds a pair), the Gram
form builds K, L [n, n] (n^2 d a layer, then n^2 a pair). "auto" takes the one with fewer multiply-adds: for P
layer pairs of L1 + L2 layers, feature iff P d1 d2 <= n (L1 d1 + L2 d2 + P); for one pair that holds whenever
both d < n. At least 4 rows are required in both modes: the unbiased estimator is undefined below 4 (n(n-3)).
"""

from __future__ import annotations

from typing import Literal

import torch

from interp.errors import UserError

Form = Literal["auto", "feature", "gram"]
# Debiased HSIC_u(K, K) is a sum of squares (>= 0), zero exactly when K~ is "U-centered" to zero (e.g. all rows
# but one identical); rounding leaves ~1e-16 of <K, K> / (n(n-3)), so below this share it counts as zero.
_DEGENERATE = 1e-12


def _as_tensor(acts: object, name: str, ndim: int) -> torch.Tensor:
    x = torch.as_tensor(acts)
    if x.ndim != ndim:
        shape = "[n, d]" if ndim == 2 else "[n, n_layers, d]"
        raise UserError(f"CKA needs {name} as {shape}, got shape {tuple(x.shape)}")
    return x


def _centered(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check one side ([n, d] or [n, L, d]) and return it as float64 [n, L, d] with centered columns."""
    layered = x.ndim == 3
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1, x.shape[-1])
    if not torch.isfinite(x).all():
        raise UserError(f"CKA got non-finite values (NaN or inf) in {name}")
    # layers whose every row equals the first (exact, before centering leaves rounding residue)
    constant = (x == x[:1]).flatten(2).all(-1).all(0).nonzero().flatten().tolist()
    if constant:
        where = f" layer(s) {constant}" if layered else ""
        raise UserError(f"CKA is undefined: {name}{where} is constant over the rows (zero variance)")
    return x - x.mean(0)


def _pair(acts1: object, acts2: object, names: tuple[str, str], ndim: int) -> tuple[torch.Tensor, ...]:
    """Validate both sides (same n >= 4 rows) -> centered float64 [n, L1, d1], [n, L2, d2]."""
    a, b = _as_tensor(acts1, names[0], ndim), _as_tensor(acts2, names[1], ndim)
    if len(a) != len(b):
        raise UserError(f"CKA needs the same rows (examples) in {names[0]} and {names[1]}, got n = {len(a)} and "
                        f"{len(b)}")  # fmt: skip
    if len(a) < 4:
        raise UserError(f"CKA needs at least 4 rows (the unbiased HSIC estimator is undefined below 4), got n = "
                        f"{len(a)}")  # fmt: skip
    return _centered(a, names[0]), _centered(b, names[1])


def _kernels(x: torch.Tensor, y: torch.Tensor, form: Form, pairs: bool):
    """(gram, kx, ky): the Gram matrices K [L, n, n] of both sides if the Gram form is used, else x, y themselves.

    "auto" compares multiply-adds (over n): P d1 d2 for the feature form's P pairs (L1 L2, or L1 on the
    diagonal) against L1 d1 + L2 d2 + P for the Gram form."""
    if form not in ("auto", "feature", "gram"):
        raise UserError(f"CKA form must be 'auto', 'feature' or 'gram', got {form!r}")
    (n, l1, d1), (_, l2, d2) = x.shape, y.shape
    p = l1 * l2 if pairs else l1
    gram = form == "gram" or (form == "auto" and p * d1 * d2 > n * (l1 * d1 + l2 * d2 + p))
    return (gram, _gram(x), _gram(y)) if gram else (gram, x, y)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Per-layer Gram matrices: centered x [n, L, d] -> K [L, n, n]."""
    return torch.einsum("ila,jla->lij", x, x)


def _inner(kx: torch.Tensor, ky: torch.Tensor, gram: bool, pairs: bool) -> torch.Tensor:
    """<K_l, L_m>_F = ||x_l^T y_m||_F^2 for every layer pair (pairs=True) -> [L1, L2], or for l == m -> [L]."""
    if gram:
        kx, ky = kx.flatten(1), ky.flatten(1)  # [L1, n*n], [L2, n*n]
        return kx @ ky.T if pairs else torch.einsum("lk,lk->l", kx, ky)
    n, l1, d1 = kx.shape
    l2, d2 = ky.shape[1:]
    if pairs:  # all cross products in one product: [L1 d1, L2 d2]
        cross = kx.reshape(n, l1 * d1).T @ ky.reshape(n, l2 * d2)
        return cross.square_().reshape(l1, d1, l2, d2).sum((1, 3))
    return torch.einsum("nla,nlb->lab", kx, ky).square_().sum((1, 2))


def _hsic(inner: torch.Tensor, rs: torch.Tensor, r_s: torch.Tensor, n: int, debiased: bool) -> torch.Tensor:
    """HSIC from <K, L> (inner), r.s (rs) and R S (r_s), any matching shapes; biased: <K, L> / (n-1)^2."""
    if not debiased:
        return inner / (n - 1) ** 2
    return (inner - n / (n - 2) * rs + r_s / ((n - 1) * (n - 2))) / (n * (n - 3))


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms r [n, L] of x [n, L, d]."""
    return x.square().sum(-1)


def _self_hsic(k: torch.Tensor, r: torch.Tensor, gram: bool, debiased: bool, name: str, layered: bool = True):
    """HSIC(K_l, K_l) per layer [L] from a side's kernel and row norms; raises where the debiased one is zero."""
    n = len(r)
    inner = _inner(k, k, gram, pairs=False)
    hsic = _hsic(inner, r.square().sum(0), r.sum(0).square(), n, debiased)
    bad = (hsic <= _DEGENERATE * inner / (n * (n - 3))).nonzero().flatten().tolist() if debiased else []
    if bad:
        where = f"{name} layer(s) {bad} have" if layered else f"{name} has"
        raise UserError(f"debiased CKA is undefined: {where} zero unbiased HSIC with itself (e.g. all rows but one "
                        "identical)")  # fmt: skip
    return hsic


def _cross_hsic(kx, ky, rx, ry, gram: bool, debiased: bool, pairs: bool) -> torch.Tensor:
    """HSIC(K_l, L_m): [L1, L2] for all pairs, or [L] for l == m."""
    if pairs:
        rs, r_s = rx.T @ ry, rx.sum(0)[:, None] * ry.sum(0)[None, :]
    else:
        rs, r_s = (rx * ry).sum(0), rx.sum(0) * ry.sum(0)
    return _hsic(_inner(kx, ky, gram, pairs), rs, r_s, len(rx), debiased)


def _terms(x, y, debiased: bool, form: Form, names: tuple[str, str], pairs: bool, layered: bool = True):
    """(HSIC(x, y) [L1, L2] or [L], HSIC(x, x) [L1], HSIC(y, y) [L2]) of centered [n, L, d] inputs."""
    gram, kx, ky = _kernels(x, y, form, pairs)
    rx, ry = _row_norms(x), _row_norms(y)
    xx = _self_hsic(kx, rx, gram, debiased, names[0], layered)
    yy = _self_hsic(ky, ry, gram, debiased, names[1], layered)
    return _cross_hsic(kx, ky, rx, ry, gram, debiased, pairs), xx, yy


def linear_cka(X: torch.Tensor, Y: torch.Tensor, debiased: bool = False, *, form: Form = "auto") -> float:
    """Linear CKA of X [n, d1] and Y [n, d2] (rows = the same examples), biased or debiased (module docstring).

    Needs n >= 4 in both modes (the unbiased estimator is undefined below 4); raises UserError on mismatched n,
    non-2D input, non-finite values or a constant side. form: "auto" (the cheaper of the two), "feature"
    (d1 x d2 products, O(n d1 d2)) or "gram" (n x n Gram matrices, O(n^2 (d1 + d2))); both give the same value.
    """
    x, y = _pair(X, Y, ("X", "Y"), ndim=2)
    xy, xx, yy = _terms(x, y, debiased, form, ("X", "Y"), pairs=True, layered=False)
    return float(xy[0, 0] / (xx[0] * yy[0]).sqrt())


def cka_matrix(
    acts1: torch.Tensor, acts2: torch.Tensor, debiased: bool = False, *, form: Form = "auto"
) -> torch.Tensor:
    """CKA of every layer pair: acts1 [n, L1, d1], acts2 [n, L2, d2] -> [L1, L2] float64, in one batched pass.

    Equal to linear_cka(acts1[:, i], acts2[:, j], debiased) for every (i, j), same errors. Feature form: one
    [n, L1 d1]^T [n, L2 d2] matrix product, then squared block sums. Gram form: per-layer Gram matrices [L, n, n]
    flattened to [L, n^2] and one [L1, n^2] x [n^2, L2] product; "auto" takes the one with fewer multiply-adds
    (module docstring). Memory, in float64 (8 bytes): the centered inputs n (L1 d1 + L2 d2), plus L1 L2 d1 d2
    (feature) or (L1 + L2) n^2 (Gram), and a transient copy of one side's input while casting, centering and
    building its Grams; e.g. n = 2000, 64 layers of d = 1024 a side: 2 + 1 GiB for inputs + 3.8 GiB of Grams.
    Where the Gram matrices do not fit, pass form="feature" if L1 L2 d1 d2 does, or use MinibatchCKA.
    """
    x, y = _pair(acts1, acts2, ("acts1", "acts2"), ndim=3)
    xy, xx, yy = _terms(x, y, debiased, form, ("acts1", "acts2"), pairs=True)
    return xy / (xx[:, None] * yy[None, :]).sqrt()


class MinibatchCKA:
    """Debiased CKA matrix from minibatches of rows, for more rows than fit in memory (Nguyen et al. 2021).

    `update(acts1, acts2)` takes one batch, [b, L1, d1] and [b, L2, d2] (or [b, d1], [b, d2]: one layer), b >= 4,
    each side non-constant within the batch; `compute()` returns [L1, L2] float64
    mean_batches HSIC_u(K, L) / sqrt(mean_batches HSIC_u(K, K) mean_batches HSIC_u(L, L)).
    It is an estimate: HSIC_u is a U-statistic, so over batches drawn as a random partition of the rows each
    averaged term has the full-data HSIC_u as its expectation (the ratio is not exactly unbiased); it equals the
    full-data debiased CKA with one batch of all rows and converges to it as the batches grow. Shuffle the rows
    before batching if their order is not random.
    """

    def __init__(self) -> None:
        self.batches = 0
        self._sums: tuple[torch.Tensor, ...] | None = None

    def update(self, acts1: torch.Tensor, acts2: torch.Tensor) -> MinibatchCKA:
        ndim = 2 if torch.as_tensor(acts1).ndim == 2 else 3
        x, y = _pair(acts1, acts2, ("acts1", "acts2"), ndim)
        terms = _terms(x, y, True, "auto", ("acts1", "acts2"), pairs=True, layered=ndim == 3)
        if self._sums is not None and self._sums[0].shape != terms[0].shape:
            shapes = f"{tuple(terms[0].shape)} layer pairs after {tuple(self._sums[0].shape)}"
            raise UserError(f"MinibatchCKA batches must keep their layers, got {shapes}")
        self._sums = terms if self._sums is None else tuple(s + t for s, t in zip(self._sums, terms))
        self.batches += 1
        return self

    def compute(self) -> torch.Tensor:
        if self._sums is None:
            raise ValueError("MinibatchCKA has seen no data")
        xy, xx, yy = self._sums  # sums over the batches: the 1 / batches of the means cancels in the ratio
        return xy / (xx[:, None] * yy[None, :]).sqrt()


def _diagonal_pair(acts1: object, acts2: object) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _pair(acts1, acts2, ("acts1", "acts2"), ndim=3)
    if x.shape[1] != y.shape[1]:
        raise UserError(f"the CKA diagonal needs as many layers in acts1 as in acts2, got {x.shape[1]} and "
                        f"{y.shape[1]}; use cka_matrix for all layer pairs")  # fmt: skip
    return x, y


def cka_permutation_null(
    acts1: torch.Tensor, acts2: torch.Tensor, n_permutations: int = 100, seed: int = 0, debiased: bool = False
) -> dict[str, torch.Tensor]:
    """Permutation null of the CKA diagonal: acts1, acts2 [n, L, d1 / d2] -> dict of [L] float64 tensors.

    Each of the m = n_permutations draws shuffles the rows of acts2 (one permutation shared by all layers, from a
    torch.Generator seeded with `seed`), breaking the row pairing; the self terms do not change and acts2's
    kernel is only reordered, so both are computed once. Returns "diagonal"
    (CKA(acts1[:, l], acts2[:, l])), "null_mean", "null_p95" (95th percentile of the draws) and the one-sided
    "p_value" = (1 + #{null >= observed}) / (m + 1), whose smallest value is 1 / (m + 1).
    """
    x, y = _diagonal_pair(acts1, acts2)
    gram, kx, ky = _kernels(x, y, "auto", pairs=False)
    rx, ry = _row_norms(x), _row_norms(y)
    scale = (_self_hsic(kx, rx, gram, debiased, "acts1") * _self_hsic(ky, ry, gram, debiased, "acts2")).sqrt()
    observed = _cross_hsic(kx, ky, rx, ry, gram, debiased, pairs=False) / scale
    generator = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(n_permutations):
        p = torch.randperm(len(x), generator=generator)
        ky_p = ky[:, p][:, :, p] if gram else ky[p]  # the kernel of acts2[p]
        null.append(_cross_hsic(kx, ky_p, rx, ry[p], gram, debiased, pairs=False) / scale)
    null = torch.stack(null)  # [m, L]
    return {
        "diagonal": observed,
        "null_mean": null.mean(0),
        "null_p95": null.quantile(0.95, dim=0),
        "p_value": (1 + (null >= observed).sum(0)).double() / (n_permutations + 1),
    }


def bootstrap_cka_diagonal(
    acts1: torch.Tensor,
    acts2: torch.Tensor,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    debiased: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Percentile bootstrap interval of the CKA diagonal: acts1, acts2 [n, L, d1 / d2] -> [L, 2] (low, high).

    Each draw resamples the n rows with replacement, the same rows on both sides, and recomputes the diagonal CKA
    (columns re-centered per draw). groups [n] (e.g. the problem of each row, when a problem's reasoning and control
    rows share content): resample groups instead, with all their rows; a draw then has as many groups as there are. Duplicated rows bias biased CKA upward (a repeated row counts as
    a perfectly shared pattern; a draw holds about 0.63 n distinct rows, and biased CKA grows as rows get fewer
    relative to d), and break the unbiasedness of debiased CKA (its U-statistic assumes distinct rows), hence
    the biased default. The shift is small next to the spread only when n >> d or the layers share much; for
    weakly related layers with n not >> d the interval can sit above the observed value: read it as a spread,
    not an exact coverage guarantee.
    """
    if not 0 < level < 1:
        raise UserError(f"bootstrap level must be in (0, 1), got {level}")
    x, y = _diagonal_pair(acts1, acts2)
    if groups is None:
        groups = torch.arange(len(x))
    groups = torch.as_tensor(groups)
    if groups.shape != (len(x),):
        raise UserError(f"groups must hold one id per row ({len(x)}), got shape {tuple(groups.shape)}")
    ids, group_of = torch.unique(groups, return_inverse=True)
    members = [torch.nonzero(group_of == g).flatten() for g in range(len(ids))]
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_bootstrap):
        rows = torch.cat([members[g] for g in torch.randint(len(ids), (len(ids),), generator=generator).tolist()])
        xb, yb = x[rows], y[rows]
        xb, yb = xb - xb.mean(0), yb - yb.mean(0)
        xy, xx, yy = _terms(xb, yb, debiased, "auto", ("acts1", "acts2"), pairs=False)
        draws.append(xy / (xx * yy).sqrt())
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.stack(draws).quantile(tails, dim=0).T
