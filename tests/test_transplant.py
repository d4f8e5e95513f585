"""Transplanting directions: the maps against closed forms and scikit-learn, the report against direct scoring."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from interp.direction_scoring import PromptScorer
from interp.errors import UserError
from interp.prompts import format_chat_prompt
from interp.transplant import map_directions, transplant_report


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identity_map_keeps_the_direction_and_takes_the_target_norm():
    r, norms = _randn(3, 8, seed=0), torch.tensor([1.0, 2.0, 5.0])
    mapped = map_directions(r, norms).double()
    np.testing.assert_allclose(mapped.norm(dim=-1), norms, rtol=1e-6)  # float32 output
    np.testing.assert_allclose((mapped * r).sum(-1) / (mapped.norm(dim=-1) * r.norm(dim=-1)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("n", [40, 6])  # n >= d_A: primal solve; n < d_A: dual solve
def test_ridge_map_equals_scikit_learn_ridge(n):
    d_a, d_b, layers = 8, 12, 2
    x, y = _randn(n, layers, d_a, seed=1), _randn(n, layers, d_b, seed=2)
    r, norms = _randn(layers, d_a, seed=3), torch.tensor([3.0, 4.0])
    mapped = map_directions(r, norms, "ridge", x, y, ridge=0.1).double()
    for layer in range(layers):
        xc = x[:, layer] - x[:, layer].mean(0)
        lam = 0.1 * float((xc**2).sum()) / d_a
        coef = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(x[:, layer].numpy(), y[:, layer].numpy()).coef_
        expected = r[layer].numpy() @ coef.T  # [d_b]
        expected = expected / np.linalg.norm(expected) * float(norms[layer])
        np.testing.assert_allclose(mapped[layer].numpy(), expected, rtol=1e-5, atol=1e-5 * float(norms[layer]))


def test_ridge_map_recovers_a_planted_linear_map_between_the_models():
    """B = A's activations through a fixed matrix M plus nothing else: r_A maps to r_A M (up to the small ridge)."""
    x, m = _randn(200, 1, 6, seed=4), _randn(6, 9, seed=5)
    r = _randn(1, 6, seed=6)
    mapped = map_directions(r, torch.ones(1), "ridge", x, x @ m, ridge=1e-6).double()[0]
    expected = (r[0] @ m) / (r[0] @ m).norm()
    assert float(mapped @ expected) > 1 - 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "rotate"}, "unknown map"),
        ({"method": "ridge"}, "needs source_activations"),
        ({"method": "identity", "target_activations": torch.zeros(4, 2, 5)}, "use method='ridge'"),
        ({"method": "ridge", "source_activations": torch.zeros(4, 2, 3), "target_activations": torch.zeros(5, 2, 3)},
         "same n prompts"),
        ({"method": "ridge", "source_activations": torch.zeros(4, 2, 3), "target_activations": torch.zeros(4, 2, 3),
          "ridge": 0.0}, "ridge must be > 0"),
    ],
)  # fmt: skip
def test_map_bad_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        map_directions(torch.ones(2, 3), torch.ones(2), **kwargs)


@pytest.fixture(scope="module")
def problems(tiny):
    _, tokenizer = tiny
    questions = ["What is 2+2?", "Compute 17 * 3.", "If x + 1 = 4, what is x?", "What is 9 - 5?"]
    solutions = ["2 + 2 = 4, so the answer is 4.", "17 * 3 = 51.", "x = 4 - 1 = 3, so x is 3.", "9 - 5 = 4."]
    return [(format_chat_prompt(tokenizer, q + " Please reason step by step."), s,
             format_chat_prompt(tokenizer, q + " Restate the problem. Do not solve it."), s)
            for q, s in zip(questions, solutions)]  # fmt: skip


def test_own_direction_transplanted_into_itself_is_the_direct_intervention(tiny, problems):
    """Identity map of B's own directions into B: every score equals the direct PromptScorer call on the same
    directions to float32 rounding, every ratio is 1; a foreign direction's ratio is its own mean effect over
    B's, computed from a separate direct scoring call."""
    model, tokenizer = tiny
    scorer = PromptScorer(model, tokenizer, "first_tokens", k_first_tokens=4, batch_size=2)
    layers = [2, 5]
    own = torch.zeros(32, 64)
    own[layers] = _randn(2, 64, seed=7).float() * 4
    foreign = torch.zeros(32, 64)
    foreign[layers] = _randn(2, 64, seed=8).float()
    nulls = _randn(3, 32, 64, seed=9).float()
    transplanted = {"self": map_directions(own, own.norm(dim=-1)), "foreign": map_directions(foreign, own.norm(dim=-1))}
    report = transplant_report(scorer, problems, own, transplanted, layers, nulls, n_bootstrap=200)
    direct = scorer(torch.stack([own[i] for i in layers] + [transplanted["foreign"][i] for i in layers]),
                    layers * 2, problems)  # fmt: skip
    for score in ("ablation_score", "induction_score", "kl"):
        own_direct = [direct[i][score] for i in range(2)]
        scale = max(abs(v) for v in own_direct) + 1e-3
        np.testing.assert_allclose(report["own"][score]["mean"], own_direct, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(report["transplanted"]["self"][score]["ratio"], 1.0, rtol=1e-3)
        np.testing.assert_allclose(report["transplanted"]["foreign"][score]["ratio"],
                                   [direct[2 + i][score] / own_direct[i] for i in range(2)], rtol=1e-3)  # fmt: skip
        assert len(report["transplanted"]["self"][score]["null_ratios"][0]) == 3
        assert all(1 / 4 <= p <= 1 for p in report["transplanted"]["foreign"][score]["p_rank"])
        low, high = report["transplanted"]["self"][score]["ci"][0]
        assert low == pytest.approx(1.0, rel=1e-3) and high == pytest.approx(1.0, rel=1e-3)


def test_report_bad_input(tiny, problems):
    model, tokenizer = tiny
    scorer = PromptScorer(model, tokenizer, batch_size=2)
    own = torch.ones(32, 64)
    with pytest.raises(UserError, match="directions are"):
        transplant_report(scorer, problems, own, {"x": torch.ones(32, 8)}, [1])
    with pytest.raises(UserError, match="at least one layer"):
        transplant_report(scorer, problems, own, {"x": own}, [])
    with pytest.raises(UserError, match="at least one transplanted"):
        transplant_report(scorer, problems, own, {}, [1])
    with pytest.raises(UserError, match="null_directions must be"):
        transplant_report(scorer, problems, own, {"x": own}, [1], torch.ones(2, 32, 8))


def _fake_scorer(effect_of):
    """A scorer whose per-prompt effects (every score) are effect_of(direction), a [n] tensor: the report's
    arithmetic alone."""
    from interp.selection import PER_PROMPT_KEYS

    def scorer(directions, layers, problems):
        return [{key: effect_of(direction) for key in PER_PROMPT_KEYS.values()} for direction in directions]

    return scorer


def test_undefined_ratio_has_no_p_value_and_transplanted_norms_do_not_matter():
    scorer = _fake_scorer(lambda r: float(r[0]) * torch.ones(6, dtype=torch.float64))  # effect = first coordinate
    own = torch.zeros(3, 8)
    own[1, 1] = 2.0  # orthogonal to u: zero own effect, undefined ratio
    own[2, 0] = 2.0
    foreign = torch.zeros(3, 8)
    foreign[1, 0], foreign[2, 0] = 1.0, 30.0  # norms differ from |own|: rescaled before scoring
    nulls = torch.zeros(2, 3, 8)
    nulls[:, :, 2] = 1.0
    report = transplant_report(scorer, [None] * 6, own, {"x": foreign}, [1, 2], nulls, n_bootstrap=20)
    entry = report["transplanted"]["x"]["ablation_score"]
    assert entry["ratio"] == [None, pytest.approx(1.0)] and entry["p_rank"] == [None, pytest.approx(1 / 3)]
    assert entry["mean"][1] == pytest.approx(2.0)  # |own[2]| = 2, not |foreign[2]| = 30
