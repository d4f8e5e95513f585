"""Mean ablation with role-aligned means: the first real token of a row gets the reference mean of first
tokens, later tokens the mean of later tokens. Pinned against means computed by hand from contributions
captured with interp.hooks, and against a planted attention-sink-like first token."""

import pytest
import torch

from interp.ablation import FIRST, LATER, LayerAblator
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.positions import padded_position_ids
from interp.prompts import tokenize_prompts

LAYER = 3
U32 = 2.0**-24  # float32 unit roundoff


def _rounding(*tensors):
    """Bound on the error of a float32 a + b (or b - a) in the residual stream: one rounding of each of two
    operations at the largest magnitude involved, 2 u max|x|."""
    return 2 * U32 * max(float(t.abs().max()) for t in tensors)


def _first_real(mask):
    """[batch, seq] bool: each row's first real token (left or right padding)."""
    mask = mask.bool()
    return mask & (mask.long().cumsum(-1) == 1)


def _forward(model, batch):
    with torch.no_grad():
        out = model(**batch, position_ids=padded_position_ids(batch["attention_mask"]), use_cache=False)
    return out.logits


def _contribution_hooks(model, edit):
    """resid_post <- resid_pre + edit(resid_post - resid_pre) at LAYER, through interp.hooks."""
    stored = {}

    def post(hidden):
        return stored["pre"] + edit(hidden - stored["pre"])

    return [(site_name(LAYER, "resid_pre"), lambda h: stored.__setitem__("pre", h)), (site_name(LAYER), post)]


def _captured(model, batch):
    """(resid_pre, resid_post - resid_pre) at LAYER, float64 [batch, seq, d_model], captured with interp.hooks."""
    seen = {}
    hooks = [
        (site_name(LAYER, "resid_pre"), lambda h: seen.__setitem__("pre", h.double())),
        (site_name(LAYER), lambda h: seen.__setitem__("post", h.double())),
    ]
    with hooked(model, hooks):
        _forward(model, batch)
    return seen["pre"], seen["post"] - seen["pre"]


@pytest.fixture(scope="module")
def batches(tiny, chat_prompts):
    """Reference: four chat prompts (left padded); ablated: three others of different lengths."""
    _, tokenizer = tiny
    reference = tokenize_prompts(tokenizer, [chat_prompts[i] for i in (1, 2, 3, 4)])
    run = tokenize_prompts(tokenizer, [chat_prompts[i] for i in (0, 3, 4)])
    assert bool((reference["attention_mask"] == 0).any()) and bool((run["attention_mask"] == 0).any())
    return reference, run


def _hand_means(model, reference):
    """(m_first, m_later) float64 [d_model] from captured contributions, padding excluded."""
    _, c = _captured(model, reference)
    real, first = reference["attention_mask"].bool(), _first_real(reference["attention_mask"])
    later = real & ~first
    return c[first].mean(0), c[later].mean(0)


def test_mean_ablation_equals_replacing_the_contribution_by_hand(tiny, batches):
    model, _ = tiny
    reference, run = batches
    m_first, m_later = _hand_means(model, reference)
    ablator = LayerAblator(model, LAYER, "mean", reference_inputs=reference)
    # the same float64 numbers summed in another order: float64 rounding only
    torch.testing.assert_close(ablator.means[LAYER][FIRST], m_first, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(ablator.means[LAYER][LATER], m_later, atol=1e-15, rtol=1e-12)
    first = _first_real(run["attention_mask"])[..., None]  # [batch, seq, 1]
    means = ablator.means[LAYER].float()  # the ablator's float32 copy, so both sides do the same float ops

    def replace(_):
        return torch.where(first, means[FIRST], means[LATER])

    with hooked(model, _contribution_hooks(model, replace)):
        expected = _forward(model, run)
    with ablator:
        got = _forward(model, run)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the same float32 operations in the same order
    assert not torch.allclose(got, _forward(model, run), atol=1e-3)


def test_a_huge_first_token_does_not_leak_into_the_later_positions(tiny, batches):
    """Plant an attention-sink-like first token (its contribution x1000) in the reference run: m_first scales
    with it, m_later and what the ablated forward writes at later tokens stay the clean later mean."""
    model, _ = tiny
    reference, run = batches
    clean_first, clean_later = _hand_means(model, reference)
    pre, c = _captured(model, reference)
    scale = torch.where(_first_real(reference["attention_mask"]), 1000.0, 1.0)[..., None]  # [batch, seq, 1]
    with hooked(model, _contribution_hooks(model, lambda c: c * scale)):
        ablator = LayerAblator(model, LAYER, "mean", reference_inputs=reference)
    # planted in float32: pre + 1000 c, then minus pre, rounds at the planted magnitude
    first, later_ref = _first_real(reference["attention_mask"]), reference["attention_mask"].bool()
    planted_error = _rounding(pre[first] + 1000 * c[first], pre[first])
    torch.testing.assert_close(ablator.means[LAYER][FIRST], 1000 * clean_first, atol=planted_error, rtol=0)
    later_error = _rounding(pre[later_ref & ~first] + c[later_ref & ~first])
    torch.testing.assert_close(ablator.means[LAYER][LATER], clean_later, atol=later_error, rtol=0)
    with ablator:
        run_pre, written = _captured(model, run)
    later = run["attention_mask"].bool() & ~_first_real(run["attention_mask"])
    # float32 m_later and resid_pre + m_later round at the residual's magnitude
    error = _rounding(run_pre[later] + written[later], clean_later) + later_error
    torch.testing.assert_close(written[later], clean_later.expand(int(later.sum()), -1), atol=error, rtol=0)
    pooled_gap = float((ablator.means[LAYER][FIRST] - clean_later).norm())
    assert pooled_gap > 100 * float(clean_later.norm())  # what a pooled mean would have leaked


def test_decoding_steps_hold_only_later_tokens(tiny, batches):
    """With a KV cache, every decoding step gets m_later (the first token was in the prefill)."""
    model, _ = tiny
    reference, run = batches
    ablator = LayerAblator(model, LAYER, "mean", reference_inputs=reference)
    steps = []
    with ablator:
        record = (site_name(LAYER, "resid_pre"), lambda h: steps.append(h.clone()))
        post = (site_name(LAYER), lambda h: steps.append(h.clone()))
        with hooked(model, [record]), hooked(model, [post]):
            model.generate(**run, max_new_tokens=3, do_sample=False, pad_token_id=0)
    m = ablator.means[LAYER].float()
    assert len(steps) == 6
    for pre, post_hidden in zip(steps[2::2], steps[3::2]):  # decoding steps after the prefill
        assert pre.shape[1] == 1
        torch.testing.assert_close(post_hidden - pre, m[LATER].expand_as(pre), atol=_rounding(post_hidden), rtol=0)


def test_single_token_references_have_no_later_mean(tiny):
    model, tokenizer = tiny
    one = tokenize_prompts(tokenizer, ["Hi"])
    ablator = LayerAblator(model, LAYER, "mean", reference_inputs=one)
    assert ablator.counts == [1, 0]
    with ablator, pytest.raises(UserError, match="no token after the first"):
        _forward(model, tokenize_prompts(tokenizer, ["Hi there, how are you?"]))
