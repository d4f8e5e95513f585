"""Activation patching pinned against HF forwards, hand-written hooks and planted truths.

Facts used: resid_post of layer l is all that later computation reads, so patching every position of layer l
with another input's values reproduces that input's logits; causal attention means a patch at position p
cannot change positions < p; the last position's logits depend only on the last layer's resid_post there.
"""

import pytest
import torch

from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.patching import PathPatcher, capture_sites
from interp.patching_stats import logit_difference, target_log_prob
from interp.patching_sweep import attribution_patching, patching_sweep
from interp.positions import padded_position_ids
from interp.prompts import format_chat_prompt, post_instruction_ids, tokenize_prompts

LAST = 31  # the tiny backbone has 32 layers


def _logits(model, batch):
    """Full HF forward of a left-padded batch: float32 [batch, seq, vocab]."""
    with torch.no_grad():
        return model(**batch, position_ids=padded_position_ids(batch["attention_mask"])).logits.float()


def _batch(tokenizer, questions):
    return tokenize_prompts(tokenizer, [format_chat_prompt(tokenizer, q) for q in questions])


def _manual_patch(model, batch, layer, values_by_index):
    """Independent reference: a plain hook that writes hidden[b, i] = v for each ((b, i), v) given."""

    def fn(hidden):
        new = hidden.clone()
        for (b, i), value in values_by_index.items():
            new[b, i] = value
        return new

    with hooked(model, [(site_name(layer), fn)]):
        return _logits(model, batch)


@pytest.fixture(scope="module")
def same_length(tiny):
    """Two left-padded batches whose rows have equal lengths pairwise (so equal attention masks)."""
    _, tokenizer = tiny
    a = _batch(tokenizer, ["What is 2+2?", "Compute 12 times 13 please."])
    b = _batch(tokenizer, ["What is 3+5?", "Compute 14 times 15 please."])
    assert torch.equal(a["attention_mask"], b["attention_mask"]) and not bool(a["attention_mask"].all())
    assert not torch.equal(a["input_ids"], b["input_ids"])
    return a, b


def test_capture_sites_equal_hidden_states(tiny, chat_prompts):
    model, tokenizer = tiny
    batch = tokenize_prompts(tokenizer, chat_prompts[:3])
    with torch.no_grad():
        hidden = model(**batch, position_ids=padded_position_ids(batch["attention_mask"]), output_hidden_states=True)
    full = capture_sites(model, batch["input_ids"], batch["attention_mask"], [5, 0])
    assert sorted(full) == [0, 5] and full[0].dtype == torch.float32
    for layer in (0, 5):
        torch.testing.assert_close(full[layer], hidden.hidden_states[layer + 1], atol=1e-5, rtol=1e-5)
    last3 = capture_sites(model, batch["input_ids"], batch["attention_mask"], [5], positions="last_3")
    torch.testing.assert_close(last3[5], full[5][:, -3:], atol=0, rtol=0)
    index = torch.tensor([[-1, -2], [-3, -1], [-2, -4]]) + batch["input_ids"].shape[1]
    picked = capture_sites(model, batch["input_ids"], batch["attention_mask"], [0], positions=index)
    for b in range(3):
        torch.testing.assert_close(picked[0][b], full[0][b, index[b]], atol=0, rtol=0)
    post = post_instruction_ids(tokenizer)
    span = capture_sites(model, batch["input_ids"], batch["attention_mask"], [5], "post_instruction", post)
    torch.testing.assert_close(span[5], full[5][:, -len(post) :], atol=0, rtol=0)


def test_patching_a_run_with_itself_changes_nothing(tiny, same_length):
    model, _ = tiny
    a, _ = same_length
    before = _logits(model, a)
    source = capture_sites(model, a["input_ids"], a["attention_mask"], [3, 17])
    with PathPatcher(model, source, [3, 17]):
        after = _logits(model, a)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    with PathPatcher(model, {3: torch.zeros_like(source[3])}, [3]):  # the patch does act
        assert not torch.allclose(_logits(model, a), before, atol=1e-3)


@pytest.mark.parametrize("layer", [0, 9, LAST])
def test_patching_every_position_reproduces_the_other_input(tiny, same_length, layer):
    model, _ = tiny
    a, b = same_length
    logits_a, logits_b = _logits(model, a), _logits(model, b)
    assert not torch.allclose(logits_a, logits_b, atol=1e-2)
    source = capture_sites(model, b["input_ids"], b["attention_mask"], [layer])
    with PathPatcher(model, source, [layer], attention_mask=a["attention_mask"]):
        patched = _logits(model, a)
    real = a["attention_mask"].bool()
    torch.testing.assert_close(patched[real], logits_b[real], atol=1e-5, rtol=1e-5)


def test_patching_some_positions_changes_only_later_positions(tiny, same_length):
    model, _ = tiny
    a, b = same_length
    layer, seq = 4, a["input_ids"].shape[1]
    index = torch.tensor([[9, 15], [6, 18]])  # [batch, n_pos]: real tokens; a and b first differ at 9 and 6
    assert seq == 20 and bool((a["input_ids"] != b["input_ids"]).gather(1, index[:, :1]).all())
    source = capture_sites(model, b["input_ids"], b["attention_mask"], [layer], positions=index)
    with PathPatcher(model, source, [layer], positions=index, attention_mask=a["attention_mask"]):
        patched = _logits(model, a)
    logits_a = _logits(model, a)
    full_b = capture_sites(model, b["input_ids"], b["attention_mask"], [layer])[layer]
    reference = _manual_patch(model, a, layer, {(r, int(i)): full_b[r, int(i)] for r in range(2) for i in index[r]})
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)
    for r in range(2):
        first = int(index[r].min())
        torch.testing.assert_close(patched[r, :first], logits_a[r, :first], atol=0, rtol=0)
        assert not torch.allclose(patched[r, first], logits_a[r, first], atol=1e-4)


def test_spec_positions_are_resolved_on_the_target_padding(tiny, chat_prompts):
    model, tokenizer = tiny
    a = tokenize_prompts(tokenizer, chat_prompts[:3])
    b = tokenize_prompts(tokenizer, chat_prompts[2:5])  # other prompts, other padding
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    # The last position's logits read only the last layer's resid_post there: patching it gives b's logits.
    source = capture_sites(model, b["input_ids"], b["attention_mask"], [LAST], positions="last")
    with PathPatcher(model, source, [LAST], positions="last", attention_mask=a["attention_mask"]):
        patched = _logits(model, a)[:, -1]
    torch.testing.assert_close(patched, _logits(model, b)[:, -1], atol=1e-5, rtol=1e-5)
    # At an inner layer, "post_instruction" lands on the same template tokens of each left-padded prompt.
    post = post_instruction_ids(tokenizer)
    source = capture_sites(model, b["input_ids"], b["attention_mask"], [6], "post_instruction", post)
    with PathPatcher(model, source, [6], positions="post_instruction", attention_mask=a["attention_mask"]):
        patched = _logits(model, a)
    seq, n = a["input_ids"].shape[1], len(post)
    values = {(r, seq - n + k): source[6][r, k] for r in range(3) for k in range(n)}
    torch.testing.assert_close(patched, _manual_patch(model, a, 6, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_patches_the_prompt_only(tiny, use_cache):
    model, tokenizer = tiny
    a, b = _batch(tokenizer, ["What is 2+2?"]), _batch(tokenizer, ["What is 3+5?"])
    source = capture_sites(model, b["input_ids"], b["attention_mask"], [LAST])
    with PathPatcher(model, source, [LAST]), torch.no_grad():
        out = model.generate(
            **a, max_new_tokens=2, do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id
        )
    first, second = out[0, -2:].tolist()
    assert first == int(_logits(model, b)[0, -1].argmax())  # the prompt ran patched
    # Patching the last layer changes no key/value of the prompt, so the next step is the unpatched model's.
    extended = {"input_ids": out[:, :-1], "attention_mask": torch.ones_like(out[:, :-1])}
    assert second == int(_logits(model, extended)[0, -1].argmax())


def test_hooks_removed_after_exit_and_after_errors(tiny, same_length):
    model, _ = tiny
    a, _ = same_length
    layers = decoder_layers(model)

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layers)

    before = count()
    source = capture_sites(model, a["input_ids"], a["attention_mask"], [1, 2])
    with PathPatcher(model, source):
        assert count() == before + 2
    assert count() == before
    short = {k: v[:, 1:] for k, v in a.items()}
    with pytest.raises(UserError, match="has 19 positions, expected 20"), PathPatcher(model, source):
        _logits(model, short)
    assert count() == before


def test_patcher_rejects_bad_inputs(tiny, same_length):
    model, _ = tiny
    a, _ = same_length
    mask = a["attention_mask"]
    source = capture_sites(model, a["input_ids"], mask, [2])
    with pytest.raises(UserError, match="out of range"):
        PathPatcher(model, {99: source[2]}, [99])
    with pytest.raises(UserError, match=r"no source activations for layers \[3\]"):
        PathPatcher(model, source, [2, 3])
    with pytest.raises(UserError, match="expected \\[batch, pos, 64\\]"):
        PathPatcher(model, {2: source[2][..., :10]})
    with pytest.raises(UserError, match="needs the target batch's attention_mask"):
        PathPatcher(model, {2: source[2][:, -2:]}, positions="last_2")
    with pytest.raises(UserError, match="hold 2 positions .* select 3"):
        PathPatcher(model, {2: source[2][:, -2:]}, positions="last_3", attention_mask=mask)
    with pytest.raises(UserError, match="'mean' name no token"):
        PathPatcher(model, {2: source[2][:, -1:]}, positions="mean", attention_mask=mask)
    with pytest.raises(UserError, match="position 0 of prompt 0 is padding"):
        PathPatcher(model, {2: source[2][:, :1]}, positions=torch.tensor([0]), attention_mask=mask)
    with pytest.raises(UserError, match="position 20 is outside the prompt"):
        PathPatcher(model, {2: source[2][:, :1]}, positions=torch.tensor([20]), attention_mask=mask)
    with pytest.raises(UserError, match="repeat a token index"):
        PathPatcher(model, {2: source[2][:, :2]}, positions=torch.tensor([19, 19]), attention_mask=mask)
    with pytest.raises(UserError, match="target attention_mask"):
        PathPatcher(model, source, attention_mask=mask[:, 1:])
    one_row = {k: v[:1] for k, v in a.items()}
    with pytest.raises(UserError, match="has 1 prompts, the source 2"), PathPatcher(model, source):
        _logits(model, one_row)
    with pytest.raises(UserError, match="'mean' name no token"):
        capture_sites(model, a["input_ids"], mask, [2], positions="mean")


# ----------------------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def pairs(tiny):
    _, tokenizer = tiny
    reasoning = ["Solve step by step: 17*23 = ?", "Prove that the square root of 2 is irrational."]
    control = ["What colour is the sky?", "Say hello to my cat please, and then to the dog."]
    return [format_chat_prompt(tokenizer, q) for q in reasoning], [format_chat_prompt(tokenizer, q) for q in control]


def _metric(tokenizer):
    return logit_difference(tokenizer.encode("1")[0], tokenizer.encode("The")[0])


def test_sweep_planted_values_and_alignment(tiny, pairs):
    model, tokenizer = tiny
    reasoning, control = pairs
    metric = _metric(tokenizer)
    result = patching_sweep(model, tokenizer, reasoning, control, metric, layers=[LAST, 3], batch_size=2)
    n_post = len(post_instruction_ids(tokenizer))
    assert result.layers == [3, LAST] and len(result.post_tokens) == n_post == 7
    assert result.recovered.shape == (2, n_post) and result.per_pair_ratio.shape == (2, 2, n_post)
    assert result.method == "exact" and not bool(result.cut.any()) and result.cut_reason is None
    # Independent metrics: each prompt alone, unpadded.
    a_id, b_id = tokenizer.encode("1")[0], tokenizer.encode("The")[0]
    for i in range(2):
        r = _logits(model, tokenize_prompts(tokenizer, [reasoning[i]]))[0, -1]
        c = _logits(model, tokenize_prompts(tokenizer, [control[i]]))[0, -1]
        assert float(result.metric_reasoning[i]) == pytest.approx(float(r[a_id] - r[b_id]), abs=1e-5)
        assert float(result.metric_control[i]) == pytest.approx(float(c[a_id] - c[b_id]), abs=1e-5)
    # Planted: at the last layer only the last position matters, and it carries the whole reasoning metric.
    torch.testing.assert_close(result.recovered[1], torch.eye(n_post, dtype=torch.float64)[-1], atol=1e-5, rtol=0)
    # One inner cell by hand: pair 1 alone, the reasoning value of template token k=2 written into the control.
    k, layer = 2, 3
    r_batch, c_batch = (tokenize_prompts(tokenizer, [p[1]]) for p in pairs)
    r_value = capture_sites(model, r_batch["input_ids"], r_batch["attention_mask"], [layer])[layer]
    target = c_batch["input_ids"].shape[1] - n_post + k
    c_logits = _manual_patch(model, c_batch, layer, {(0, target): r_value[0, r_batch["input_ids"].shape[1] - n_post + k]})
    expected = float(c_logits[0, -1, a_id] - c_logits[0, -1, b_id])
    assert float(result.metric_patched[1, 0, k]) == pytest.approx(expected, abs=1e-5)
    control_value, gap = float(result.metric_control[1]), float(result.metric_reasoning[1] - result.metric_control[1])
    assert float(result.per_pair_ratio[1, 0, k]) == pytest.approx((expected - control_value) / gap, rel=1e-3)
    # The headline is the ratio of means over pairs (tests/test_patching_stats.py pins it independently).
    mean_c = result.metric_control.mean()
    ratio = (result.metric_patched.mean(0) - mean_c) / (result.metric_reasoning.mean() - mean_c)
    torch.testing.assert_close(result.recovered, ratio, rtol=1e-12, atol=0)


def test_sweep_keeps_pairs_with_no_gap_in_the_means(tiny, pairs):
    """A pair without a gap still counts in the ratio of means (its patched - control is 0 too); only its
    diagnostic per-pair ratio is NaN. A metric without any gap gives NaN with a reason, never an error or inf."""
    model, tokenizer = tiny
    reasoning, control = pairs
    base = target_log_prob(tokenizer.encode("1")[0])

    def metric(logits, info):  # pair 0 gets the same value on every run: no gap to recover
        return torch.where(info["pair_index"] == 0, torch.zeros(()), base(logits, info))

    result = patching_sweep(model, tokenizer, reasoning, control, metric, layers=[LAST], batch_size=1)
    assert bool(result.per_pair_ratio[0].isnan().all()) and not bool(result.per_pair_ratio[1].isnan().any())
    assert bool((result.metric_patched[0] == 0).all()) and not bool(result.cut.any())
    # pair 0 adds 0 to both sums, so the ratio of means equals pair 1's ratio
    torch.testing.assert_close(result.recovered, result.per_pair_ratio[1], rtol=1e-12, atol=0)
    summary = result.to_dict()
    assert summary["n_pairs"] == 2 and summary["recovered"][0][-1] == pytest.approx(1.0, abs=1e-5)
    flat = patching_sweep(model, tokenizer, reasoning, control, lambda logits, info: logits[:, 0] * 0, layers=[0])
    assert bool(flat.cut.all()) and bool(flat.recovered.isnan().all()) and "cancel" in flat.cut_reason
    assert flat.mean_gap == 0.0 and not bool(flat.recovered.isinf().any())


def test_sweep_rejects_bad_inputs(tiny, pairs):
    model, tokenizer = tiny
    reasoning, control = pairs
    metric = _metric(tokenizer)
    with pytest.raises(UserError, match="matched reasoning/control pairs"):
        patching_sweep(model, tokenizer, reasoning, control[:1], metric, layers=[0])
    with pytest.raises(UserError, match="control prompt must end with the chat template"):
        patching_sweep(model, tokenizer, reasoning, ["plain", "text"], metric, layers=[0])
    with pytest.raises(UserError, match="out of range"):
        patching_sweep(model, tokenizer, reasoning, control, metric, layers=[32])
    with pytest.raises(UserError, match=r"metric_fn must return a tensor \[batch\]"):
        patching_sweep(model, tokenizer, reasoning, control, lambda logits, info: logits, layers=[0])
    with pytest.raises(UserError, match="differentiable"):
        attribution_patching(model, tokenizer, reasoning, control, lambda lg, info: lg.argmax(-1).float(), layers=[0])


def test_attribution_tracks_the_exact_sweep(tiny, pairs):
    model, tokenizer = tiny
    reasoning, control = pairs
    metric, layers = _metric(tokenizer), [0, 10, 20, LAST]
    exact = patching_sweep(model, tokenizer, reasoning, control, metric, layers=layers, batch_size=2)
    approx = attribution_patching(model, tokenizer, reasoning, control, metric, layers=layers, batch_size=1)
    assert approx.method == "attribution" and approx.recovered.shape == exact.recovered.shape
    torch.testing.assert_close(approx.metric_reasoning, exact.metric_reasoning, atol=1e-5, rtol=0)
    torch.testing.assert_close(approx.metric_control, exact.metric_control, atol=1e-5, rtol=0)
    pearson = torch.corrcoef(torch.stack([exact.recovered.flatten(), approx.recovered.flatten()]))[0, 1]
    assert pearson > 0.9, pearson
    # At the last layer, non-final positions cannot move the last logits: exactly 0 in both.
    assert bool((approx.metric_patched[:, -1, :-1] == approx.metric_control[:, None]).all())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # backbone stayed frozen


def test_attribution_is_exact_for_a_linear_readout(tiny, pairs):
    """Without the final norm the last-position metric is linear in the last layer's resid_post: the
    first-order estimate is then the exact patching result."""
    model, tokenizer = tiny
    reasoning, control = pairs
    metric = _metric(tokenizer)
    handle = model.model.norm.register_forward_hook(lambda module, args, output: args[0])  # norm -> identity
    try:
        exact = patching_sweep(model, tokenizer, reasoning, control, metric, layers=[LAST], batch_size=2)
        approx = attribution_patching(model, tokenizer, reasoning, control, metric, layers=[LAST], batch_size=2)
    finally:
        handle.remove()
    torch.testing.assert_close(approx.metric_patched, exact.metric_patched, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(approx.recovered, exact.recovered, atol=1e-4, rtol=0)
    assert float(approx.recovered[0, -1]) == pytest.approx(1.0, abs=1e-4)
