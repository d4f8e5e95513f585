"""`null_pvalues`: the effect of a chosen direction against its m null directions, calibrated for small m."""

import math

import pytest
import torch

from interp.selection import null_pvalues, zscore


def test_t_pvalue_matches_the_closed_form_for_two_degrees_of_freedom():
    # m = 3 nulls -> Student t with 2 degrees of freedom: P(|T| > t) = 1 - t / sqrt(2 + t^2)
    null = torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64)
    effect = 2.5
    t = zscore(effect, null) / math.sqrt(1 + 1 / 3)
    assert null_pvalues(effect, null)["t"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


def test_rank_pvalue_counts_nulls_at_least_as_large():
    null = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert null_pvalues(2.0, null)["rank"] == pytest.approx((1 + 2) / 5)
    assert null_pvalues(9.0, null)["rank"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("m", [4, 8])
def test_no_effect_rejects_at_the_nominal_rate(m):
    """Effect and nulls iid normal (no real effect): p_t < 0.05 in ~5% of runs; the naive |z| > 1.96 far more."""
    generator = torch.Generator().manual_seed(0)
    runs = 4000
    draws = torch.randn(runs, m + 1, generator=generator, dtype=torch.float64)
    p_t = torch.tensor([null_pvalues(float(row[0]), row[1:])["t"] for row in draws])
    z = torch.tensor([zscore(float(row[0]), row[1:]) for row in draws])
    p_rank = torch.tensor([null_pvalues(float(row[0]), row[1:])["rank"] for row in draws])
    sd = math.sqrt(0.05 * 0.95 / runs)
    assert abs(float((p_t < 0.05).double().mean()) - 0.05) < 4 * sd
    assert float((z.abs() > 1.96).double().mean()) > 0.05 + 4 * sd  # why the z-score alone is not a test
    # the rank p-value is uniform on {1/(m+1), ..., 1}: P(p <= k/(m+1)) = k/(m+1)
    sd_rank = math.sqrt(0.5 * 0.5 / runs)
    assert abs(float((p_rank <= 0.5).double().mean()) - math.floor(0.5 * (m + 1)) / (m + 1)) < 4 * sd_rank
