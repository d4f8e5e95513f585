"""Real-shape backbones with random weights (interp/shape_backbone.py): the 32B architectures on the meta device
with the real parameter count and no memory, a small config built on the CPU with the model's own initialisation,
the real tokenizer and template, and bad input."""

import pytest
import torch
from transformers import Qwen2Config

from interp.backbone import BackboneSpec, load_backbone
from interp.errors import UserError

QWQ_32B_PARAMETERS = 32_763_876_352  # Qwen/QwQ-32B, embeddings and the untied lm_head included (test_configs.py)


@pytest.mark.parametrize("name", ["shape:qwq-32b", "shape:r1-distill-qwen-32b"])
def test_32b_shapes_on_the_meta_device_have_the_real_parameter_count(name):
    model, tokenizer = load_backbone(name, dtype="bfloat16", device_map="meta")
    parameters = list(model.parameters())
    assert all(p.is_meta for p in parameters) and model.dtype == torch.bfloat16  # no memory behind any weight
    assert sum(p.numel() for p in parameters) == QWQ_32B_PARAMETERS  # the two share Qwen2.5-32B's architecture
    assert model.config.num_hidden_layers == 64 and model.config.hidden_size == 5120
    assert len(tokenizer) >= 151665 and tokenizer.padding_side == "left"
    spec = BackboneSpec(name)
    assert (spec.num_layers(), spec.hidden_size()) == (64, 5120)
    assert spec.fingerprint()["weights"].startswith("shape-")


@pytest.mark.parametrize("dtype, quantization, bytes_per_parameter", [("bfloat16", None, 2), ("float32", None, 4)])
def test_max_memory_below_the_weights_is_refused_before_loading(dtype, quantization, bytes_per_parameter):
    """The weights of QwQ-32B are parameters x bytes per parameter (61.0 GiB in bf16): a max_memory 1 GiB short of
    that is one clear error, 1 GiB over it passes (nothing is loaded either way)."""
    weights_gib = QWQ_32B_PARAMETERS * bytes_per_parameter / 2**30
    common = {"name_or_path": "shape:qwq-32b", "dtype": dtype, "device_map": "auto", "quantization": quantization}
    with pytest.raises(UserError, match=f"{weights_gib:.1f} GiB"):
        BackboneSpec(**common, max_memory={0: f"{weights_gib - 1:.2f}GiB"})
    BackboneSpec(**common, max_memory={0: f"{weights_gib / 2 + 0.5:.2f}GiB", "cpu": f"{weights_gib / 2 + 0.5:.2f}GiB"})


def test_templates_are_the_real_models():
    _, qwq = load_backbone("shape:qwq-32b", device_map="meta")
    _, r1 = load_backbone("shape:r1-distill-qwen-32b", device_map="meta")
    message = [{"role": "user", "content": "2 + 2?"}]
    assert qwq.apply_chat_template(message, tokenize=False, add_generation_prompt=True).endswith("<think>\n")
    assert "<｜Assistant｜>" in r1.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    assert BackboneSpec("shape:qwq-32b").fingerprint() != BackboneSpec("shape:r1-distill-qwen-32b").fingerprint()


def _small_config_dir(tmp_path):
    config = Qwen2Config(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(tmp_path)
    return tmp_path


def test_a_config_directory_is_built_with_the_models_own_initialisation(tmp_path):
    """Seeded (two builds are equal), in the requested dtype, the weights drawn by _init_weights (N(0, 0.02) for
    the projections: not uninitialised memory), and it runs."""
    name = f"shape:{_small_config_dir(tmp_path)}"
    model, tokenizer = load_backbone(name, dtype="float32")
    again, _ = load_backbone(name, dtype="float32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    weight = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64 = 4096 draws: std within 10% of 0.02
    assert model.dtype == torch.float32 and abs(float(weight.std()) - 0.02) < 0.002
    assert load_backbone(name)[0].dtype == torch.bfloat16  # dtype None: the config's own
    batch = tokenizer(["<|im_start|>user\nhi<|im_end|>"], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"name_or_path": "shape:llama-70b"}, "unknown shape backbone 'shape:llama-70b'"),
    ({"name_or_path": "shape:"}, "unknown shape backbone"),
    ({"name_or_path": "shape:qwq-32b", "device_map": {"": 0}}, "built on one device"),
    ({"name_or_path": "shape:qwq-32b", "quantization": "4bit"}, "quantization is not supported"),
])  # fmt: skip
def test_bad_shape_input_is_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_backbone(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(UserError, match="no CUDA device is visible"):
        load_backbone("shape:qwq-32b", device_map="cuda")
