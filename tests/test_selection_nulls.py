"""Null directions shaped like the data (`interp.directions`): placebo contrasts, covariance-shaped, isotropic.

Independent references: numpy mean differences of the same partitions; the within-class covariance computed
with numpy, which the covariance of many covariance-null draws must approach (Monte-Carlo tolerance from the
Wishart variance); an anisotropic synthetic dataset with NO class effect, on which the contrastive direction is
just another random split of the rows (exchangeable with the placebo null).
"""

import numpy as np
import pytest
import torch

from interp.directions import (
    NULLS,
    compute_contrastive_directions,
    covariance_directions,
    null_directions,
    placebo_directions,
    placebo_partitions,
)
from interp.errors import UserError
from interp.selection import zscore


def _rows(m=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    labels = (torch.arange(m) < m // 3).long()  # 13 of class 1, 27 of class 0
    return acts + 2.0 * labels[:, None], labels


def test_placebo_with_a_fixed_partition_is_the_direct_mean_difference():
    acts, labels = _rows()
    partitions = placebo_partitions(labels, 5, generator=3)  # [5, 40]
    out = placebo_directions(acts, partitions)  # [5, 6] float64
    x = acts.numpy()
    for k, mask in enumerate(partitions.numpy()):
        np.testing.assert_allclose(out[k].numpy(), x[mask].mean(0) - x[~mask].mean(0), rtol=1e-12, atol=1e-13)
    # the true labels as the partition give the contrastive direction itself
    true = placebo_directions(acts, (labels == 1)[None])[0]
    reference = compute_contrastive_directions(acts[labels == 1][:, None], acts[labels == 0][:, None])[0]  # float32
    torch.testing.assert_close(true, reference.double(), rtol=1e-6, atol=1e-6)


def test_placebo_partitions_keep_the_class_sizes_and_are_seeded():
    _, labels = _rows()
    partitions = placebo_partitions(labels, 200, generator=0)
    assert partitions.shape == (200, 40) and partitions.dtype == torch.bool
    assert (partitions.sum(1) == int(labels.sum())).all()
    assert torch.equal(partitions, placebo_partitions(labels, 200, generator=0))
    assert len({tuple(p.tolist()) for p in partitions}) == 200  # distinct random splits
    share = partitions.double().mean(0)  # every row lands in group A with probability 13/40
    assert float((share - 13 / 40).abs().max()) < 5 * (13 / 40 * 27 / 40 / 200) ** 0.5


def test_covariance_null_has_the_within_class_covariance():
    acts, labels = _rows()
    n = 40_000
    draws = covariance_directions(acts, labels, n, generator=1).numpy()  # [n, 6], mean 0
    x = acts.numpy()
    centred = x.copy()
    for c in (0, 1):
        centred[labels.numpy() == c] -= x[labels.numpy() == c].mean(0)
    within = centred.T @ centred / (len(x) - 1)  # [6, 6]
    sample = draws.T @ draws / n
    # Var of one entry of a Gaussian sample second moment: (W_ii W_jj + W_ij^2) / n; allow 5 of its std
    tolerance = 5 * np.sqrt((np.outer(np.diag(within), np.diag(within)) + within**2) / n)
    assert (np.abs(sample - within) < tolerance).all()
    total = np.cov(x.T)  # the class difference (2.0 along every axis) inflates the total covariance
    assert (np.abs(sample - total) > tolerance).any()


def test_covariance_null_leaves_out_a_pure_class_effect():
    """A coordinate that is constant within each class (a pure class effect) has no within-class variance:
    every covariance-null direction is exactly 0 there; a placebo split still picks part of it up."""
    acts, labels = _rows()
    acts[:, -1] = 5.0 * labels
    draws = covariance_directions(acts, labels, 50, generator=2)
    assert float(draws[:, -1].abs().max()) < 1e-12 * float(draws.abs().max())
    placebo = placebo_directions(acts, placebo_partitions(labels, 50, generator=2))
    assert float(placebo[:, -1].abs().max()) > 0.5


@pytest.mark.parametrize("kind", NULLS)
def test_null_directions_have_the_norm_of_r_and_are_seeded(kind):
    acts, labels = _rows()
    r = torch.randn(6, generator=torch.Generator().manual_seed(5)) * 7  # float32 [6]
    out = null_directions(kind, r, 9, generator=4, acts=acts, labels=labels)
    assert out.shape == (9, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().norm(dim=-1), r.double().norm().expand(9), rtol=1e-6, atol=0)
    torch.testing.assert_close(out, null_directions(kind, r, 9, generator=4, acts=acts, labels=labels))
    if kind == "placebo":  # the rescaled mean differences of the seeded partitions
        raw = placebo_directions(acts, placebo_partitions(labels, 9, generator=4))
        torch.testing.assert_close(out.double(), raw / raw.norm(dim=-1, keepdim=True) * r.double().norm(),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


def test_null_directions_reject_bad_input():
    acts, labels = _rows()
    r = torch.ones(6)
    with pytest.raises(UserError, match="unknown null 'gaussian'"):
        null_directions("gaussian", r, 2)
    with pytest.raises(UserError, match="placebo null needs the activations"):
        null_directions("placebo", r, 2)
    with pytest.raises(UserError, match="at least one row of each class"):
        null_directions("covariance", r, 2, acts=acts, labels=torch.ones(40, dtype=torch.long))
    with pytest.raises(UserError, match="d_model 6, the direction 5"):
        null_directions("placebo", torch.ones(5), 2, acts=acts, labels=labels)


def _variance(u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u^T sigma u / |u|^2 per row: [k, d] -> [k]."""
    return torch.einsum("ki,ij,kj->k", u, sigma, u) / (u * u).sum(-1)


def test_activation_built_direction_does_not_beat_a_data_shaped_null_without_a_class_effect():
    """Rows from an anisotropic Gaussian (spectrum 1 / k^2: top eigenvalue 39x the mean), labels independent of
    the rows. The
    contrastive direction r lies along the high-variance axes like any mean difference of the data, so its
    variance u^T Sigma u (u = r / |r|) beats isotropic directions nearly always; against the placebo and
    covariance nulls it is 'significant' (z > 1.96) only at about the one-sided nominal rate."""
    d, m, n_null, n_runs = 64, 200, 50, 200
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 2
    assert 38 < float(spectrum[0] / spectrum.mean()) < 40
    beats = {kind: 0 for kind in NULLS}
    for seed in range(n_runs):
        g = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        sigma = rotation @ torch.diag(spectrum) @ rotation.T  # [d, d]
        acts = torch.randn(m, d, generator=g, dtype=torch.float64) * spectrum.sqrt() @ rotation.T  # [m, d] ~ N(0, sigma)
        labels = torch.randperm(m, generator=g)[: m // 2]
        labels = torch.zeros(m, dtype=torch.long).index_fill(0, labels, 1)  # no class effect
        r = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)  # [d]
        for kind in NULLS:
            nulls = null_directions(kind, r, n_null, generator=seed, acts=acts, labels=labels).double()
            beats[kind] += zscore(float(_variance(r[None], sigma)[0]), _variance(nulls, sigma)) > 1.96
    assert beats["isotropic"] >= 0.9 * n_runs, beats
    assert beats["placebo"] <= 0.1 * n_runs and beats["covariance"] <= 0.1 * n_runs, beats
