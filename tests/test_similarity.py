"""Linear CKA (interp.similarity) against a plain n x n implementation written here, plus its invariances.

Tolerances: everything runs in float64 (unit roundoff u = 1.1e-16). A CKA here is a ratio of sums of at most
n d <= 10^4 products, each sum good to ~(n + d) u < 1e-13 relative; the debiased estimate subtracts terms up to
~10^3 times its value (weakly related data), so 1e-10 between two exact-arithmetic-equal computations (forms,
batched vs loop) and 1e-8 against the independent implementation (different summation orders, uncentered
kernels) leave a margin of ~100x. Statistical thresholds are for the fixed seeds used and explained where set.
"""

import pytest
import torch

from interp.errors import UserError
from interp.similarity import (
    MinibatchCKA,
    bootstrap_cka_diagonal,
    cka_matrix,
    cka_permutation_null,
    linear_cka,
)

# Two computations equal in exact arithmetic (see the module docstring), for torch.testing and pytest.approx.
EXACT, EXACT_APPROX = dict(rtol=1e-10, atol=1e-12), dict(rel=1e-10, abs=1e-12)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def plain_hsic(K, L, debiased):
    """HSIC of two n x n kernels, as written in the papers: tr(K H L H) (scale dropped, it cancels), or Song et
    al.'s unbiased estimator on K, L with zeroed diagonals."""
    n = len(K)
    one = torch.ones(n, 1, dtype=torch.float64)
    if not debiased:
        H = torch.eye(n, dtype=torch.float64) - one @ one.T / n
        return torch.trace(K @ H @ L @ H)
    K, L = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
    return (
        torch.trace(K @ L)
        + (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one.T @ K @ L @ one
    ).squeeze() / (n * (n - 3))


def plain_cka(X, Y, debiased):
    K, L = X @ X.T, Y @ Y.T  # uncentered: biased centers with H, the unbiased estimator needs no centering
    return float(
        plain_hsic(K, L, debiased) / (plain_hsic(K, K, debiased) * plain_hsic(L, L, debiased)).sqrt()
    )


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d", [(30, 5), (10, 40)])  # feature form (d < n) and Gram form (d > n)
def test_cka_of_x_with_itself_is_one(n, d, debiased):
    X = randn(n, d)
    assert linear_cka(X, X, debiased) == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transform_isotropic_scaling_and_column_shift(debiased):
    X, Y = randn(40, 6, seed=1), randn(40, 9, seed=2) + 0.5 * randn(40, 6, seed=1).repeat(1, 2)[:, :9]
    Q, _ = torch.linalg.qr(randn(9, 9, seed=3))
    Y_moved = 3.7 * Y @ Q + randn(1, 9, seed=4) * 100  # rotate, scale, add a constant to every column
    reference = linear_cka(X, Y, debiased)
    assert linear_cka(X, Y_moved, debiased) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(X + 50, Y, debiased) == pytest.approx(reference, rel=1e-10)


def test_debiased_cka_of_independent_data_is_near_zero_while_biased_is_not():
    X, Y = randn(500, 20, seed=0), randn(500, 20, seed=1)
    biased, debiased = linear_cka(X, Y), linear_cka(X, Y, debiased=True)
    # Biased CKA of independent Gaussians concentrates near d / (n + d) = 0.038, not 0; the debiased one has mean
    # ~0 and a spread of ~0.003 at this size (checked over seeds), so 0.01 is ~3 spreads from both.
    assert 0.03 < biased < 0.05
    assert abs(debiased) < 0.01


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", [(40, 7, 9), (12, 30, 25)])
def test_matches_plain_gram_matrix_implementation(n, d1, d2, debiased):
    # "auto" takes the feature form for (40, 7, 9) and the Gram form for (12, 30, 25): d1 d2 > n (d1 + d2 + 1)
    X = randn(n, d1, seed=5) + 3  # not centered: the implementations must center (or not need to)
    Y = X[:, :1] * randn(1, d2, seed=6) + randn(n, d2, seed=7)  # some shared signal
    assert linear_cka(X, Y, debiased) == pytest.approx(plain_cka(X, Y, debiased), rel=1e-8)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", [(40, 7, 9), (12, 30, 25)])
def test_feature_and_gram_forms_agree(n, d1, d2, debiased):
    X, Y = randn(n, d1, seed=8), randn(n, d2, seed=9)
    assert linear_cka(X, Y, debiased, form="feature") == pytest.approx(
        linear_cka(X, Y, debiased, form="gram"), **EXACT_APPROX
    )
    acts1, acts2 = randn(n, 3, d1, seed=10), randn(n, 2, d2, seed=11)
    torch.testing.assert_close(
        cka_matrix(acts1, acts2, debiased, form="feature"),
        cka_matrix(acts1, acts2, debiased, form="gram"),
        **EXACT,
    )


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("form", ["auto", "feature", "gram"])
def test_cka_matrix_equals_the_loop_over_layer_pairs(form, debiased):
    acts1 = randn(60, 4, 8, seed=12)
    shared = acts1[:, :2, :5] @ randn(5, 11, seed=13)  # layers 0, 1 of acts2 share a subspace with acts1's
    acts2 = torch.cat([shared, randn(60, 1, 11, seed=14)], dim=1)  # [60, 3, 11]
    pairs = [[linear_cka(acts1[:, i], acts2[:, j], debiased) for j in range(3)] for i in range(4)]
    matrix = cka_matrix(acts1, acts2, debiased, form=form)
    assert matrix.shape == (4, 3) and matrix.dtype == torch.float64
    torch.testing.assert_close(matrix, torch.tensor(pairs, dtype=torch.float64), **EXACT)
    # float32 input is cast exactly to float64 before any arithmetic
    as_float32 = cka_matrix(acts1.float(), acts2.float(), debiased)
    torch.testing.assert_close(
        as_float32, cka_matrix(acts1.float().double(), acts2.float().double(), debiased)
    )


def planted(n, seed=0):
    """X [n, 16] and Y [n, 12] sharing a 4-dimensional signal under noise."""
    shared = randn(n, 4, seed=seed)
    X = shared @ randn(4, 16, seed=seed + 1) + randn(n, 16, seed=seed + 2)
    Y = shared @ randn(4, 12, seed=seed + 3) + 2 * randn(n, 12, seed=seed + 4)
    return X, Y


def test_minibatch_cka_averages_per_batch_hsic_and_converges_to_the_full_value():
    X, Y = planted(2000)
    full = linear_cka(X, Y, debiased=True)

    def minibatch(size):
        estimate = MinibatchCKA()
        for xb, yb in zip(X.split(size), Y.split(size)):
            estimate.update(xb, yb)
        return float(estimate.compute()[0, 0])

    # The definition, with the plain HSIC_u: per-batch values of the cross and self terms, averaged.
    batches = [(X[i : i + 50], Y[i : i + 50]) for i in range(0, 2000, 50)]
    mean = [sum(plain_hsic(a @ a.T, b @ b.T, True) for a, b in pairs) / 40 for pairs in _pairings(batches)]
    assert minibatch(50) == pytest.approx(float(mean[0] / (mean[1] * mean[2]).sqrt()), rel=1e-8)
    # One batch of every row is the full-data estimate.
    assert minibatch(2000) == pytest.approx(full, **EXACT_APPROX)
    # Smaller batches add variance (U-statistics over fewer rows each): on this draw the error is 0.0032 at 50
    # rows a batch and 0.0005 at 500, next to a CKA of 0.52.
    assert abs(minibatch(500) - full) < 0.002 < abs(minibatch(50) - full)


def _pairings(batches):
    """(X, Y), (X, X), (Y, Y) batch pairs, for the cross and the two self terms."""
    return [[(a, b) for a, b in batches], [(a, a) for a, _ in batches], [(b, b) for _, b in batches]]


def test_minibatch_cka_of_layers_with_one_batch_is_cka_matrix():
    acts1, acts2 = randn(50, 3, 6, seed=15), randn(50, 2, 7, seed=16)
    estimate = MinibatchCKA().update(acts1, acts2)
    torch.testing.assert_close(estimate.compute(), cka_matrix(acts1, acts2, debiased=True), **EXACT)
    with pytest.raises(UserError, match="keep their layers"):
        estimate.update(acts1[:, :2], acts2)


@pytest.mark.parametrize("debiased", [False, True])
def test_permutation_null_separates_shared_from_independent_layers(debiased):
    acts1 = randn(100, 3, 10, seed=17)
    Q, _ = torch.linalg.qr(randn(10, 10, seed=18))
    related = acts1 @ Q + 0.1 * randn(100, 3, 10, seed=19)  # a rotation plus small noise: CKA ~ 1
    result = cka_permutation_null(acts1, related, n_permutations=50, seed=0, debiased=debiased)
    assert set(result) == {"diagonal", "null_mean", "null_p95", "p_value"}
    assert (result["diagonal"] > 0.95).all() and (result["null_p95"] < 0.5).all()
    torch.testing.assert_close(result["p_value"], torch.full((3,), 1 / 51, dtype=torch.float64))
    torch.testing.assert_close(result["diagonal"], cka_matrix(acts1, related, debiased).diagonal(), **EXACT)
    # Independent layers: the observed diagonal is one more draw from the null; this seed's p-values are all
    # above 0.05 (any single layer would be below with probability 0.05).
    independent = cka_permutation_null(
        acts1, randn(100, 3, 12, seed=1), n_permutations=50, seed=0, debiased=debiased
    )
    assert (independent["p_value"] > 0.05).all()
    assert (independent["diagonal"] <= independent["null_p95"]).all()


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d", [(30, 5), (10, 40)])  # the null's feature form, then its Gram form
def test_null_and_bootstrap_follow_their_definitions(n, d, debiased):
    acts1, acts2 = randn(n, 2, d, seed=25), randn(n, 2, d + 3, seed=26)
    generator = torch.Generator().manual_seed(3)
    null = torch.stack([cka_matrix(acts1, acts2[torch.randperm(n, generator=generator)], debiased).diagonal()
                        for _ in range(20)])  # fmt: skip
    result = cka_permutation_null(acts1, acts2, n_permutations=20, seed=3, debiased=debiased)
    torch.testing.assert_close(result["null_mean"], null.mean(0), **EXACT)
    torch.testing.assert_close(result["null_p95"], null.quantile(0.95, dim=0), **EXACT)
    observed = cka_matrix(acts1, acts2, debiased).diagonal()
    torch.testing.assert_close(result["p_value"], (1 + (null >= observed).sum(0)).double() / 21)

    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(n, (n,), generator=generator) for _ in range(20)]
    draws = torch.stack([cka_matrix(acts1[r], acts2[r], debiased).diagonal() for r in rows])
    expected = draws.quantile(torch.tensor([0.05, 0.95], dtype=torch.float64), dim=0).T
    interval = bootstrap_cka_diagonal(acts1, acts2, n_bootstrap=20, seed=4, level=0.9, debiased=debiased)
    torch.testing.assert_close(interval, expected, **EXACT)


def test_bootstrap_interval_brackets_a_strong_diagonal_and_is_reproducible():
    acts1 = randn(200, 2, 8, seed=20)
    acts2 = acts1 @ randn(8, 8, seed=21) + 0.5 * randn(200, 2, 8, seed=22)
    interval = bootstrap_cka_diagonal(acts1, acts2, n_bootstrap=200, seed=0)
    observed = cka_matrix(acts1, acts2).diagonal()
    assert interval.shape == (2, 2)
    assert (interval[:, 0] <= observed).all() and (observed <= interval[:, 1]).all()
    torch.testing.assert_close(interval, bootstrap_cka_diagonal(acts1, acts2, n_bootstrap=200, seed=0))


def _with(x, row, col, value):
    x = x.clone()
    x[row, col] = value
    return x


X4 = randn(6, 3, seed=23)
ACTS = randn(6, 2, 3, seed=24)
CONSTANT = torch.ones(6, 3)
ONE_OUTLIER = torch.cat([torch.ones(5, 3), -5 * torch.ones(1, 3)])  # all rows but one equal: U-centered K = 0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: linear_cka(X4[:3], X4[:3]), "at least 4 rows.*n = 3"),
        (lambda: cka_matrix(ACTS[:3], ACTS[:3], debiased=True), "at least 4 rows"),
        (lambda: linear_cka(X4, X4[:5]), "same rows.*n = 6 and 5"),
        (lambda: linear_cka(ACTS, X4), r"X as \[n, d\]"),
        (lambda: cka_matrix(X4, ACTS), r"acts1 as \[n, n_layers, d\]"),
        (lambda: cka_permutation_null(ACTS, ACTS[:, :1]), "as many layers.*2 and 1.*cka_matrix"),
        (lambda: bootstrap_cka_diagonal(ACTS, ACTS[:, :1]), "as many layers"),
        (lambda: linear_cka(X4, _with(X4, 2, 1, float("nan"))), "non-finite.*Y"),
        (lambda: linear_cka(X4, _with(X4, 0, 0, float("inf")), debiased=True), "non-finite"),
        (lambda: linear_cka(torch.full((6, 3), 0.1), X4), "undefined: X is constant"),
        (lambda: cka_matrix(ACTS, torch.cat([ACTS[:, :1], CONSTANT[:, None]], 1)), r"acts2 layer\(s\) \[1\]"),
        (lambda: linear_cka(X4, ONE_OUTLIER, debiased=True), "undefined: Y has zero unbiased HSIC"),
        (lambda: cka_matrix(ACTS, ONE_OUTLIER[:, None], True), r"acts2 layer\(s\) \[0\] have zero unbiased"),
        (lambda: linear_cka(X4, X4, form="kernel"), "form must be"),
        (lambda: bootstrap_cka_diagonal(ACTS, ACTS, level=95), "level"),
    ],
)
def test_user_mistakes_raise_user_error(call, message):
    with pytest.raises(UserError, match=message):
        call()
