"""Backbone loading through the real from_pretrained path, and decoder-layer discovery across families."""

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from interp.activations import collect_activations
from interp.backbone import (
    BUILTIN_BACKBONES,
    BackboneSpec,
    backbone_fingerprint,
    decoder_layers,
    load_backbone,
    load_tokenizer,
)
from interp.errors import UserError

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=151669, max_position_embeddings=512)  # fmt: skip
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, SMALL),
    "llama": (LlamaConfig, LlamaForCausalLM, SMALL),
    "mistral": (MistralConfig, MistralForCausalLM, SMALL),
    "gemma": (GemmaConfig, GemmaForCausalLM, {**SMALL, "head_dim": 8}),
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=3, n_head=4, vocab_size=151669, n_positions=512)),
}


def _save_random(tmp_path, family):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs))
    path = tmp_path / family
    model.save_pretrained(path)
    load_tokenizer("tiny").save_pretrained(path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_load_and_capture_like_output_hidden_states(family, tmp_path, chat_prompts):
    path = _save_random(tmp_path, family)
    model, tokenizer = load_backbone(str(path), dtype="float32")
    assert len(decoder_layers(model)) == 3
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    acts = collect_activations(model, tokenizer, chat_prompts[:3], layers=[0, 1], batch_size=3)
    for i, prompt in enumerate(chat_prompts[:3]):
        batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        for slot, layer in enumerate([0, 1]):
            torch.testing.assert_close(acts[i, slot], hidden[layer + 1][0, -1], atol=1e-5, rtol=1e-5)


def test_local_directory_with_dtype_and_device_map(tmp_path):
    path = _save_random(tmp_path, "qwen2")
    model, tokenizer = load_backbone(str(path), dtype="bfloat16", device_map="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert backbone_fingerprint(str(path)) == backbone_fingerprint(str(path))


def test_fingerprint_changes_with_the_weights(tmp_path):
    path = _save_random(tmp_path, "qwen2")
    before = backbone_fingerprint(str(path))
    model = Qwen2ForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    model.save_pretrained(path)
    assert backbone_fingerprint(str(path)) != before


def test_builtin_backbones_have_the_real_shapes_tokens_and_templates(tiny, tiny_r1):
    for (model, _tokenizer), name in ((tiny, "tiny"), (tiny_r1, "tiny-r1-distill")):
        spec = BUILTIN_BACKBONES[name]
        assert model.config.num_hidden_layers == spec.num_hidden_layers == len(decoder_layers(model))
        assert model.config.hidden_size == spec.hidden_size and model.config.vocab_size == 152064
        assert not model.config.tie_word_embeddings
    _, qwq_tok = tiny
    _, r1_tok = tiny_r1
    assert qwq_tok("Hello world")["input_ids"] == [9707, 1879]  # the real Qwen2.5 BPE ids
    assert qwq_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>"]) == [151644, 151645, 151667]
    assert r1_tok.convert_tokens_to_ids(["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"]) == [
        151646, 151644, 151645, 151648]  # fmt: skip
    messages = [{"role": "user", "content": "Q?"}]
    assert qwq_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\n")  # fmt: skip
    assert r1_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>Q?<｜Assistant｜><think>\n")  # fmt: skip


def test_builtin_is_deterministic(tiny):
    model, _ = tiny
    rebuilt = load_backbone("tiny", dtype="float32")[0]
    for a, b in zip(model.parameters(), rebuilt.parameters()):
        assert torch.equal(a, b)


def test_bad_backbone_specs():
    with pytest.raises(UserError, match="does not exist"):
        load_backbone("./no/such/model")
    with pytest.raises(UserError, match="dtype"):
        BackboneSpec("tiny", dtype="float8")
    with pytest.raises(UserError, match="quantization"):
        BackboneSpec("tiny", quantization="2bit")
    assert BackboneSpec("tiny").num_layers() == 32 and BackboneSpec("tiny").hidden_size() == 64
