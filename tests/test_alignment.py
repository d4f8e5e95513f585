"""analyze_cross_model_alignment against independent computations and planted structure; role-matched positions."""

import numpy as np
import pytest
import torch

from interp.alignment import analyze_cross_model_alignment, check_matched_rows
from interp.backbone import load_tokenizer
from interp.directions import compute_contrastive_directions
from interp.errors import UserError
from interp.prompts import post_instruction_ids, role_positions
from interp.similarity import cka_matrix, linear_cka

N_PROBLEMS, N_LAYERS, D = 24, 3, 10


def _keys(n: int = N_PROBLEMS) -> list[tuple]:
    """Reasoning and control row of each problem, interleaved (problem ids need not be contiguous)."""
    return [(f"p{100 + i}", kind) for i in range(n) for kind in ("reasoning", "control")]


def _acts(seed: int, shift: torch.Tensor | None = None, n: int = N_PROBLEMS) -> torch.Tensor:
    """[2n, L, D]: problem content shared by a problem's two rows, plus row noise; `shift` [L, D] added to the
    reasoning rows."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(n, 1, N_LAYERS, D, generator=g).expand(n, 2, N_LAYERS, D)
    acts = (content + 0.5 * torch.randn(n, 2, N_LAYERS, D, generator=g)).clone()
    if shift is not None:
        acts[:, 0] += shift
    return acts.reshape(2 * n, N_LAYERS, D).double()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_values_equal_independent_computations():
    x = _acts(0, shift=torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(5)))
    y = _acts(1, shift=torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(7)))
    y = y @ torch.randn(D, D, generator=torch.Generator().manual_seed(6)).double()
    out = analyze_cross_model_alignment(x, y, keys1=_keys(), keys2=_keys(), n_null=19, n_bootstrap=200)
    is_reasoning = torch.tensor([kind == "reasoning" for _, kind in _keys()])
    r1 = compute_contrastive_directions(x[is_reasoning], x[~is_reasoning]).numpy()  # means by class: another path
    r2 = compute_contrastive_directions(y[is_reasoning], y[~is_reasoning]).numpy()
    np.testing.assert_allclose(out["direction_cosine"]["value"], _cos(r1, r2), rtol=0, atol=1e-6)  # float32 means
    cka = out["cka"]
    np.testing.assert_allclose(cka["diagonal"], [linear_cka(x[:, i], y[:, i]) for i in range(N_LAYERS)], atol=1e-12)
    np.testing.assert_allclose(cka["matrix"], cka_matrix(x, y).numpy(), atol=1e-12)
    assert np.array(cka["ci"]).shape == (N_LAYERS, 2) and np.array(out["direction_cosine"]["ci"]).shape == (N_LAYERS, 2)
    assert out["n_rows"] == 2 * N_PROBLEMS and out["n_problems"] == N_PROBLEMS
    for block in ("matched_placebo", "independent_placebo"):
        null = out["direction_cosine"][block]
        assert all(1 / 20 <= p <= 1 for p in null["p_value"]) and len(null["p95"]) == N_LAYERS


def test_placebo_draws_are_balanced_sign_flips_of_the_paired_differences():
    """One null draw, recomputed by hand: m = 1, so mean = p95 = the single placebo cosine."""
    x, y = _acts(0), _acts(1)
    out = analyze_cross_model_alignment(x, y, keys1=_keys(), keys2=_keys(), n_null=1, n_bootstrap=10, seed=4)
    from interp.null_directions import balanced_signs

    signs = balanced_signs(N_PROBLEMS, 2, torch.Generator().manual_seed(4)).numpy()  # the function's first draws
    d1 = (x[0::2] - x[1::2]).numpy()  # [n, L, D]: rows alternate reasoning, control
    d2 = (y[0::2] - y[1::2]).numpy()
    matched = _cos(np.einsum("n,nld->ld", signs[0], d1), np.einsum("n,nld->ld", signs[0], d2))
    independent = _cos(np.einsum("n,nld->ld", signs[0], d1), np.einsum("n,nld->ld", signs[1], d2))
    np.testing.assert_allclose(out["direction_cosine"]["matched_placebo"]["mean"], matched, atol=1e-12)
    np.testing.assert_allclose(out["direction_cosine"]["independent_placebo"]["mean"], independent, atol=1e-12)


def test_a_shared_reasoning_direction_beats_both_placebo_nulls():
    """Planted: the same shift on the reasoning rows of two otherwise unrelated models."""
    shift = 2.0 * torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(9))
    out = analyze_cross_model_alignment(_acts(0, shift), _acts(1, shift), keys1=_keys(), keys2=_keys(), n_null=39)
    cosine = out["direction_cosine"]
    assert min(cosine["value"]) > 0.9 and min(low for low, _ in cosine["ci"]) > 0.5
    for block in ("matched_placebo", "independent_placebo"):
        assert max(cosine[block]["p_value"]) == pytest.approx(1 / 40)
        assert all(p95 < value - 0.2 for p95, value in zip(cosine[block]["p95"], cosine["value"]))
    assert max(out["cka"]["p_value"]) == pytest.approx(1 / 40)  # the shared split is row structure CKA sees too


def test_one_model_twice_agrees_on_every_contrast_so_the_matched_null_explains_it():
    """Identical activations: CKA 1 and cosine 1, but every matched placebo is also 1 (p-value 1): the reasoning
    direction agrees no more than any contrast does. The independent placebo sits far below."""
    x = _acts(0, shift=torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(3)))
    out = analyze_cross_model_alignment(x, x.clone(), keys1=_keys(), keys2=_keys(), n_null=19, n_bootstrap=50)
    np.testing.assert_allclose(out["cka"]["diagonal"], 1.0, atol=1e-12)
    np.testing.assert_allclose(out["direction_cosine"]["value"], 1.0, atol=1e-12)
    np.testing.assert_allclose(out["direction_cosine"]["matched_placebo"]["mean"], 1.0, atol=1e-12)
    assert out["direction_cosine"]["matched_placebo"]["p_value"] == [1.0] * N_LAYERS
    assert max(out["direction_cosine"]["independent_placebo"]["p_value"]) == pytest.approx(1 / 20)


def test_given_directions_are_compared_as_given_without_a_ci():
    x, y = _acts(0), _acts(1)
    r1, r2 = torch.randn(2, N_LAYERS, D, generator=torch.Generator().manual_seed(8))
    out = analyze_cross_model_alignment(x, y, r1, r2, keys1=_keys(), keys2=_keys(), n_null=5, n_bootstrap=10)
    np.testing.assert_allclose(out["direction_cosine"]["value"], _cos(r1.numpy(), r2.numpy()), atol=1e-6)
    assert out["direction_cosine"]["ci"] is None and out["directions"] == "given"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k1, k2, x, y: (k1, k2[2:] + k2[:2], x, y), "row 0 is"),
        (lambda k1, k2, x, y: (k1, k2[:-2], x, y[:-2]), "cover 48 and 46 prompts"),
        (lambda k1, k2, x, y: (k1, k2, x, y[:, :2]), "cover 3 and 2 layers"),
        (lambda k1, k2, x, y: ([(p, "other") for p, _ in k1],) * 2 + (x, y), "unknown prompt kinds"),
        (lambda k1, k2, x, y: (k1[:-1], k2[:-1], x[:-1], y[:-1]), "lack a reasoning or a control row"),
        (lambda k1, k2, x, y: (k1[:2], k2[:2], x[:2], y[:2]), "at least 2 problems"),
    ],
)
def test_bad_input_is_one_clear_error(change, message):
    keys1, keys2, x, y = change(_keys(), _keys(), _acts(0), _acts(1))
    with pytest.raises(UserError, match=message):
        analyze_cross_model_alignment(x, y, keys1=keys1, keys2=keys2, n_null=3, n_bootstrap=5)


def test_different_widths_give_cka_but_no_cosine():
    out = analyze_cross_model_alignment(_acts(0), _acts(1)[..., :4], keys1=_keys(), keys2=_keys(), n_null=3,
                                        n_bootstrap=5)  # fmt: skip
    assert out["direction_cosine"] is None and len(out["cka"]["diagonal"]) == N_LAYERS


def test_debiased_cosine_is_the_cross_problem_statistic_and_removes_the_noise_bias():
    """debiased = sum_{i != j} d1_i . d2_j / sqrt(...) by an explicit double loop; with a weak shared direction
    (plug-in cosine pulled toward 0 by independent noise), the debiased one lands closer to the population's 1."""
    shift = 0.25 * torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(11))
    x, y = _acts(0, shift), _acts(1, shift)
    out = analyze_cross_model_alignment(x, y, keys1=_keys(), keys2=_keys(), n_null=5, n_bootstrap=20)
    d1, d2 = (x[0::2] - x[1::2]).numpy(), (y[0::2] - y[1::2]).numpy()  # [n, L, D]

    def u(a, b):
        return sum((a[i] * b[j]).sum(-1) for i in range(N_PROBLEMS) for j in range(N_PROBLEMS) if i != j)

    expected = u(d1, d2) / np.sqrt(u(d1, d1) * u(d2, d2))
    np.testing.assert_allclose(out["direction_cosine"]["debiased"], expected, atol=1e-10)
    assert np.mean(out["direction_cosine"]["debiased"]) > np.mean(out["direction_cosine"]["value"])


def test_cka_ci_resamples_problems():
    """groups = the problem of each row (rows 2k, 2k + 1): every draw takes whole problems. Recomputed by hand
    with the same generator and linear_cka."""
    from interp.similarity import bootstrap_cka_diagonal

    x, y = _acts(0), _acts(1)
    ci = bootstrap_cka_diagonal(x, y, n_bootstrap=30, groups=torch.arange(len(x)) // 2)
    generator, draws = torch.Generator().manual_seed(0), []
    for _ in range(30):
        problems = torch.randint(N_PROBLEMS, (N_PROBLEMS,), generator=generator)
        rows = torch.stack([2 * problems, 2 * problems + 1], 1).flatten()
        draws.append([linear_cka(x[rows, i], y[rows, i]) for i in range(N_LAYERS)])
    expected = torch.tensor(draws, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0).T
    torch.testing.assert_close(ci, expected, rtol=0, atol=1e-10)
    with pytest.raises(UserError, match="one id per row"):
        bootstrap_cka_diagonal(x, y, groups=torch.zeros(3))


def test_one_direction_given_alone_is_an_error():
    with pytest.raises(UserError, match="both models' directions or neither"):
        analyze_cross_model_alignment(_acts(0), _acts(1), torch.ones(N_LAYERS, D), keys1=_keys(), keys2=_keys())
    with pytest.raises(UserError, match="rows must be matched"):
        check_matched_rows([("a", "reasoning")], [("b", "reasoning")])


def test_roles_pick_the_same_template_token_in_both_chat_templates():
    for name, expected in (("tiny-qwq", {"assistant": 3, "think": 5, "last": 6}),
                           ("tiny-r1-distill", {"assistant": 0, "think": 1, "last": 2})):  # fmt: skip
        tokenizer = load_tokenizer(name)
        roles = role_positions(tokenizer)
        assert roles == expected
        texts = [tokenizer.decode([t]) for t in post_instruction_ids(tokenizer)]
        assert texts[roles["think"]] == "<think>" and "ssistant" in texts[roles["assistant"]]
