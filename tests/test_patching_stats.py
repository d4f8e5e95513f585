"""The patching heatmap's statistics: ratio of means over pairs, relative cutoff, per-pair values, Fieller CI.

Independent references: the audit's planted case computed by hand; the sweep recomputed from single-prompt HF
forwards and a hand-written patch hook; Fieller's bounds as numpy's roots of the expanded quadratic (np.cov,
scipy's t quantile); simulated populations whose true ratio is planted (coverage). Metric rounding: the sweep's metrics come from float32 forwards of
left-padded batches, equal to unpadded single-prompt forwards to ~1e-5 (tests/test_patching.py).
"""

import json
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy import stats

from callbacks.patching import PatchingCallback
from datamodules.problems import DatasetSource
from datamodules.prompts import ReasoningPromptsDataModule
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.patching_stats import DEFINITION, fieller_ci, logit_difference, summarise, target_log_prob
from interp.patching_sweep import attribution_patching, patching_sweep
from interp.positions import padded_position_ids
from interp.prompts import format_chat_prompt, post_instruction_ids, tokenize_prompts

LAST = 31
METRIC_ATOL = 1e-5  # float32 forward, padded batch vs single prompt


def _numpy_ratio(r, c, p):
    """Ratio of means over the last axis: (mean p - mean c) / (mean r - mean c), numpy float64."""
    return (p.mean(-1) - c.mean(-1)) / (r.mean(-1) - c.mean(-1))


def _numpy_fieller(r, c, p, alpha=0.05):
    """Fieller's bounds for one cell (r, c, p [n]): the roots of the expanded quadratic in rho,
    (bbar^2 - q s_bb) rho^2 - 2 (abar bbar - q s_ab) rho + (abar^2 - q s_aa) = 0, q = t^2 / n; NaN if unbounded."""
    a, b, n = p - c, r - c, len(r)
    q = stats.t.ppf(1 - alpha / 2, n - 1) ** 2 / n
    (s_aa, s_ab), (_, s_bb) = np.cov(a, b)  # ddof 1
    big_a = b.mean() ** 2 - q * s_bb
    if big_a <= 0:
        return np.array([np.nan, np.nan])
    return np.sort(np.roots([big_a, -2 * (a.mean() * b.mean() - q * s_ab), a.mean() ** 2 - q * s_aa]).real)


def _assert_fieller(result, r, c, p, alpha=0.05, rtol=1e-10):
    """Every cell's (ci_low, ci_high) equals _numpy_fieller to rtol of the larger bound (NaN where unbounded)."""
    for cell in np.ndindex(p.shape[1:]):
        expected = _numpy_fieller(r, c, p[(slice(None), *cell)], alpha)
        got = np.array([float(result.ci_low[cell]), float(result.ci_high[cell])])
        np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * np.abs(expected).max(), equal_nan=True)


def _planted(table: dict):
    """metric_fn returning table[run][pair] whatever the logits: a planted truth for the sweep's bookkeeping."""

    def metric(logits, info):
        return torch.tensor(table[info["run"]], dtype=torch.float32)[info["pair_index"]] + 0 * logits[:, 0]

    return metric


@pytest.fixture(scope="module")
def pairs(tiny):
    _, tokenizer = tiny
    reasoning = ["Solve step by step: 17*23 = ?", "Prove that the square root of 2 is irrational.", "What is 9*9?"]
    control = ["What colour is the sky?", "Say hello to my cat please, and then to the dog.", "Name a fruit."]
    return [format_chat_prompt(tokenizer, q) for q in reasoning], [format_chat_prompt(tokenizer, q) for q in control]


# ----------------------------------------------------------------------------------------- sweeps


def test_audit_case_reports_the_ratio_of_means(tiny, pairs):
    """A pair recovering 0.5 next to a pair with a tiny gap: the mean of ratios was (0.5 + 48) / 2 = 24.25."""
    model, tokenizer = tiny
    reasoning, control = (p[:2] for p in pairs)
    tiny_gap = 2.0**-10  # exact in float32, so the hand computation below sees the sweep's values
    metric = _planted({"reasoning": [1.0, tiny_gap], "control": [0.0, 0.0], "patched": [0.5, 48 * tiny_gap]})
    result = patching_sweep(model, tokenizer, reasoning, control, metric, layers=[2, LAST], batch_size=1)
    by_hand = ((0.5 + 48 * tiny_gap) / 2 - 0.0) / ((1.0 + tiny_gap) / 2 - 0.0)  # = 0.5464...
    torch.testing.assert_close(result.recovered, torch.full((2, 7), by_hand, dtype=torch.float64), rtol=1e-15, atol=0)
    assert not bool(result.cut.any()) and result.cut_reason is None
    # per-pair ratios are a diagnostic only: pair 1's gap is under rel_tol x mean |gap|, so its ratio is NaN
    assert bool((result.per_pair_ratio[0] == 0.5).all()) and bool(result.per_pair_ratio[1].isnan().all())
    assert result.gap_scale == pytest.approx((1.0 + tiny_gap) / 2, rel=1e-15)
    assert result.cutoff == pytest.approx(0.1 * result.gap_scale, rel=1e-15)


def test_sweep_equals_a_direct_computation(tiny, pairs):
    """recovered = (mean patched - mean control) / (mean reasoning - mean control) from metrics computed one
    prompt at a time (unpadded HF forwards; the patch written by a plain hook from output_hidden_states)."""
    model, tokenizer = tiny
    reasoning, control = pairs
    a_id, b_id = tokenizer.encode("1")[0], tokenizer.encode("The")[0]
    layers, n_post = [3, 17], len(post_instruction_ids(tokenizer))
    result = patching_sweep(model, tokenizer, reasoning, control, logit_difference(a_id, b_id), layers=layers,
                            batch_size=3, alpha=0.3)  # fmt: skip

    def run(prompt, hooks=()):  # -> (metric at the last position, hidden_states of the run, its length)
        batch = tokenize_prompts(tokenizer, [prompt])
        with torch.no_grad(), hooked(model, hooks):
            out = model(**batch, position_ids=padded_position_ids(batch["attention_mask"]), output_hidden_states=True)
        return float(out.logits[0, -1, a_id] - out.logits[0, -1, b_id]), out.hidden_states, batch["input_ids"].shape[1]

    def write(pos, value):
        def fn(hidden):
            new = hidden.clone()
            new[0, pos] = value
            return new

        return fn

    r, c, p = np.zeros(3), np.zeros(3), np.zeros((3, 2, n_post))
    for i in range(3):
        r[i], hidden_r, seq_r = run(reasoning[i])
        c[i], _, seq_c = run(control[i])
        for j, layer in enumerate(layers):
            for k in range(n_post):
                value = hidden_r[layer + 1][0, seq_r - n_post + k]  # blocks.{layer}.resid_post
                p[i, j, k], _, _ = run(control[i], [(site_name(layer), write(seq_c - n_post + k, value))])
    for got, expected in ((result.metric_reasoning, r), (result.metric_control, c), (result.metric_patched, p)):
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=METRIC_ATOL)
    direct = _numpy_ratio(r, c, np.moveaxis(p, 0, -1))  # [2, n_post]
    # first-order error of a ratio whose three means each carry <= METRIC_ATOL
    tol = 2 * METRIC_ATOL * (1 + np.abs(direct)) / abs(r.mean() - c.mean())
    np.testing.assert_array_less(np.abs(result.recovered.numpy() - direct), tol)
    mean_of_ratios = ((p - c[:, None, None]) / (r - c)[:, None, None]).mean(0)  # the old headline
    assert np.abs(mean_of_ratios - direct).max() > 100 * tol.max()  # the two definitions differ here
    # the CI: numpy's Fieller bounds on the sweep's own metrics (3 pairs; a 70% interval so that it is bounded)
    mr, mc, mp = (t.numpy() for t in (result.metric_reasoning, result.metric_control, result.metric_patched))
    assert not bool(result.ci_low.isnan().any()) and result.ci_reason is None
    _assert_fieller(result, mr, mc, mp, alpha=0.3)


def test_zero_mean_gap_gives_nan_with_a_reason(tiny, pairs):
    """Gaps +1 and -1 cancel: no inf, no error; every cell cut, with its reason, and no patched forward run."""
    model, tokenizer = tiny
    reasoning, control = (p[:2] for p in pairs)
    metric = _planted({"reasoning": [1.0, -1.0], "control": [0.0, 0.0], "patched": [0.5, 0.5]})
    result = patching_sweep(model, tokenizer, reasoning, control, metric, layers=[0, LAST])
    assert result.mean_gap == 0.0 and result.gap_scale == 1.0
    assert bool(result.cut.all()) and bool(result.recovered.isnan().all()) and not bool(result.recovered.isinf().any())
    assert bool(result.ci_low.isnan().all()) and bool(result.ci_high.isnan().all())
    assert "<= rel_tol 0.1" in result.cut_reason and bool(result.metric_patched.isnan().all())
    summary = result.to_dict()
    json.dumps(summary, allow_nan=False)  # JSON-ready: NaN became null
    assert summary["cut"] == [[True] * 7] * 2 and summary["recovered"] == [[None] * 7] * 2


def test_attribution_is_normalised_by_the_mean_gap(tiny, pairs):
    model, tokenizer = tiny
    reasoning, control = pairs
    metric = logit_difference(tokenizer.encode("1")[0], tokenizer.encode("The")[0])
    result = attribution_patching(model, tokenizer, reasoning, control, metric, layers=[0, 20], alpha=0.3)
    r, c, p = (t.numpy() for t in (result.metric_reasoning, result.metric_control, result.metric_patched))
    direct = _numpy_ratio(r, c, np.moveaxis(p, 0, -1))
    np.testing.assert_allclose(result.recovered.numpy(), direct, rtol=1e-12, atol=0)
    assert np.abs(((p - c[:, None, None]) / (r - c)[:, None, None]).mean(0) - direct).max() > 1e-3
    assert not bool(result.ci_low.isnan().any())
    _assert_fieller(result, r, c, p, alpha=0.3)


# ----------------------------------------------------------------------------------------- summary alone


def _summary(r, c, p, **kwargs):
    """summarise on numpy metrics: r, c [n_pairs], p [n_pairs, n_layers, n_post]."""
    p = np.asarray(p, dtype=float)
    args = [torch.tensor(np.asarray(x, dtype=float)) for x in (r, c, p)]
    return summarise("exact", *args, list(range(p.shape[1])), [str(k) for k in range(p.shape[2])], **kwargs)


def test_relative_cutoff_and_per_pair_diagnostics():
    r, c = np.array([1.0, -0.85]), np.array([0.0, 0.0])  # mean gap 0.075, mean |gap| 0.925: ratio 0.081
    p = np.array([[[0.4]], [[0.1]]])
    cut = _summary(r, c, p)  # rel_tol 0.1
    assert bool(cut.cut.all()) and bool(cut.recovered.isnan().all()) and cut.cutoff == pytest.approx(0.0925, rel=1e-14)
    kept = _summary(r, c, p, rel_tol=0.05)
    assert not bool(kept.cut.any()) and kept.cut_reason is None
    assert float(kept.recovered[0, 0]) == pytest.approx((0.25 - 0.0) / (0.075 - 0.0), rel=1e-13)
    torch.testing.assert_close(kept.per_pair_ratio[:, 0, 0], torch.tensor([0.4, 0.1 / -0.85], dtype=torch.float64))
    # rel_tol = 0 cuts exact zeros only: an all-zero gap is cut, whatever the patched values
    assert bool(_summary([2.0, 3.0], [2.0, 3.0], [[[1.0]], [[5.0]]], rel_tol=0.0).cut.all())
    assert not bool(_summary([2.0, 3.0 + 1e-9], [2.0, 3.0], [[[1.0]], [[5.0]]], rel_tol=0.0).cut.any())
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserError, match="rel_tol must be in"):
            _summary(r, c, p, rel_tol=bad)
    for bad in (0.0, 1.0):
        with pytest.raises(UserError, match="alpha"):
            _summary(r, c, p, alpha=bad)


def test_ci_is_fiellers_interval_on_random_cases():
    """Bounds equal numpy's roots of the expanded quadratic (float64, 1e-10 of the bound's size), on random
    heterogeneous pairs, several n and levels; bounded and unbounded cases both occur and agree with numpy."""
    rng = np.random.default_rng(0)
    seen = {"bounded": 0, "unbounded": 0}
    for n in (2, 3, 5, 8, 20, 50):
        for alpha in (0.05, 0.3):
            c = rng.normal(-5.0, 2.0, n)
            r = c + rng.normal(rng.normal(0.5, 1.0), rng.uniform(0.2, 2.0), n)
            p = c[:, None, None] + rng.uniform(-0.5, 1.5, (n, 2, 3)) * (r - c)[:, None, None]
            p = p + rng.normal(0.0, rng.uniform(0.01, 1.0), (n, 2, 3))
            result = _summary(r, c, p, rel_tol=0.0, alpha=alpha)  # rel_tol 0: nothing is cut
            _assert_fieller(result, r, c, p, alpha)
            bounded = not bool(result.ci_low.isnan().any())
            seen["bounded" if bounded else "unbounded"] += 1
            assert (result.ci_reason is None) == bounded
            if bounded:  # the interval holds the point estimate
                assert bool((result.ci_low <= result.recovered).all() and (result.recovered <= result.ci_high).all())
    assert seen["bounded"] >= 3 and seen["unbounded"] >= 1, seen


def test_ci_is_nan_with_a_reason_when_the_gap_is_not_significant():
    """Gaps 2, -1, 1.5, -0.5: mean 0.5 passes the cutoff (0.125) but is 0.68 standard errors from zero, under
    t_3 = 3.18: Fieller's 95% set is unbounded. At level 10% (t_3 = 0.14) the same data give a bounded CI.
    The old bootstrap reported a CI here whenever no resample happened to be cut."""
    gap = np.array([2.0, -1.0, 1.5, -0.5])
    c = np.zeros(4)
    p = (0.5 * gap + np.array([0.1, -0.2, 0.3, 0.0]))[:, None, None]
    result = _summary(gap, c, p)
    assert np.isfinite(float(result.recovered[0, 0])) and not bool(result.cut.any())
    assert bool(result.ci_low.isnan().all() and result.ci_high.isnan().all())
    assert "not significantly non-zero at level 0.05" in result.ci_reason
    assert result.mean_gap_se == pytest.approx(gap.std(ddof=1) / 2, rel=1e-14)
    assert result.t_quantile == pytest.approx(stats.t.ppf(0.975, 3), rel=1e-14)
    loose = _summary(gap, c, p, alpha=0.9)
    assert loose.ci_reason is None
    _assert_fieller(loose, gap, c, p, alpha=0.9)


def test_one_pair_has_a_point_estimate_and_no_ci():
    result = _summary([2.0], [0.0], [[[1.0, 3.0]]])
    assert result.recovered.tolist() == [[0.5, 1.5]] and not bool(result.cut.any())
    assert bool(result.ci_low.isnan().all() and result.ci_high.isnan().all()) and "needs >= 2 pairs" in result.ci_reason
    summary = result.to_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["recovered_ci_low"] == [[None, None]] and summary["t_quantile"] is None


def test_non_finite_metric_values_raise_naming_them(tiny, pairs):
    nan, inf = float("nan"), float("inf")
    with pytest.raises(UserError, match=r"non-finite \(NaN/inf\) metric values: control at pairs \[1\];"):
        _summary([1.0, 2.0], [0.0, nan], [[[0.5]], [[0.5]]])
    with pytest.raises(UserError, match=r"reasoning at pairs \[0\]; patched at pairs \[0, 2\]"):
        _summary([inf, 2.0, 1.0], [0.0, 0.0, 0.0], [[[-inf]], [[0.5]], [[nan]]])
    with pytest.raises(UserError, match=r"patched at pairs \[1\]"):
        _summary([1.0, 2.0], [0.0, 0.0], [[[0.5, 0.1]], [[0.5, -inf]]])
    # through the sweep: a metric_fn returning NaN for one pair's control run
    model, tokenizer = tiny
    metric = _planted({"reasoning": [1.0, 2.0], "control": [0.0, nan], "patched": [0.5, 0.5]})
    with pytest.raises(UserError, match=r"control at pairs \[1\]"):
        patching_sweep(model, tokenizer, pairs[0][:2], pairs[1][:2], metric, layers=[0])


def test_ci_is_invariant_to_shift_and_scale_and_exact_for_a_common_fraction():
    rng = np.random.default_rng(3)
    c = rng.normal(0.0, 1.0, 6)
    r = c + rng.normal(2.0, 0.5, 6)
    p = c[:, None, None] + rng.uniform(0, 1, (6, 1, 2)) * (r - c)[:, None, None]
    base = _summary(r, c, p)
    for shift, scale in ((100.0, 1.0), (0.0, -3.0), (-7.0, 0.01)):
        moved = _summary(scale * r + shift, scale * c + shift, scale * p + shift)
        for got, expected in ((moved.ci_low, base.ci_low), (moved.ci_high, base.ci_high)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    # every pair recovers exactly 0.25: a_i = 0.25 b_i, no spread around the ratio, a zero-width CI at 0.25
    same = _summary(r, c, (c + 0.25 * (r - c))[:, None, None])
    assert float(same.ci_low[0, 0]) == pytest.approx(0.25, rel=1e-12) == float(same.ci_high[0, 0])


def test_ci_coverage_on_simulated_pairs():
    """2000 simulated datasets per case, ratio of population means planted at 0.5; a NaN CI counts as a miss.
    Bivariate normal (a_i, b_i), where Fieller is exact: coverage within 3 binomial SDs of 0.95. Heterogeneous
    pairs (each recovers its own fraction ~ U(0, 1), so (a, b) is not normal): 0.93 <= coverage <= 0.97.
    The old percentile bootstrap covered 0.83 at n = 5 (the audit)."""
    n_sets, sd = 2000, np.sqrt(0.95 * 0.05 / 2000)
    for n in (5, 20):
        rng = np.random.default_rng(n)
        b = rng.normal(2.0, 0.5, (n_sets, n))
        a = 0.5 * b + rng.normal(0.0, 0.5, (n_sets, n))
        c = rng.normal(-5.0, 2.0, (n_sets, n))
        gap = rng.normal(2.0, 0.5, (n_sets, n))
        patched = c + rng.uniform(0.0, 1.0, (n_sets, n)) * gap + rng.normal(0.0, 0.5, (n_sets, n))
        for case, (num, den) in {"normal": (a, b), "heterogeneous": (patched - c, gap)}.items():
            low, high = (x.numpy() for x in fieller_ci(torch.tensor(num), torch.tensor(den), 0.05))  # [n_sets]
            coverage = float(np.mean((low <= 0.5) & (0.5 <= high)))
            if case == "normal":
                assert abs(coverage - 0.95) <= 3 * sd, (n, case, coverage)
            else:
                assert 0.93 <= coverage <= 0.97, (n, case, coverage)


def test_ci_shrinks_with_more_pairs():
    rng = np.random.default_rng(1)

    def draw(n):  # true ratio of means 0.4: E[p - c] = 0.4 E[r - c]
        r, c = rng.normal(1.0, 0.3, n), rng.normal(0.0, 0.3, n)
        return r, c, (c + 0.4 * (r - c) + rng.normal(0.0, 0.1, n))[:, None, None]

    widths = []
    for result in (_summary(*draw(20)), _summary(*draw(2000))):
        low, point, high = float(result.ci_low[0, 0]), float(result.recovered[0, 0]), float(result.ci_high[0, 0])
        assert low < point < high and low < 0.4 < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # ~ 1 / sqrt(100) = 1/10 expected


def test_result_to_dict_holds_every_reported_number():
    r, c, p = [1.0, 2.0, 2.5], [0.0, 0.5, 0.0], [[[0.5, 0.2]], [[1.0, 0.5]], [[1.0, 1.5]]]
    result = _summary(r, c, p, alpha=0.2)
    summary = result.to_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["definition"] == DEFINITION and "ratio of means" in DEFINITION and "Fieller" in DEFINITION
    gap = np.array(r) - np.array(c)  # [1, 1.5, 2.5]
    assert summary["recovered"][0] == pytest.approx([(2.5 / 3 - 0.5 / 3) / (5 / 3), (2.2 / 3 - 0.5 / 3) / (5 / 3)], rel=1e-14)
    assert summary["metric_reasoning"] == r and summary["metric_control"] == c and summary["metric_patched"] == p
    assert summary["cut"] == [[False, False]] and summary["ci_method"] == "fieller" and summary["ci_reason"] is None
    assert summary["ci_level"] == pytest.approx(0.8) and summary["t_quantile"] == pytest.approx(stats.t.ppf(0.9, 2))
    assert summary["mean_gap_se"] == pytest.approx(gap.std(ddof=1) / np.sqrt(3), rel=1e-14)
    assert (summary["recovered_ci_low"], summary["recovered_ci_high"]) == (result.ci_low.tolist(), result.ci_high.tolist())
    assert "n_bootstrap" not in summary and "bootstrap_seed" not in summary
    assert summary["per_pair_ratio"][1][0] == pytest.approx([(1.0 - 0.5) / 1.5, 0.0])


# ----------------------------------------------------------------------------------------- callback


def test_callback_writes_the_ratio_of_means_and_its_inputs(tiny):
    """PatchingCallback.evaluate (no Trainer needed): its JSON equals a direct patching_sweep on the rows it
    names, and its heatmap is the ratio of means of the per-pair metrics it writes."""
    model, tokenizer = tiny
    dm = ReasoningPromptsDataModule(backbone="tiny", sources=[DatasetSource("gsm8k", limit=5),
                                                              DatasetSource("math", limit=5)])  # fmt: skip
    callback = PatchingCallback(n_pairs=2, layers=[2, LAST], seed=1)
    trainer, module = SimpleNamespace(datamodule=dm), SimpleNamespace(backbone_model=model, tokenizer=tokenizer)
    results, scalars, figures = callback.evaluate(trainer, module, fast=False)
    rows = {row.row_index: row for row in dm.rows}
    reasoning = [rows[i].prompt for i in results["reasoning_rows"]]
    control = [rows[i].prompt for i in results["control_rows"]]
    reference = patching_sweep(model, tokenizer, reasoning, control, target_log_prob(results["target_tokens"]),
                               layers=[2, LAST])  # fmt: skip
    json.dumps(results, allow_nan=False)
    assert results["definition"] == DEFINITION and results["rel_tol"] == 0.1 and results["cut"] == [[False] * 7] * 2
    r, c, p = (np.array(results[key]) for key in ("metric_reasoning", "metric_control", "metric_patched"))
    np.testing.assert_allclose(np.array(results["recovered"]), _numpy_ratio(r, c, np.moveaxis(p, 0, -1)), rtol=1e-12)
    for key, expected in (("recovered", reference.recovered), ("recovered_ci_low", reference.ci_low),
                          ("recovered_ci_high", reference.ci_high), ("metric_patched", reference.metric_patched)):  # fmt: skip
        got = torch.tensor(np.array(results[key], dtype=float))  # null -> NaN
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, equal_nan=True)
    assert results["ci_method"] == "fieller" and results["ci_reason"] == reference.ci_reason
    assert results["cutoff"] == pytest.approx(0.1 * np.abs(r - c).mean(), rel=1e-12)
    assert scalars["patching/recovered/L31"] == pytest.approx(max(results["recovered"][1]), rel=1e-12)
    assert results["n_pairs"] == 2 and scalars["patching/n_usable_pairs"] == 2.0 and scalars["patching/metric_gap"] == pytest.approx((r - c).mean())
    assert list(figures) == ["patching/recovered_heatmap"]
    plt.close(figures["patching/recovered_heatmap"])
