"""The max-statistic null of a selected direction (`interp.selection.searched_null`), without a model.

Independent references: a no-effect world in which a direction's effect depends on the direction itself
(g(v) = c * d * v^T Sigma v / (|v|^2 tr Sigma) in an anisotropic space, the same on every problem, plus iid N(0, 1)
per-problem noise) and candidates, site nulls and searched-null candidates are all iid N(0, Sigma) draws: the
selected candidate is then no better than a null search's winner, so a calibrated test rejects at its nominal
rate, while the site null (fresh draws that never went through the maximum) rejects far more often; a planted
effect at one candidate that must be detected; a deterministic scorer whose winners are recomputed with torch.
"""

import pytest
import torch

from interp.errors import UserError
from interp.selection import PER_PROMPT_KEYS, searched_null, select_reasoning_direction, zscore

D, N_POS, N_LAYERS = 16, 3, 10  # 3 x 10 = 30 candidates searched
LAYERS = list(range(N_LAYERS))
LAM = 1.0 / torch.arange(1, D + 1, dtype=torch.float64)  # Sigma = diag(LAM): anisotropic
N_SELECTION = N_REPORT = 32
M = 9  # site nulls and searched-null draws per run: rank p-values are multiples of 1 / 10


def _draws(shape: tuple, seed: int) -> torch.Tensor:
    """iid N(0, Sigma) directions [*shape, D] (float32, as candidates are)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, D, generator=g, dtype=torch.float64) * LAM.sqrt()).float()


def _rows(per_prompt: dict) -> list[dict]:
    """Scorer rows from {key: [k, n] float64 per-prompt values}."""
    k = len(per_prompt["ablation_score"])
    return [{**{key: float(values[i].mean()) for key, values in per_prompt.items()},
             **{PER_PROMPT_KEYS[key]: values[i] for key, values in per_prompt.items()}} for i in range(k)]  # fmt: skip


class DirectionEffectScorer:
    """Per-prompt ablation effect g(v) + shift * [v is `planted`] + N(0, 1); induction 1 + 0.1 N(0, 1) (kept);
    KL 0 (kept). g depends on the direction only, so the best of many candidates stays best on new problems."""

    def __init__(self, seed: int, c: float = 1.0, planted: torch.Tensor | None = None, shift: float = 0.0):
        self.generator = torch.Generator().manual_seed(seed)
        self.c, self.planted, self.shift = c, planted, shift

    def __call__(self, directions, layers, problems):
        v, k, n = directions.double(), len(directions), len(problems)
        effect = self.c * D * (v**2 * LAM).sum(1) / (v**2).sum(1) / LAM.sum()  # [k]
        if self.planted is not None:
            effect = effect + self.shift * (directions == self.planted).all(-1)
        noise = torch.randn(2, k, n, generator=self.generator, dtype=torch.float64)
        return _rows({"ablation_score": effect[:, None] + noise[0], "induction_score": 1 + 0.1 * noise[1],
                      "kl": torch.zeros(k, n, dtype=torch.float64)})  # fmt: skip


def _run(seed: int, shift: float = 0.0):
    candidates = _draws((N_POS, N_LAYERS), seed)
    planted = candidates[1, 4] if shift else None
    return select_reasoning_direction(
        candidates, LAYERS, list(range(N_SELECTION + N_REPORT)), DirectionEffectScorer(seed + 1, 1.0, planted, shift),
        n_selection=N_SELECTION, n_report=N_REPORT, seed=seed, max_layer_fraction=1.0,
        null_factory=lambda best, r: _draws((M,), 10**6 + seed),  # fresh draws at the selected site
        searched_null_candidates=lambda j: _draws((N_POS, N_LAYERS), 10**7 + 100 * seed + j), n_searched_null=M,
        n_bootstrap=10,
    ).report  # fmt: skip


def test_searched_null_is_calibrated_where_the_site_null_is_not():
    runs = 300
    reports = [_run(seed) for seed in range(runs)]
    site_t = sum(r["pvalues"]["ablation_score"]["t"] < 0.05 for r in reports) / runs
    searched_t = sum(r["searched_pvalues"]["ablation_score"]["t"] < 0.05 for r in reports) / runs
    # rank p <= 1/10 has probability exactly 1/10 under exchangeability (binomial sd 0.017 at 300 runs)
    site_rank = sum(r["pvalues"]["ablation_score"]["rank"] <= 0.1 for r in reports) / runs
    searched_rank = sum(r["searched_pvalues"]["ablation_score"]["rank"] <= 0.1 for r in reports) / runs
    assert site_t > 0.25 and site_rank > 0.4  # what the searched null guards against (0.38 and 0.74 measured)
    assert searched_t <= 0.10
    assert abs(searched_rank - 0.1) < 4 * (0.1 * 0.9 / runs) ** 0.5
    assert all(len(r["searched_null"]) == M for r in reports)  # nothing is discarded in this world


def test_searched_null_detects_a_planted_effect():
    runs = 100
    reports = [_run(seed, shift=4.5) for seed in range(runs)]  # g/c spans [0.30, 4.7] over directions
    detected = sum(r["searched_pvalues"]["ablation_score"]["t"] < 0.05 for r in reports) / runs
    assert detected >= 0.8


class RecordingScorer:
    """Deterministic: per-prompt ablation v[0] * (1 + problem / 100), induction 1, KL v[1] (constant over
    prompts). Records (directions, layers, problems) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, directions, layers, problems):
        self.calls.append((directions.clone(), list(layers), list(problems)))
        v = directions.double()
        scale = 1 + torch.tensor(problems, dtype=torch.float64) / 100  # [n]
        ones = torch.ones(len(v), len(problems), dtype=torch.float64)
        return _rows({"ablation_score": v[:, :1] * scale, "induction_score": ones, "kl": v[:, 1:2] * ones})


def _null_draw(j: int) -> torch.Tensor:
    draw = torch.randn(N_POS, N_LAYERS, D, generator=torch.Generator().manual_seed(500 + j))
    draw[..., 1] = 1.0 if j == 1 else 0.0  # draw 1: every candidate's KL is over the threshold
    return draw  # [n_pos, n_layers, d]


def test_searched_null_selects_on_selection_problems_and_reports_on_report_problems():
    scorer, drawn = RecordingScorer(), []
    layers, n_null, selection, report = [0, 2, 5, 8, 9], 4, [1, 4, 6, 7], [0, 3, 9]

    def null_candidates(j):
        drawn.append(j)
        return _null_draw(j)

    rows = searched_null(null_candidates, layers, list(range(10, 20)), scorer, selection_idx=selection,
                         report_idx=report, n_null=n_null, max_layer_fraction=0.8, kl_threshold=0.1)  # fmt: skip
    assert drawn == list(range(n_null))
    *selection_calls, report_call = scorer.calls
    assert len(selection_calls) == n_null
    assert all(problems == [11, 14, 16, 17] for _, _, problems in selection_calls)
    assert report_call[2] == [10, 13, 19]
    # winners recomputed: layers below 0.8 * 10 only, highest v[0]; draw 1 has none (all KL > 0.1)
    kept = [layer for layer in layers if layer < 8]
    expected = []
    for j in (0, 2, 3):
        sites = [(p, layer) for p in range(N_POS) for layer in kept]
        p, layer = max(sites, key=lambda site: float(_null_draw(j)[site][0]))
        expected.append((j, p, layer, _null_draw(j)[p, layer]))
    assert [(row["draw"], row["position"], row["layer"]) for row in rows] == [e[:3] for e in expected]
    torch.testing.assert_close(report_call[0], torch.stack([e[3] for e in expected]), rtol=0, atol=0)
    assert report_call[1] == [e[2] for e in expected]
    report_scale = (1 + torch.tensor([10, 13, 19], dtype=torch.float64) / 100).mean()
    for row, (_, _, _, v) in zip(rows, expected):
        assert row["ablation_score"] == pytest.approx(float(v[0].double() * report_scale), rel=1e-12)
        selection_scale = (1 + torch.tensor([11, 14, 16, 17], dtype=torch.float64) / 100).mean()
        assert row["selection_ablation_score"] == pytest.approx(float(v[0].double() * selection_scale), rel=1e-12)


def test_select_reasoning_direction_reports_the_searched_null_beside_the_site_null():
    scorer = RecordingScorer()
    candidates = _null_draw(100)
    result = select_reasoning_direction(
        candidates, [0, 3, 6], list(range(12)), scorer, n_selection=6, n_report=6, seed=2,
        null_factory=lambda best, r: torch.randn(5, D, generator=torch.Generator().manual_seed(0)),
        searched_null_candidates=_null_draw, n_searched_null=3, n_bootstrap=10,
    )  # fmt: skip
    report = result.report
    assert [row["draw"] for row in report["searched_null"]] == [0, 2]  # draw 1: everything discarded
    assert len(report["null"]) == 5  # the site null is still there
    selection = result.selection_problems
    # call order: candidates (selection), r + site nulls (report), 3 null searches (selection), winners (report)
    problems = [call[2] for call in scorer.calls]
    assert problems == [selection, result.report_problems, selection, selection, selection, result.report_problems]
    for key in ("ablation_score", "kl"):
        null = torch.tensor([row[key] for row in report["searched_null"]], dtype=torch.float64)
        assert report["searched_zscores"][key] == zscore(report["scores"][key], null)
        assert report["searched_pvalues"][key]["rank"] == (1 + int((null >= report["scores"][key]).sum())) / 3

    plain = select_reasoning_direction(candidates, [0, 3, 6], list(range(12)), RecordingScorer(), n_selection=6,
                                       n_report=6, seed=2, n_bootstrap=10)  # fmt: skip
    assert plain.report["searched_null"] is None and plain.report["searched_pvalues"] is None
    with pytest.raises(UserError, match="shape"):
        select_reasoning_direction(candidates, [0, 3, 6], list(range(12)), RecordingScorer(), n_selection=6,
                                   searched_null_candidates=lambda j: _null_draw(j)[:2])  # fmt: skip
    with pytest.raises(UserError, match="disjoint"):
        searched_null(_null_draw, [0], list(range(4)), RecordingScorer(), selection_idx=[0, 1], report_idx=[1, 2],
                      n_null=1)  # fmt: skip
