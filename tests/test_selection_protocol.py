"""Choose on one set of problems, report on another: `interp.selection.select_reasoning_direction` without a model.

Independent references: a no-effect simulation (every candidate's and every null direction's per-prompt effect is
iid N(0, 1) noise), where a valid protocol rejects at the nominal rate; the same simulation pushed through the
OLD protocol (the winner's z-score and CI computed on the prompts that chose it) shows the inflation the split
guards against; a planted effect that must be selected and detected; the reference distribution of a z-score
against m iid nulls, sqrt(1 + 1/m) * t_{m-1} (scipy).
"""

import pytest
import torch
from scipy import stats

from interp.directions import random_directions
from interp.errors import UserError
from interp.selection import (
    PER_PROMPT_KEYS,
    bootstrap_ci,
    select_direction,
    select_reasoning_direction,
    split_selection_report,
    zscore,
)

N_POS, N_LAYERS, D = 7, 32, 16
LAYERS = list(range(26))  # 7 x 26 = 182 candidates, the size of the QwQ run's search
N_PROBLEMS, N_SELECTION, N_REPORT, N_NULL = 60, 30, 30, 50
PLANTED = (2, 5)  # (position, layer) of the candidate with a real effect in the planted simulation


class NoiseScorer:
    """Per-prompt ablation and induction effects iid N(0, 1) and KL iid Exp(mean 0.01) for every direction
    on every problem: no direction has an effect, except `planted` (matched by value), whose ablation and
    induction effects are shifted by `shift`. Records the problems of each call."""

    def __init__(self, seed: int, planted: torch.Tensor | None = None, shift: float = 0.0):
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.planted, self.shift, self.calls = planted, shift, []

    def __call__(self, directions, layers, problems):
        self.calls.append(list(problems))
        k, n = len(directions), len(problems)
        shift = torch.zeros(k, 1, dtype=torch.float64)
        if self.planted is not None:
            shift[(directions == self.planted).all(-1)] = self.shift
        per_prompt = {  # [k, n] each
            "ablation_score": shift + torch.randn(k, n, generator=self.generator, dtype=torch.float64),
            "induction_score": shift + torch.randn(k, n, generator=self.generator, dtype=torch.float64),
            "kl": -0.01 * torch.rand(k, n, generator=self.generator, dtype=torch.float64).log(),
        }
        means = {key: values.mean(1).tolist() for key, values in per_prompt.items()}
        return [{**{key: means[key][i] for key in means}, **{PER_PROMPT_KEYS[key]: values[i]
                 for key, values in per_prompt.items()}} for i in range(k)]  # fmt: skip


def _candidates(seed: int) -> torch.Tensor:
    return torch.randn(N_POS, N_LAYERS, D, generator=torch.Generator().manual_seed(seed))  # [n_pos, n_layers, d]


def _nulls(seed: int):
    return lambda best, r: random_directions(r, N_NULL, generator=seed)  # [N_NULL, D], norm |r|


def _new_protocol(seed: int, scorer: NoiseScorer):
    return select_reasoning_direction(
        _candidates(seed), LAYERS, list(range(N_PROBLEMS)), scorer, n_selection=N_SELECTION, n_report=N_REPORT,
        seed=seed, kl_threshold=0.1, null_factory=_nulls(seed), n_bootstrap=1000,
    )  # fmt: skip


def _old_protocol(seed: int, scorer: NoiseScorer) -> tuple[float, list[float]]:
    """What the module did before: choose, then z-score and CI the winner on the SAME prompts (ablation_score)."""
    candidates, problems = _candidates(seed), list(range(N_SELECTION))
    keys = [(p, layer) for p in range(N_POS) for layer in LAYERS]
    rows = scorer(torch.stack([candidates[k] for k in keys]), [k[1] for k in keys], problems)
    for (p, layer), row in zip(keys, rows):
        row.update(position=p, layer=layer)
    best, _ = select_direction(rows, n_layers=N_LAYERS, kl_threshold=0.1)
    r = candidates[best["position"], best["layer"]]
    null = scorer(_nulls(seed)(best, r), [best["layer"]] * N_NULL, problems)
    z = zscore(best["ablation_score"], torch.tensor([row["ablation_score"] for row in null], dtype=torch.float64))
    return z, list(bootstrap_ci(best["ablation_per_prompt"], seed=seed))


def _excludes_zero(ci) -> bool:
    return ci[0] > 0 or ci[1] < 0


def test_no_effect_rejects_at_the_nominal_rate_and_the_old_protocol_does_not():
    n_runs = 400
    new_z, new_ci, old_z, old_ci = [], [], [], []
    for seed in range(n_runs):
        result = _new_protocol(seed, NoiseScorer(seed))
        assert result.selected is not None
        new_z.append(result.report["zscores"]["ablation_score"])
        new_ci.append(_excludes_zero(result.report["ci"]["ablation_score"]))
        z, ci = _old_protocol(seed, NoiseScorer(seed))
        old_z.append(z)
        old_ci.append(_excludes_zero(ci))
    new_z, old_z = torch.tensor(new_z), torch.tensor(old_z)
    # z of one draw against N_NULL iid draws of the same law: sqrt(1 + 1/m) * t_{m-1}
    expected = 2 * stats.t.sf(1.96 / (1 + 1 / N_NULL) ** 0.5, N_NULL - 1)  # ~0.058
    band = 4 * (expected * (1 - expected) / n_runs) ** 0.5  # 4 binomial standard deviations
    rate_z = float((new_z.abs() > 1.96).double().mean())
    assert abs(rate_z - expected) < band, (rate_z, expected)
    rate_ci = sum(new_ci) / n_runs  # percentile bootstrap of a mean of 30: slightly anti-conservative, ~6%
    assert 0.02 <= rate_ci <= 0.10, rate_ci
    assert abs(float(new_z.median())) < 0.2
    # the same simulation through the old protocol: the winner of 182 noise candidates looks "significant"
    assert float(old_z.median()) > 2.0
    assert sum(old_ci) / n_runs > 0.6 and float((old_z > 1.96).double().mean()) > 0.5


def test_planted_effect_is_selected_and_detected():
    n_runs, selected, detected = 100, 0, 0
    for seed in range(n_runs):
        planted = _candidates(seed)[PLANTED]
        result = _new_protocol(seed, NoiseScorer(seed, planted, shift=0.8))  # se of a mean of 30: 0.18
        if result.selected and (result.selected["position"], result.selected["layer"]) == PLANTED:
            selected += 1
            report = result.report
            detected += _excludes_zero(report["ci"]["ablation_score"]) and report["zscores"]["ablation_score"] > 1.96
    assert selected >= 0.9 * n_runs and detected >= 0.9 * selected


def test_candidates_see_only_selection_problems_and_the_report_only_report_problems():
    scorer = NoiseScorer(0)
    result = _new_protocol(0, scorer)
    assert len(scorer.calls) == 2
    assert scorer.calls[0] == result.selection_problems and scorer.calls[1] == result.report_problems
    assert not set(result.selection_problems) & set(result.report_problems)
    assert len(result.selection_problems) == N_SELECTION and len(result.report_problems) == N_REPORT
    assert len(result.table) == N_POS * len(LAYERS) and sum(row["selected"] for row in result.table) == 1
    assert result.null_directions.shape == (N_NULL, D)
    # the reported numbers are the report call's: means of its per-prompt values, CIs their bootstrap
    for key, values in result.report["per_prompt"].items():
        assert len(values) == N_REPORT
        assert result.report["scores"][key] == pytest.approx(float(values.mean()), abs=1e-12)
        assert result.report["ci"][key] == list(bootstrap_ci(values, seed=0))
        null = torch.tensor([row[key] for row in result.report["null"]], dtype=torch.float64)
        assert result.report["zscores"][key] == zscore(result.report["scores"][key], null)


def test_no_nulls_still_reports_on_the_report_set():
    result = select_reasoning_direction(_candidates(1), LAYERS, list(range(10)), NoiseScorer(1), n_selection=4,
                                        n_report=6, seed=1, kl_threshold=0.1)  # fmt: skip
    assert result.null_directions is None and result.report["zscores"] is None and result.report["null"] == []
    assert len(result.report["per_prompt"]["ablation_score"]) == 6
    nothing = select_reasoning_direction(_candidates(1), LAYERS, list(range(10)), NoiseScorer(1), n_selection=4,
                                         seed=1, kl_threshold=-1.0)  # every candidate fails the KL filter
    assert nothing.selected is None and nothing.report is None and nothing.report_problems


def test_split_selection_report():
    selection, report = split_selection_report(20, 5, 7, seed=3)
    assert len(selection) == 5 and len(report) == 7 and not set(selection) & set(report)
    assert selection == sorted(selection) and set(selection) | set(report) <= set(range(20))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    assert selection == sorted(order[:5]) and report == sorted(order[5:12])
    assert split_selection_report(20, 5, 7, seed=3) == (selection, report)
    # too few problems: both sets shrink in proportion, disjoint, covering everything
    for n, n_sel, n_rep, expected in ((2, 2, 2, (1, 1)), (4, 3, 3, (2, 2)), (10, 8, 2, (8, 2)), (5, 1, 9, (1, 4))):
        selection, report = split_selection_report(n, n_sel, n_rep)
        assert (len(selection), len(report)) == expected and not set(selection) & set(report)
    with pytest.raises(UserError, match="at least 2"):
        split_selection_report(1, 2, 2)
    with pytest.raises(UserError, match="n_report >= 1"):
        split_selection_report(10, 2, 0)
