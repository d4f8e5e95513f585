"""Real-shape backbones with random weights (interp/shape_backbone.py): the 32B architectures on the meta device
with the real parameter count and no memory, a small config built on the CPU with the model's own initialisation,
the real tokenizer and template, bad input, and the placement of one copy per group of GPUs (replica_gpus)."""

import dataclasses

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


# ---- model-parallel groups under DDP: backbone.replica_gpus ---------------------------------------------------------
GIB = 2**30


def test_a_replica_is_placed_on_its_own_gpus_only():
    """Rank r's copy of QwQ-32B (bf16, 61 GiB) with replica_gpus 2 on trainer device 2: accelerate's own placement
    (infer_auto_device_map, as from_pretrained runs it) puts every module on GPU 2 or 3 and nothing elsewhere."""
    from accelerate import infer_auto_device_map

    spec = BackboneSpec("shape:qwq-32b", dtype="bfloat16", device_map="auto", replica_gpus=2)
    placed = spec.for_replica(2, free_bytes=lambda gpu: 40 * GIB)
    assert placed.max_memory == {2: 40 * GIB, 3: 40 * GIB} and placed.replica_gpus is None
    model, _ = load_backbone("shape:qwq-32b", dtype="bfloat16", device_map="meta")
    device_map = infer_auto_device_map(model, max_memory=placed.max_memory, no_split_module_classes=["Qwen2DecoderLayer"])
    assert set(device_map.values()) == {2, 3}
    configured = BackboneSpec("shape:qwq-32b", dtype="bfloat16", device_map="auto", replica_gpus=2,
                              max_memory={3: "35GiB", "cpu": "100GiB"})  # fmt: skip
    assert configured.for_replica(2, free_bytes=lambda gpu: 40 * GIB).max_memory == {
        2: 40 * GIB, 3: "35GiB", "cpu": "100GiB"}  # a configured limit wins; the CPU offload is kept
    with pytest.raises(UserError, match="less than the weights"):  # a copy must fit its own GPUs
        spec.for_replica(0, free_bytes=lambda gpu: 20 * GIB)


def test_frozen_backbone_loads_each_ranks_copy_on_its_group(monkeypatch):
    from lightning_modules.frozen_backbone import FrozenBackbone

    loaded = []
    monkeypatch.setattr(BackboneSpec, "load", lambda self: loaded.append(self) or (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda gpu: (70 * GIB, 80 * GIB))
    spec = BackboneSpec("shape:qwq-32b", dtype="bfloat16", device_map="auto", replica_gpus=2)
    FrozenBackbone(spec).model(torch.device("cuda", 4))
    assert loaded[-1].max_memory == {4: 70 * GIB, 5: 70 * GIB}
    FrozenBackbone(dataclasses.replace(spec, replica_gpus=None)).model(torch.device("cuda", 4))
    assert loaded[-1].max_memory is None  # without replica_gpus: accelerate's default, every visible GPU


@pytest.mark.parametrize(("replica_gpus", "device_ids", "world_size", "visible", "message"), [
    (None, [0, 1, 2, 3], 4, 4, "each would shard its copy over every GPU"),
    (2, [0, 1], 2, 4, "GPU 1 is also in the copy starting at GPU 0"),
    (2, [0, 2, 4, 6], 4, 7, "GPU 7 is not visible"),
    (2, [0, 2, 4, 6], 4, 8, None),
    (None, [0], 1, 8, None),  # one process: accelerate shards over every visible GPU, as documented
])  # fmt: skip
def test_replica_placement_is_checked_before_loading(replica_gpus, device_ids, world_size, visible, message):
    from interp.backbone import check_replica_placement

    spec = BackboneSpec("shape:qwq-32b", dtype="bfloat16", device_map="auto", replica_gpus=replica_gpus)
    if message is None:
        check_replica_placement(spec, device_ids, world_size, visible)
    else:
        with pytest.raises(UserError, match=message):
            check_replica_placement(spec, device_ids, world_size, visible)
    with pytest.raises(UserError, match="needs backbone.device_map auto"):
        BackboneSpec("shape:qwq-32b", replica_gpus=2)
