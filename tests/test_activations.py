"""Captured residuals equal HF output_hidden_states, batched or alone, with and without early exit."""

import pytest
import torch

from interp.activations import capture_residuals, collect_activations
from interp.backbone import decoder_layers
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.positions import PositionSpec
from interp.prompts import (
    check_ends_with_template,
    length_sorted_chunks,
    post_instruction_ids,
    tokenize_prompts,
)


def _reference(model, tokenizer, prompt):
    """[n_layers, seq, d]: each layer's output for one unpadded prompt, the last layer before the final norm."""
    batch = tokenize_prompts(tokenizer, [prompt])
    captured = {}
    n = len(decoder_layers(model))
    with hooked(model, [(site_name(n - 1), lambda h: captured.setdefault("last", h.clone()))]):
        out = model(**batch, output_hidden_states=True)
    hidden = list(out.hidden_states[1:])  # entry i+1 = output of layer i ...
    hidden[-1] = captured["last"]  # ... except the last, which HF returns after the final norm
    return torch.stack([h[0] for h in hidden])


def test_last_token_matches_output_hidden_states_under_left_padding(tiny, chat_prompts):
    model, tokenizer = tiny
    acts = collect_activations(model, tokenizer, chat_prompts, batch_size=3)
    assert acts.shape == (len(chat_prompts), len(decoder_layers(model)), model.config.hidden_size)
    assert acts.dtype == torch.float32
    for i, prompt in enumerate(chat_prompts):
        ref = _reference(model, tokenizer, prompt)[:, -1]
        torch.testing.assert_close(acts[i], ref, atol=1e-5, rtol=1e-5)


def test_last_layer_is_before_final_norm(tiny, chat_prompts):
    model, tokenizer = tiny
    acts = collect_activations(model, tokenizer, chat_prompts[:1])
    batch = tokenize_prompts(tokenizer, chat_prompts[:1])
    normed = model(**batch, output_hidden_states=True).hidden_states[-1][0, -1]
    assert not torch.allclose(acts[0, -1], normed, atol=1e-3)
    torch.testing.assert_close(model.model.norm(acts[0, -1][None])[0], normed, atol=1e-5, rtol=1e-5)


def test_batch_equals_each_prompt_alone(tiny, chat_prompts):
    model, tokenizer = tiny
    together = collect_activations(model, tokenizer, chat_prompts, positions="last_3", batch_size=len(chat_prompts))
    for i, prompt in enumerate(chat_prompts):
        alone = collect_activations(model, tokenizer, [prompt], positions="last_3")
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_early_exit_gives_identical_values(tiny, chat_prompts):
    model, tokenizer = tiny
    full = collect_activations(model, tokenizer, chat_prompts)
    early = collect_activations(model, tokenizer, chat_prompts, layers=[2, 0, 5])
    assert early.shape[1] == 3
    torch.testing.assert_close(early, full[:, [0, 2, 5]], atol=0, rtol=0)


def test_early_exit_skips_later_layers_and_lm_head(tiny, chat_prompts):
    model, tokenizer = tiny
    calls = []
    handles = [decoder_layers(model)[6].register_forward_hook(lambda *a: calls.append("layer6")),
               model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
    try:
        collect_activations(model, tokenizer, chat_prompts[:2], layers=[5])
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_position_specs(tiny, chat_prompts):
    model, tokenizer = tiny
    post = post_instruction_ids(tokenizer)
    assert tokenizer.decode(post) == "<|im_end|>\n<|im_start|>assistant\n<think>\n"
    span = collect_activations(model, tokenizer, chat_prompts, positions="post_instruction", batch_size=2)
    last = collect_activations(model, tokenizer, chat_prompts)
    assert span.shape[1] == len(post)
    torch.testing.assert_close(span[:, -1], last, atol=1e-5, rtol=1e-5)
    mean = collect_activations(model, tokenizer, chat_prompts, positions="mean", batch_size=2)
    for i, prompt in enumerate(chat_prompts):
        ref = _reference(model, tokenizer, prompt).mean(1)
        torch.testing.assert_close(mean[i], ref, atol=1e-5, rtol=1e-5)


def test_post_instruction_span_of_r1_distill(tiny_r1):
    _, tokenizer = tiny_r1
    assert tokenizer.decode(post_instruction_ids(tokenizer)) == "<｜Assistant｜><think>\n"


def test_hooks_removed_after_exit_and_after_exception(tiny, chat_prompts):
    model, tokenizer = tiny
    layers = decoder_layers(model)

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layers)

    before = count()  # transformers may keep hooks of its own on the layers
    collect_activations(model, tokenizer, chat_prompts[:2], layers=[1, 3])
    assert count() == before
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(model, [(site_name(1), lambda h: None), ("blocks.2.resid_pre", lambda h: None)]):
            assert count() == before + 2
            raise RuntimeError("boom")
    assert count() == before


def test_hooks_accept_tuple_outputs():
    from interp.hooks import _output_hook

    seen = []
    hook = _output_hook(lambda h: seen.append(h.shape) or h * 2)
    out = hook(None, (), (torch.ones(2, 3, 4), "extra"))
    assert seen == [(2, 3, 4)] and out[1] == "extra" and torch.equal(out[0], torch.full((2, 3, 4), 2.0))
    assert torch.equal(hook(None, (), torch.ones(2, 3, 4)), torch.full((2, 3, 4), 2.0))


def test_bad_layers_and_positions(tiny, chat_prompts):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="out of range"):
        collect_activations(model, tokenizer, chat_prompts, layers=[0, 99])
    with pytest.raises(UserError, match="unknown positions"):
        collect_activations(model, tokenizer, chat_prompts, positions="first")
    with pytest.raises(UserError, match="fewer than"):
        collect_activations(model, tokenizer, ["Hi"], positions="last_50")
    with pytest.raises(UserError, match="chat template"):
        collect_activations(model, tokenizer, ["plain text"], positions="post_instruction")


def test_length_sorted_chunks():
    lengths = [5, 2, 9, 2, 7, 5, 1]
    chunks = length_sorted_chunks(lengths, batch_size=3)
    assert chunks == [[6, 1, 3], [0, 5, 4], [2]]  # by length; ties (2, 2) and (5, 5) keep input order
    flat = [i for chunk in chunks for i in chunk]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert length_sorted_chunks(lengths, batch_size=100) == [flat]
    assert length_sorted_chunks([4, 4, 4], batch_size=1) == [[0], [1], [2]]
    assert length_sorted_chunks([], batch_size=2) == []
    for bad in (0, -1):
        with pytest.raises(UserError, match="batch_size must be >= 1"):
            length_sorted_chunks(lengths, batch_size=bad)


def test_check_ends_with_template():
    post = [7, 8]
    check_ends_with_template([[1, 7, 8], [7, 8]], post)
    check_ends_with_template([[1, 2]], [])  # a template with no suffix: every prompt ends with it
    with pytest.raises(UserError, match=r"every control prompt must end with the chat template's .* \(control prompt 1 does"):
        check_ends_with_template([[1, 7, 8], [7, 8, 1]], post, "control prompt")
    with pytest.raises(UserError, match="post-instruction tokens .*: 'xyz'"):
        check_ends_with_template([[8]], post, texts=["xyz"])  # shorter than the suffix


def test_post_instruction_accepts_right_padding(tiny, chat_prompts):
    model, tokenizer = tiny
    post = post_instruction_ids(tokenizer)
    left = tokenize_prompts(tokenizer, chat_prompts[:3])
    right = tokenizer(chat_prompts[:3], padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
    spec = PositionSpec("post_instruction")
    expected = capture_residuals(model, left["input_ids"], left["attention_mask"], [0, 5], spec, post)
    got = capture_residuals(model, right["input_ids"], right["attention_mask"], [0, 5], spec, post)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
