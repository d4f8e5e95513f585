"""The logit lens pinned against the model's own logits and a float64 closed form of RMSNorm + unembedding."""

import types

import pytest
import torch
from torch import nn

from interp.activations import collect_activations
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.lens import LogitLens, TunedLens, final_norm
from interp.positions import padded_position_ids
from interp.prompts import tokenize_prompts

LAST = 31


def _closed_form(model, resid):
    """RMSNorm then unembedding, written out in float64: x / sqrt(mean(x^2) + eps) * w @ W^T."""
    x = resid.double()
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    return (normed * model.model.norm.weight.double()) @ model.lm_head.weight.double().T


@pytest.fixture(scope="module")
def acts(tiny, chat_prompts):
    """Last-token residuals [3, 3 layers, d] at layers 0, 15, 31."""
    model, tokenizer = tiny
    return collect_activations(model, tokenizer, chat_prompts[:3], layers=[0, 15, LAST])


def test_final_norm_found_by_structure(tiny):
    model, _ = tiny
    assert final_norm(model) is model.model.norm
    assert LogitLens(model).unembed is model.lm_head


def test_lens_on_last_layer_equals_model_logits(tiny, chat_prompts):
    model, tokenizer = tiny
    batch = tokenize_prompts(tokenizer, chat_prompts[:3])
    captured = {}
    with torch.no_grad(), hooked(model, [(site_name(LAST), lambda h: captured.setdefault("resid", h))]):
        logits = model(**batch, position_ids=padded_position_ids(batch["attention_mask"])).logits
    lens = LogitLens(model, tokenizer).logits(captured["resid"])  # [batch, seq, vocab]
    assert lens.shape == logits.shape and lens.dtype == torch.float32
    torch.testing.assert_close(lens, logits.float(), atol=1e-5, rtol=1e-5)


def test_lens_matches_closed_form_at_every_layer(tiny, acts):
    model, tokenizer = tiny
    lens = LogitLens(model, tokenizer)
    with torch.no_grad():
        got = lens.logits(acts)  # [3, 3, vocab]
    torch.testing.assert_close(got.double(), _closed_form(model, acts), atol=1e-4, rtol=1e-4)
    # Differentiable: a translator trained on top of the lens gets gradients.
    resid = acts[0, 1].clone().requires_grad_(True)
    lens.logits(resid)[5].backward()
    assert resid.grad is not None and bool(resid.grad.abs().sum() > 0)


def test_decode_top_k_per_layer(tiny, acts):
    model, tokenizer = tiny
    lens = LogitLens(model, tokenizer)
    top = lens.decode_layer_activations(acts, k=4)
    assert top.ids.shape == top.probs.shape == (3, 3, 4)
    probs = _closed_form(model, acts).softmax(-1)  # [3, 3, vocab] float64
    ref = probs.topk(4, dim=-1)
    assert torch.equal(top.ids, ref.indices)
    torch.testing.assert_close(top.probs.double(), ref.values, atol=1e-6, rtol=1e-4)
    assert bool((top.probs[..., :-1] >= top.probs[..., 1:]).all())
    assert top.tokens[2][1] == [tokenizer.decode([i]) for i in ref.indices[2, 1].tolist()]
    single = lens.decode_layer_activations(acts[1], k=2)  # [n_layers, d] -> [n_layers, k]
    assert single.ids.shape == (3, 2) and torch.equal(single.ids, top.ids[1, :, :2])
    assert len(single.tokens) == 3 and len(single.tokens[0]) == 2


def test_target_rank_and_prob(tiny, acts):
    model, tokenizer = tiny
    lens = LogitLens(model, tokenizer)
    logits = _closed_form(model, acts[0])  # [n_layers, vocab]
    order = logits.argsort(-1, descending=True)
    target = int(order[1, 7])  # planted: the 8th most likely token at layer 15
    ranks, probs = lens.target_rank_and_prob(acts[0], target)
    assert ranks.shape == probs.shape == (3,) and ranks.dtype == torch.long
    assert int(ranks[1]) == 7
    manual = logits.softmax(-1)[:, target]
    torch.testing.assert_close(probs.double(), manual, atol=1e-7, rtol=1e-4)
    for layer in range(3):
        assert int(ranks[layer]) == int((logits[layer] > logits[layer, target]).sum())
    targets = torch.tensor([target, 0, int(order[2, 0])])  # one per prompt; the third is layer 31's top-1
    batch_ranks, batch_probs = lens.target_rank_and_prob(acts, targets)
    assert batch_ranks.shape == batch_probs.shape == (3, 3)
    assert torch.equal(batch_ranks[0], ranks) and torch.equal(batch_probs[0], probs)
    for i in range(3):
        logits_i = _closed_form(model, acts[i])
        expected = (logits_i > logits_i[:, targets[i], None]).sum(-1)
        assert torch.equal(batch_ranks[i], expected)
        torch.testing.assert_close(batch_probs[i].double(), logits_i.softmax(-1)[:, targets[i]], atol=1e-7, rtol=1e-4)
    assert int(lens.target_rank_and_prob(acts[0], int(order[2, 0]))[0][2]) == 0


def test_last_position_logits_of_prompts(tiny, chat_prompts):
    model, tokenizer = tiny
    lens = LogitLens(model, tokenizer)
    got = lens.last_position_logits(chat_prompts[:3], layers=[4, LAST], batch_size=2)
    assert got.shape == (3, 2, model.config.vocab_size)
    for i, prompt in enumerate(chat_prompts[:3]):
        with torch.no_grad():
            out = model(**tokenize_prompts(tokenizer, [prompt]), output_hidden_states=True)
        torch.testing.assert_close(got[i, 1], out.logits[0, -1].float(), atol=1e-5, rtol=1e-5)
        ref = _closed_form(model, out.hidden_states[5][0, -1])  # entry l+1 = output of layer l
        torch.testing.assert_close(got[i, 0].double(), ref, atol=1e-4, rtol=1e-4)


def test_structural_norm_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    assert final_norm(model) is model.transformer.ln_f
    ids = torch.randint(0, 50, (2, 7))
    captured = {}
    with torch.no_grad(), hooked(model, [(site_name(1), lambda h: captured.setdefault("resid", h))]):
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(LogitLens(model).logits(captured["resid"]), logits, atol=1e-5, rtol=1e-5)


def test_lens_rejects_bad_inputs(tiny, acts):
    model, tokenizer = tiny
    lens = LogitLens(model, tokenizer)
    with pytest.raises(UserError, match=r"\[n_layers, 64\] or \[batch, n_layers, 64\]"):
        lens.decode_layer_activations(acts[..., :10])
    with pytest.raises(UserError, match="k must be between 1"):
        lens.decode_layer_activations(acts, k=0)
    with pytest.raises(UserError, match="needs the tokenizer"):
        LogitLens(model).decode_layer_activations(acts)
    with pytest.raises(UserError, match="out of range"):
        lens.target_rank_and_prob(acts, model.config.vocab_size)
    with pytest.raises(UserError, match="one id or one per prompt"):
        lens.target_rank_and_prob(acts[0], torch.tensor([1, 2, 3]))
    stub = types.SimpleNamespace(base_model=nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4)))
    with pytest.raises(UserError, match="cannot find the final norm of Sequential"):
        final_norm(stub)


def test_tuned_lens_without_lightning(tiny, acts):
    """An untrained TunedLens is the logit lens: its KL(model's last layer || layer l) equals the float64 closed form,
    it is exactly 0 at the last layer, and training touches every layer but the last."""
    model, _ = tiny
    lens = TunedLens.for_model(model, [0, 15, LAST], rank=2)
    assert lens.final_slot == 2 and lens.trained_slots == [0, 1]
    with torch.no_grad():
        kl = lens.kl_per_layer(acts)  # [3, 3]
        log_p = _closed_form(model, acts[:, 2]).log_softmax(-1)  # [3, vocab] float64
        expected = torch.stack([(log_p.exp() * (log_p - _closed_form(model, acts[:, i]).log_softmax(-1))).sum(-1)
                                for i in range(3)], dim=1)  # fmt: skip
        torch.testing.assert_close(lens.logits(acts).double(), _closed_form(model, acts), atol=1e-4, rtol=1e-4)
    assert bool((kl[:, 2] == 0).all()) and float(kl[:, 0].min()) > 1e-3
    torch.testing.assert_close(kl.double(), expected, atol=1e-4, rtol=1e-4)
    loss = lens.kl_per_layer(acts, slots=lens.trained_slots).mean()
    loss.backward()
    assert lens.translators.up.grad[:2].abs().sum() > 0 and not lens.translators.up.grad[2].any()
    with pytest.raises(UserError, match="last layer"):
        TunedLens.for_model(model, [0, 15])
