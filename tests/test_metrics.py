"""Metrics equal HF's own loss / logits per unpadded prompt; KL equals torch.distributions and numpy; z-score
and bootstrap equal numpy and closed forms."""

import math

import numpy as np
import pytest
import torch

from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.metrics import first_tokens_logprob, gold_solution_nll, last_token_kl, next_token_logits
from interp.selection import bootstrap_ci, zscore

SOLUTIONS = [
    "2 + 2 = 4. The answer is \\boxed{4}.",
    "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 altogether. \\boxed{72}",
    "$\\binom{8}{4} = 70$",
    "Hello!",
    "Adding the equations gives 2x = 12, so x = 6.",
]


def _hf_loss(model, tokenizer, prompt, solution, max_tokens=None):
    """HF's own mean cross-entropy over the solution tokens of one unpadded prompt + solution."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    s = tokenizer(solution, add_special_tokens=False)["input_ids"][:max_tokens]
    ids = torch.tensor([p + s])
    labels = torch.tensor([[-100] * len(p) + s])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def test_gold_solution_nll_equals_hf_loss_under_left_padding(tiny, chat_prompts):
    model, tokenizer = tiny
    nll = gold_solution_nll(model, tokenizer, chat_prompts, SOLUTIONS, batch_size=3)
    assert nll.dtype == torch.float64 and nll.shape == (len(chat_prompts),)
    ref = [_hf_loss(model, tokenizer, p, s) for p, s in zip(chat_prompts, SOLUTIONS)]
    np.testing.assert_allclose(nll.numpy(), ref, atol=1e-5, rtol=1e-6)
    assert len(set(np.round(ref, 4))) == len(ref)  # distinct values: a row mix-up would show


def test_truncated_solutions_and_first_tokens_logprob(tiny, chat_prompts):
    model, tokenizer = tiny
    nll = gold_solution_nll(model, tokenizer, chat_prompts, SOLUTIONS, batch_size=2, max_solution_tokens=5)
    ref = [_hf_loss(model, tokenizer, p, s, max_tokens=5) for p, s in zip(chat_prompts, SOLUTIONS)]
    np.testing.assert_allclose(nll.numpy(), ref, atol=1e-5, rtol=1e-6)
    first = first_tokens_logprob(model, tokenizer, chat_prompts, SOLUTIONS, k=3, batch_size=5)
    ref = [-_hf_loss(model, tokenizer, p, s, max_tokens=3) for p, s in zip(chat_prompts, SOLUTIONS)]
    np.testing.assert_allclose(first.numpy(), ref, atol=1e-5, rtol=1e-6)
    # k=1: the log-softmax of the last prompt position at the first solution token
    logits = next_token_logits(model, tokenizer, chat_prompts)
    first_ids = [tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in SOLUTIONS]
    ref = torch.log_softmax(logits.double(), -1)[torch.arange(len(SOLUTIONS)), first_ids]
    one = first_tokens_logprob(model, tokenizer, chat_prompts, SOLUTIONS, k=1)
    np.testing.assert_allclose(one.numpy(), ref.numpy(), atol=1e-5, rtol=1e-6)


def test_metrics_run_under_active_hooks(tiny, chat_prompts):
    model, tokenizer = tiny
    shrink = [(site_name(3), lambda h: h * 0.5)]
    with hooked(model, shrink):
        hooked_nll = gold_solution_nll(model, tokenizer, chat_prompts[:3], SOLUTIONS[:3], batch_size=3)
        ref = [_hf_loss(model, tokenizer, p, s) for p, s in zip(chat_prompts[:3], SOLUTIONS[:3])]
        hooked_logits = next_token_logits(model, tokenizer, chat_prompts[:3])
    np.testing.assert_allclose(hooked_nll.numpy(), ref, atol=1e-5, rtol=1e-6)
    plain_logits = next_token_logits(model, tokenizer, chat_prompts[:3])
    assert float(last_token_kl(plain_logits, hooked_logits).min()) > 1e-4  # the hook changed the output


def test_next_token_logits_equal_unpadded_forward(tiny, chat_prompts):
    model, tokenizer = tiny
    logits = next_token_logits(model, tokenizer, chat_prompts, batch_size=2)
    assert logits.shape == (len(chat_prompts), model.config.vocab_size) and logits.dtype == torch.float32
    for i, prompt in enumerate(chat_prompts):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)


def test_last_token_kl_against_distributions_and_numpy():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    kl = last_token_kl(p, q)
    assert kl.dtype == torch.float64 and kl.shape == (6,)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p.double()), torch.distributions.Categorical(logits=q.double())
    )
    torch.testing.assert_close(kl, ref, atol=1e-12, rtol=1e-10)
    pn = np.exp(p.double().numpy()) / np.exp(p.double().numpy()).sum(-1, keepdims=True)
    qn = np.exp(q.double().numpy()) / np.exp(q.double().numpy()).sum(-1, keepdims=True)
    np.testing.assert_allclose(kl.numpy(), (pn * np.log(pn / qn)).sum(-1), rtol=1e-10)
    torch.testing.assert_close(last_token_kl(p, p), torch.zeros(6, dtype=torch.float64))
    assert bool((last_token_kl(p, q.double() + 7.0) - kl).abs().max() < 1e-10)  # logits are shift-invariant
    masked = p.clone()
    masked[:, :10] = -math.inf  # tokens p never emits contribute 0, not NaN
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=masked[:, 10:].double()),
        torch.distributions.Categorical(logits=q[:, 10:].double() - torch.logsumexp(q.double(), -1, keepdim=True)
                                        + torch.logsumexp(q[:, 10:].double(), -1, keepdim=True)),
    )  # q renormalised over the kept tokens, then KL shifted by log q's mass outside them
    shift = torch.logsumexp(q[:, 10:].double(), -1) - torch.logsumexp(q.double(), -1)
    torch.testing.assert_close(last_token_kl(masked, q), expected - shift, atol=1e-10, rtol=1e-10)
    with pytest.raises(UserError):
        last_token_kl(p, q[:, :10])


def test_metric_input_errors(tiny, chat_prompts):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="2 prompts but 1 solutions"):
        gold_solution_nll(model, tokenizer, chat_prompts[:2], SOLUTIONS[:1])
    with pytest.raises(UserError, match="example 1: the solution has no tokens"):
        gold_solution_nll(model, tokenizer, chat_prompts[:2], ["x", ""])
    with pytest.raises(UserError, match="max_solution_tokens"):
        gold_solution_nll(model, tokenizer, chat_prompts[:2], SOLUTIONS[:2], max_solution_tokens=0)


def test_zscore_against_numpy():
    null = torch.tensor([0.1, -0.3, 0.25, 0.05, -0.1, 0.2])
    ref = (0.9 - null.double().numpy().mean()) / null.double().numpy().std(ddof=1)
    assert zscore(0.9, null) == pytest.approx(ref, rel=1e-12)
    assert zscore(-0.9, null) < 0
    assert zscore(1.0, torch.ones(5)) == 0.0
    # a zero-spread null says nothing about how far an effect is from it: NaN, never +-inf
    assert math.isnan(zscore(2.0, torch.ones(5))) and math.isnan(zscore(0.0, torch.ones(5)))
    with pytest.raises(UserError, match="at least 2"):
        zscore(1.0, torch.tensor([0.5]))


def test_bootstrap_ci_closed_forms_and_coverage():
    assert bootstrap_ci(torch.full((20,), 3.5)) == (3.5, 3.5)  # constant data: zero width
    values = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = bootstrap_ci(values, n_boot=2000, seed=1)
    mean, se = float(values.mean()), float(values.std()) / math.sqrt(400)
    assert low < mean < high
    assert low == pytest.approx(mean - 1.96 * se, abs=0.2 * se) and high == pytest.approx(mean + 1.96 * se, abs=0.2 * se)
    assert bootstrap_ci(values, n_boot=2000, seed=1) == (low, high)  # seeded: reproducible
    narrow = bootstrap_ci(values, n_boot=2000, seed=1, alpha=0.5)
    assert low < narrow[0] < narrow[1] < high
    med = bootstrap_ci(values, statistic=lambda x: x.median(-1).values)
    assert med[0] < float(values.median()) < med[1]
    # Coverage sanity: 95% intervals from 200 normal samples (n=30) cover the true mean 0 about 95% of the time.
    g = torch.Generator().manual_seed(2)
    covered = sum(lo <= 0.0 <= hi for lo, hi in (bootstrap_ci(torch.randn(30, generator=g), 500, seed=k)
                                                   for k in range(200)))
    assert 170 <= covered <= 200
