"""Null directions shaped like the data (`interp.directions`): the balanced within-pair sign-flip placebo, the
covariance null of the paired differences, isotropic, and the pooled random split kept for comparison.

Independent references: numpy sums of the paired differences under a fixed sign vector, numpy mean differences
of fixed partitions; the covariance of the centred paired differences computed with numpy, which the covariance
of many covariance-null draws must approach (Monte-Carlo tolerance from the Wishart variance); planted worlds:
a huge class difference on a noise-free axis, and the review's no-effect world of matched pairs whose problem
content (between-problem variance) cancels out of r but not out of a pooled split.
"""

import numpy as np
import pytest
import torch

from interp.directions import compute_contrastive_directions
from interp.errors import UserError
from interp.null_directions import (
    NULLS,
    balanced_signs,
    covariance_directions,
    null_directions,
    paired_differences,
    placebo_directions,
    placebo_partitions,
    signflip_directions,
)
from interp.selection import null_pvalues, zscore


def _pairs(n_pairs=21, d=6, content=3.0, shift=2.0, seed=0):
    """Matched pairs in shuffled row order: x = mu_problem + eps + y * shift, eps anisotropic.
    Returns acts [2 n_pairs, d] float64, labels [2 n_pairs], problems [2 n_pairs] (ids 100, 103, ...)."""
    g = torch.Generator().manual_seed(seed)
    mu = content * torch.randn(n_pairs, d, generator=g, dtype=torch.float64)
    eps = torch.randn(2 * n_pairs, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    labels = torch.tensor([1, 0] * n_pairs)
    problems = 100 + 3 * torch.arange(n_pairs).repeat_interleave(2)
    acts = mu.repeat_interleave(2, 0) + eps + shift * labels[:, None]
    order = torch.randperm(2 * n_pairs, generator=g)
    return acts[order], labels[order], problems[order]


def _numpy_diffs(acts, labels, problems):
    x, y, p = acts.numpy(), labels.numpy(), problems.numpy()
    ids = sorted(set(p.tolist()))
    return np.stack([x[(p == i) & (y == 1)][0] - x[(p == i) & (y == 0)][0] for i in ids])  # [n_pairs, d]


def test_signflip_placebo_with_fixed_signs_is_the_direct_sum():
    acts, labels, problems = _pairs()
    diffs = _numpy_diffs(acts, labels, problems)
    np.testing.assert_allclose(paired_differences(acts, labels, problems).numpy(), diffs, rtol=0, atol=0)
    signs = np.array([1.0, -1.0] * 10 + [0.0])  # 21 pairs, sum 0
    out = signflip_directions(torch.from_numpy(diffs), torch.from_numpy(signs)[None])[0]
    np.testing.assert_allclose(out.numpy(), (signs[:, None] * diffs).sum(0) / 21, rtol=1e-12, atol=1e-12)
    # all signs +1 give r itself: the contrastive direction of the same (fully paired) rows
    r = signflip_directions(torch.from_numpy(diffs), torch.ones(1, 21, dtype=torch.float64))[0]
    reference = compute_contrastive_directions(acts[labels == 1][:, None], acts[labels == 0][:, None])[0]
    torch.testing.assert_close(r, reference.double(), rtol=1e-6, atol=1e-6)
    # null_directions("placebo") = these sums under the seeded balanced signs, rescaled to |r|
    like = torch.full((6,), 2.0)
    raw = signflip_directions(torch.from_numpy(diffs), balanced_signs(21, 5, generator=7))
    got = null_directions("placebo", like, 5, generator=7, acts=acts, labels=labels, problems=problems)
    torch.testing.assert_close(got.double(), raw / raw.norm(dim=-1, keepdim=True) * like.double().norm(),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("n_pairs", [20, 21])
def test_balanced_signs_sum_to_zero_and_are_seeded(n_pairs):
    signs = balanced_signs(n_pairs, 300, generator=0)  # [300, n_pairs]
    assert signs.shape == (300, n_pairs) and torch.equal(signs, balanced_signs(n_pairs, 300, generator=0))
    assert (signs.sum(1) == 0).all() and ((signs == 1).sum(1) == n_pairs // 2).all()
    assert ((signs == 0).sum(1) == n_pairs % 2).all()  # odd: exactly one pair sits out
    if n_pairs % 2:  # ... a random one: every pair sits out sometimes
        assert len(set((signs == 0).double().argmax(1).tolist())) > n_pairs // 2
    assert len({tuple(s.tolist()) for s in signs}) == 300
    share = (signs == 1).double().mean(0)  # each pair is +1 with probability floor(n/2) / n
    p = (n_pairs // 2) / n_pairs
    assert float((share - p).abs().max()) < 5 * (p * (1 - p) / 300) ** 0.5


def test_paired_differences_drop_incomplete_pairs_and_reject_duplicates():
    acts, labels, problems = _pairs(n_pairs=5)
    keep = ~((problems == 106) & (labels == 0))  # problem 106 loses its control row
    diffs = paired_differences(acts[keep], labels[keep], problems[keep])
    full = _numpy_diffs(acts, labels, problems)
    np.testing.assert_array_equal(diffs.numpy(), np.delete(full, 2, axis=0))
    twice = problems.clone()
    twice[(problems == 106) & (labels == 1)] = 103  # problem 103 now has two reasoning rows
    with pytest.raises(UserError, match="at most one reasoning and one control row per problem"):
        paired_differences(acts, labels, twice)
    with pytest.raises(UserError, match="at least 2 problems with both"):
        paired_differences(acts[:2], torch.tensor([1, 0]), torch.tensor([1, 2]))


def test_a_planted_class_difference_cancels_from_the_placebo_but_not_the_pooled_split():
    """Axis 0 carries only a huge class difference (no noise there): every sign-flip placebo is exactly 0 on it and
    its cos^2 with r is ~ 1/d; a pooled random split is imbalanced across the classes and inherits it."""
    acts, labels, problems = _pairs(n_pairs=40, d=32, content=1.0, shift=0.0, seed=1)
    acts[:, 0] = 1000.0 * labels
    r = compute_contrastive_directions(acts[labels == 1][:, None], acts[labels == 0][:, None])[0]  # [32]
    kwargs = dict(acts=acts, labels=labels, problems=problems)
    placebo = null_directions("placebo", r, 200, generator=2, **kwargs).double()
    pooled = null_directions("pooled_placebo", r, 200, generator=2, **kwargs).double()
    assert float(placebo[:, 0].abs().max()) < 1e-12 * float(placebo.abs().max())
    cos2 = lambda nulls: ((nulls @ r.double()) / (nulls.norm(dim=1) * r.double().norm())).pow(2)  # noqa: E731
    assert float(cos2(placebo).mean()) < 3 / 32  # r is ~ axis 0, which the placebo never touches
    assert float(cos2(pooled).mean()) > 0.5


def _no_effect_pairs(seed, n_pairs=32, d=32):
    """The review's world (sim4_paired_placebo.py): problem content N(0, 4 I) on dims 0..15, shared by both prompts
    of a problem; prompt-form noise N(0, I) on dims 16..31; which prompt of a pair is 'reasoning' is a coin flip."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(n_pairs, d, dtype=torch.float64)
    mu[:, :16] = 2 * torch.randn(n_pairs, 16, generator=g, dtype=torch.float64)
    eps = torch.zeros(2 * n_pairs, d, dtype=torch.float64)
    eps[:, 16:] = torch.randn(2 * n_pairs, 16, generator=g, dtype=torch.float64)
    flip = (torch.rand(n_pairs, generator=g) < 0.5).long().repeat_interleave(2)
    labels = (torch.tensor([1, 0] * n_pairs) + flip) % 2
    return mu.repeat_interleave(2, 0) + eps, labels, torch.arange(n_pairs).repeat_interleave(2), g


def test_no_effect_paired_world_rejects_at_about_the_nominal_rate():
    """Score of a direction v on 32 report problems: |proj of v_hat on the prompt-form dims|^2 + mean of 32 N(0, 1)
    per-problem noises. r has no problem content; the pooled split's nulls do, so r 'beats' them nearly always;
    the paired sign-flip nulls are exchangeable with r: p_t < .05 in ~5% of runs."""
    runs, m, rejected = 300, 8, {"placebo": 0, "pooled_placebo": 0}
    for seed in range(runs):
        acts, labels, problems, g = _no_effect_pairs(seed)
        r = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)  # [32]
        for kind in rejected:
            nulls = null_directions(kind, r, m, generator=seed, acts=acts, labels=labels, problems=problems)
            directions = torch.cat([r[None], nulls])  # [1 + m, 32]
            form = directions[:, 16:].pow(2).sum(1) / directions.pow(2).sum(1)
            scores = form + torch.randn(1 + m, 32, generator=g, dtype=torch.float64).mean(1)
            rejected[kind] += null_pvalues(float(scores[0]), scores[1:])["t"] < 0.05
    assert rejected["placebo"] <= 0.10 * runs, rejected  # nominal 5%; sd 1.3% over 300 runs
    assert rejected["pooled_placebo"] >= 0.5 * runs, rejected  # the review measured 92%


def test_covariance_null_has_the_covariance_of_the_centred_paired_differences():
    acts, labels, problems = _pairs(n_pairs=40, content=3.0)
    diffs = _numpy_diffs(acts, labels, problems)
    n = 40_000
    draws = covariance_directions(torch.from_numpy(diffs), n, generator=1).numpy()  # [n, 6], mean 0
    centred = diffs - diffs.mean(0)
    target = centred.T @ centred / (len(diffs) - 1)  # [6, 6]
    sample = draws.T @ draws / n
    # Var of one entry of a Gaussian sample second moment: (W_ii W_jj + W_ij^2) / n; allow 5 of its std
    tolerance = 5 * np.sqrt((np.outer(np.diag(target), np.diag(target)) + target**2) / n)
    assert (np.abs(sample - target) < tolerance).all()
    x, y = acts.numpy(), labels.numpy()  # the old within-class covariance holds the problem content too
    within = np.concatenate([x[y == c] - x[y == c].mean(0) for c in (0, 1)])
    assert (np.abs(sample - within.T @ within / (len(x) - 1)) > tolerance).any()
    via_null = null_directions("covariance", torch.ones(6), 3, generator=1, acts=acts, labels=labels, problems=problems)
    raw = covariance_directions(torch.from_numpy(diffs), 3, generator=1)
    torch.testing.assert_close(via_null.double(), raw / raw.norm(dim=-1, keepdim=True) * 6**0.5, rtol=1e-6, atol=1e-6)


def test_pooled_placebo_with_a_fixed_partition_is_the_direct_mean_difference():
    acts, labels, _ = _pairs()
    partitions = placebo_partitions(labels, 5, generator=3)  # [5, 42]
    assert (partitions.sum(1) == int(labels.sum())).all()
    out = placebo_directions(acts, partitions)  # [5, 6] float64
    x = acts.numpy()
    for k, mask in enumerate(partitions.numpy()):
        np.testing.assert_allclose(out[k].numpy(), x[mask].mean(0) - x[~mask].mean(0), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", NULLS)
def test_null_directions_have_the_norm_of_r_and_are_seeded(kind):
    acts, labels, problems = _pairs()
    r = torch.randn(6, generator=torch.Generator().manual_seed(5)) * 7  # float32 [6]
    kwargs = dict(acts=acts, labels=labels, problems=problems)
    out = null_directions(kind, r, 9, generator=4, **kwargs)
    assert out.shape == (9, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().norm(dim=-1), r.double().norm().expand(9), rtol=1e-6, atol=0)
    torch.testing.assert_close(out, null_directions(kind, r, 9, generator=4, **kwargs))


def test_null_directions_reject_bad_input():
    acts, labels, problems = _pairs()
    r = torch.ones(6)
    with pytest.raises(UserError, match="unknown null 'gaussian'"):
        null_directions("gaussian", r, 2)
    with pytest.raises(UserError, match="placebo null needs the activations, labels and problem ids"):
        null_directions("placebo", r, 2, acts=acts, labels=labels)
    with pytest.raises(UserError, match="at least one row of each class"):
        null_directions("covariance", r, 2, acts=acts, labels=torch.ones(42, dtype=torch.long), problems=problems)
    with pytest.raises(UserError, match="d_model 6, the direction 5"):
        null_directions("placebo", torch.ones(5), 2, acts=acts, labels=labels, problems=problems)


def _variance(u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u^T sigma u / |u|^2 per row: [k, d] -> [k]."""
    return torch.einsum("ki,ij,kj->k", u, sigma, u) / (u * u).sum(-1)


def test_activation_built_direction_does_not_beat_a_data_shaped_null_without_a_class_effect():
    """Matched pairs with problem content, prompt noise from an anisotropic Gaussian (spectrum 1 / k^2: top
    eigenvalue 39x the mean), labels a coin flip within each pair. r lies along the high-variance axes like any
    mean of the paired differences, so its variance u^T Sigma u (u = r / |r|) beats isotropic directions nearly
    always; against the paired placebo and covariance nulls it is 'significant' (z > 1.96) only at about the
    one-sided nominal rate."""
    d, n_pairs, n_null, n_runs = 64, 100, 50, 200
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 2
    assert 38 < float(spectrum[0] / spectrum.mean()) < 40
    beats = {kind: 0 for kind in ("placebo", "covariance", "isotropic")}
    for seed in range(n_runs):
        g = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        sigma = rotation @ torch.diag(spectrum) @ rotation.T  # [d, d]
        noise = torch.randn(2 * n_pairs, d, generator=g, dtype=torch.float64) * spectrum.sqrt() @ rotation.T
        acts = torch.randn(n_pairs, d, generator=g, dtype=torch.float64).repeat_interleave(2, 0) + noise
        flip = (torch.rand(n_pairs, generator=g) < 0.5).long().repeat_interleave(2)
        labels, problems = (torch.tensor([1, 0] * n_pairs) + flip) % 2, torch.arange(n_pairs).repeat_interleave(2)
        r = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)  # [d]
        for kind in beats:
            nulls = null_directions(kind, r, n_null, generator=seed, acts=acts, labels=labels, problems=problems)
            beats[kind] += zscore(float(_variance(r[None], sigma)[0]), _variance(nulls.double(), sigma)) > 1.96
    assert beats["isotropic"] >= 0.9 * n_runs, beats
    assert beats["placebo"] <= 0.1 * n_runs and beats["covariance"] <= 0.1 * n_runs, beats
