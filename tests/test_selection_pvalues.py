"""`null_pvalues`: the effect of a chosen direction against its m null directions, calibrated for small m; what an
undefined number becomes (NaN with a reason, JSON null), and the rank p-value's floor 1 / (m + 1)."""

import json
import math

import pytest
import torch

from interp.directions import load_directions, save_directions
from interp.selection import null_pvalues, pvalue_definitions, zscore


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


def test_a_zero_spread_null_gives_nan_with_a_reason_not_infinity():
    null = torch.full((5,), 0.1, dtype=torch.float64)
    assert math.isnan(zscore(0.1 + 1e-9, null)) and math.isnan(zscore(-3.0, null))
    p = null_pvalues(0.1 + 1e-9, null)
    assert math.isnan(p["t"]) and "zero-spread null" in p["reason"]
    assert p["rank"] == pytest.approx(1 / 6)  # no null >= effect: still defined under exchangeability
    assert zscore(0.1, null) == 0.0 and null_pvalues(0.1, null) == {"t": 1.0, "rank": 1.0}  # nothing to tell apart
    assert "reason" not in null_pvalues(2.5, torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64))


def test_save_directions_writes_non_finite_numbers_as_json_null(tmp_path):
    meta = {"selection": {"report": {"zscores": {"kl": math.nan, "ablation_score": math.inf},
                                     "pvalues": {"kl": {"t": math.nan, "rank": 0.5}}, "ci": [[-math.inf, 1.0]]}}}
    save_directions(tmp_path, torch.ones(2, 4), meta)
    text = (tmp_path / "reasoning_directions.json").read_text()

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    report = json.loads(text, parse_constant=reject)["selection"]["report"]  # strict: no NaN / Infinity
    assert report == {"zscores": {"kl": None, "ablation_score": None}, "pvalues": {"kl": {"t": None, "rank": 0.5}},
                      "ci": [[None, 1.0]]}  # fmt: skip
    assert load_directions(tmp_path)[1]["selection"]["report"] == report


def test_the_default_number_of_nulls_lets_the_rank_pvalue_reach_005():
    """With m nulls the rank p-value is >= 1 / (m + 1): the module's default m = 19 is the smallest with 0.05."""
    from lightning_modules.directions import ReasoningDirectionModule

    m = ReasoningDirectionModule().hparams.n_random
    assert m == 19
    best = null_pvalues(10.0, torch.linspace(-1, 1, m, dtype=torch.float64))["rank"]
    assert best == pytest.approx(1 / (m + 1)) and best <= 0.05
    assert null_pvalues(10.0, torch.linspace(-1, 1, 18, dtype=torch.float64))["rank"] > 0.05
    assert ">= 0.05" in pvalue_definitions(m)["rank"]
