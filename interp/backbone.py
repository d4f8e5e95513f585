"""Loading a frozen backbone through the real `from_pretrained` path, and finding its parts.

`load_backbone` accepts a hub id, a local directory written by `save_pretrained`, or the name of a
built-in backbone (see `BUILTIN_BACKBONES`). Built-ins are small Qwen2 models with the real Qwen2.5 BPE and the
chat template of the model they stand in for; they are built once, written with `save_pretrained` into a local
cache and then loaded exactly like a real checkpoint. Two kinds:
- tiny, tiny-qwq, tiny-r1-distill: deterministic random weights (fast; for exactness and speed tests);
  tiny-r1-distill is tiny-qwq's weights plus noise growing with depth (the study's planted answer);
- toy-qwq, toy-r1-distill: trained to solve synthetic arithmetic word problems (a miniature of the real pair
  with a known answer). Their builders train with Lightning, so they live in lightning_modules/toy_lm.py and
  are imported by name only when a toy model is first built: interp/ itself never imports Lightning.

Architecture parts are found structurally, never by model name:
- `decoder_layers(model)`: the ModuleList with `num_hidden_layers` entries (Qwen2, Llama, Mistral, Gemma,
  GPT-2, ...);
- `base_decoder(model)`: the model without its LM head (`model.base_model`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from interp.errors import UserError
from interp.shape_backbone import (
    build_shape_model,
    is_shape,
    shape_config_dir,
    shape_fingerprint,
    shape_tokenizer,
)

ASSETS = Path(__file__).parent / "assets"
TINY_BACKBONE_VERSION = 2  # bump when the tiny recipe changes: it is part of the cache path
TOY_BACKBONE_VERSION = 2  # bump when the toy corpus or training recipe changes (lightning_modules/toy_lm.py)


@dataclass(frozen=True)
class TinySpec:
    """A built-in stand-in for a real model: its template, special tokens, seed, shape and (toy models) builder."""

    template_dir: str  # under interp/assets: chat_template.jinja and config.json of the real model
    added_tokens: tuple[str, ...]  # added tokens in id order, starting at 151643 (as in the real tokenizer)
    bos: str | None
    eos: str
    pad: str
    seed: int
    num_hidden_layers: int = 32
    hidden_size: int = 64
    intermediate_size: int = 176
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    builder: str | None = None  # "module:function" that trains and writes the model; None = random weights
    rope_theta: float | None = None  # None = the real model's (1e6)
    base: str | None = None  # start from this built-in's weights (a "fine-tune" of it), then perturb
    perturbation: float = 0.0  # layer l's projections get N(0, (perturbation * (l + 1) / L * std(W))^2) noise


_QWEN_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
_R1_DISTILL_ADDED = (
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>", "<think>",
    "</think>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

BUILTIN_BACKBONES: dict[str, TinySpec] = {
    "tiny-qwq": TinySpec("qwq-32b", _QWEN_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", seed=0),
    # A known answer for the two-model study: tiny-r1-distill = tiny-qwq's weights plus noise that grows with depth
    # (std 2 (l + 1) / 32 of each projection's own std at layer l; seed 1), with R1-Distill's template and tokens.
    # Last-token CKA of the two on toy problems: ~0.98 at layer 0 falling to ~0.73 at layer 31.
    "tiny-r1-distill": TinySpec(
        "r1-distill-qwen-32b", _R1_DISTILL_ADDED, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>", seed=1, base="tiny-qwq", perturbation=2.0,
    ),
}
BUILTIN_BACKBONES["tiny"] = BUILTIN_BACKBONES["tiny-qwq"]
_TOY_SHAPE = {"num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
              "num_key_value_heads": 4, "rope_theta": 10000.0}  # fmt: skip
# 3 layers and MLP 256 build in ~60% of the time of 4 layers and MLP 512 at equal or better held-out accuracy
# (bench/toy_pair.py: 0.985 / 0.955 vs 0.975 / 0.895). rope_theta 1e4, not the real 1e6: at head dim 32 and ~150-token texts, 1e6 leaves few rotary frequencies that
# tell neighbouring positions apart, and the copy (induction) heads the toy task needs form much later.
BUILTIN_BACKBONES["toy-qwq"] = TinySpec(
    "qwq-32b", _QWEN_ADDED, bos=None, eos="<|im_end|>", pad="<|endoftext|>", seed=0, **_TOY_SHAPE,
    builder="lightning_modules.toy_lm:build_toy_qwq",
)
BUILTIN_BACKBONES["toy-r1-distill"] = TinySpec(
    "r1-distill-qwen-32b", _R1_DISTILL_ADDED, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
    pad="<｜end▁of▁sentence｜>", seed=1, **_TOY_SHAPE, builder="lightning_modules.toy_lm:build_toy_r1_distill",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def cache_root() -> Path:
    """Where built-in backbones and activation caches live (env REASONING_DIRECTIONS_CACHE overrides)."""
    default = Path.home() / ".cache" / "reasoning-directions"
    return Path(os.environ.get("REASONING_DIRECTIONS_CACHE", default))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep) and Path(name).expanduser().exists()


def resolve_backbone_path(name_or_path: str) -> str:
    """Built-in name -> its local directory (built on first use); local dir -> checked; hub id -> unchanged.

    Raises UserError for a local path that does not exist or holds no config.json. `shape:<model>` -> the
    directory of its config.json (`interp.shape_backbone`).
    """
    if name_or_path in BUILTIN_BACKBONES:
        return str(build_tiny_backbone(name_or_path))
    if is_shape(name_or_path):
        return str(shape_config_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {name_or_path!r} has no config.json")
        return str(path)
    if _looks_like_path(name_or_path) or path.suffix or name_or_path.count("/") > 1:
        raise UserError(f"model path {name_or_path!r} does not exist")
    close = difflib.get_close_matches(name_or_path, BUILTIN_BACKBONES, n=1) if "/" not in name_or_path else []
    if close:  # a bare word next to a built-in's name is a typo, not one of the few legacy slash-less hub ids
        raise UserError(f"unknown backbone {name_or_path!r}: did you mean {close[0]!r}? (built-ins: "
                        f"{', '.join(BUILTIN_BACKBONES)}; otherwise a hub id owner/name or a local directory)")
    return name_or_path  # a hub id such as "Qwen/QwQ-32B"


def check_hub_id_available(repo_id: str, revision: str | None = None) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub id must already be in the local Hugging Face cache; UserError otherwise,
    before anything loads (from_pretrained would fail with three chained tracebacks)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(repo_id, "config.json", revision), str):
        raise UserError(f"backbone {repo_id!r} is not in the local Hugging Face cache and the hub is offline "
                        f"(HF_HUB_OFFLINE=1): download it first (hf download {repo_id}) or give a local directory")


def parameter_count(config) -> int:
    """The parameters of the architecture in `config`, counted on the meta device (no memory; ~1 s for 32B)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_tiny_backbone(name: str) -> Path:
    """Build (once) and return the directory of a built-in backbone. Safe under concurrent builders: one
    process builds (under a file lock), the others wait and then load its result."""
    from filelock import FileLock

    spec = BUILTIN_BACKBONES[name]
    key = next(k for k, v in BUILTIN_BACKBONES.items() if v is spec and k != "tiny")
    version = TOY_BACKBONE_VERSION if spec.builder else TINY_BACKBONE_VERSION
    target = cache_root() / "backbones" / f"{key}-v{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{key}-v{version}.lock")):
        if (target / "config.json").is_file():  # built by another process while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            tokenizer = _tiny_tokenizer(spec)
            tokenizer.save_pretrained(staging)
            if spec.builder is None:
                _tiny_model(spec).save_pretrained(staging)
            else:
                module, function = spec.builder.split(":")
                getattr(importlib.import_module(module), function)(spec, tokenizer, staging)
            os.rename(staging, target)  # atomic: a directory with config.json is always complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny_tokenizer(spec: TinySpec) -> PreTrainedTokenizerBase:
    from transformers import Qwen2Tokenizer

    vocab = json.loads((ASSETS / "qwen2.5" / "vocab.json").read_text(encoding="utf-8"))
    merges_lines = (ASSETS / "qwen2.5" / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in merges_lines if line and not line.startswith("#version")]
    first_added = 151643
    assert len(vocab) == first_added and len(merges) == 151387, (len(vocab), len(merges))
    # The constructor registers its special tokens first: make that the token with id 151643, as in the real
    # tokenizer, then add the rest in id order.
    first = spec.added_tokens[0]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=first, pad_token=first)
    tokenizer.add_tokens(list(spec.added_tokens[1:]), special_tokens=True)
    for i, token in enumerate(spec.added_tokens):  # the ids must match the real tokenizer's
        assert tokenizer.convert_tokens_to_ids(token) == first_added + i, token
    tokenizer.eos_token, tokenizer.pad_token = spec.eos, spec.pad
    if spec.bos is not None:
        tokenizer.bos_token = spec.bos
    tokenizer.chat_template = (ASSETS / spec.template_dir / "chat_template.jinja").read_text()
    return tokenizer


def tiny_config(spec: TinySpec, vocab_size: int | None = None):
    """The Qwen2Config of a built-in: its shape, the real model's norms, RoPE and special ids; `vocab_size`
    None = the real model's (152,064)."""
    from transformers import Qwen2Config

    real = json.loads((ASSETS / spec.template_dir / "config.json").read_text())
    return Qwen2Config(
        vocab_size=real["vocab_size"] if vocab_size is None else vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=real["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta or real["rope_theta"]},
        tie_word_embeddings=False,
        bos_token_id=real["bos_token_id"],
        eos_token_id=real["eos_token_id"],
        pad_token_id=real["bos_token_id"],
    )


def _tiny_model(spec: TinySpec) -> PreTrainedModel:
    from transformers import Qwen2ForCausalLM

    config = tiny_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    assert model.config.num_hidden_layers == spec.num_hidden_layers and model.config.hidden_size == spec.hidden_size
    if spec.base is not None:
        model.load_state_dict(_tiny_model(BUILTIN_BACKBONES[spec.base]).state_dict())
        generator, layers = torch.Generator().manual_seed(spec.seed), model.model.layers
        with torch.no_grad():
            for index, layer in enumerate(layers):
                scale = spec.perturbation * (index + 1) / len(layers)
                for weight in (p for p in layer.parameters() if p.ndim == 2):  # projections; norms stay
                    weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return model


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The backbone's tokenizer, set up for batched extraction (left padding, a pad token)."""
    if is_shape(name_or_path):
        tokenizer = shape_tokenizer(name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_backbone_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The backbone's config without loading weights (used to validate layer indices up front). A hub id must be
    in the local cache when the hub is offline (`check_hub_id_available`)."""
    path = resolve_backbone_path(name_or_path)
    if not Path(path).is_dir():
        check_hub_id_available(path, revision)
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def load_backbone(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_memory: dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: hub id, local `save_pretrained` directory, a built-in name ("tiny", "tiny-qwq",
            "tiny-r1-distill", "toy-qwq", "toy-r1-distill"), or a real architecture with random weights
            ("shape:qwq-32b", "shape:r1-distill-qwen-32b", "shape:<config dir>"; `interp.shape_backbone`).
        dtype: "float32" | "bfloat16" | "float16" | "auto" | torch.dtype; None = the checkpoint's own.
        device_map: passed to `from_pretrained` ("auto" shards across visible GPUs through accelerate); shape
            backbones: one device, or "meta" (no memory).
        quantization: None | "8bit" | "4bit" (bitsandbytes).
        max_memory: accelerate's per-device limit for device_map "auto", e.g. {0: "70GiB", "cpu": "200GiB"}.
    Returns:
        (model in eval mode with requires_grad False everywhere, tokenizer with left padding).
    """
    path = resolve_backbone_path(name_or_path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if quantization not in ("8bit", "4bit"):
            raise UserError(f"unknown quantization {quantization!r}; expected '8bit' or '4bit'")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit"
        )
    if is_shape(name_or_path):
        if quantization is not None:
            raise UserError(f"{name_or_path} has random weights: quantization is not supported")
        model = build_shape_model(name_or_path, dtype, device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.requires_grad_(False).eval()
    decoder_layers(model)  # fail now, not mid-run, if the layer stack cannot be found
    return model, load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def num_layers(config) -> int:
    return config.get_text_config().num_hidden_layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the one ModuleList whose length is the config's layer count."""
    n = num_layers(model.config)
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    found = [m for m in found if len({type(block) for block in m}) == 1]
    if not found:
        raise UserError(f"cannot find a stack of {n} decoder layers in {type(model).__name__}")
    return found[0]


def base_decoder(model: PreTrainedModel) -> nn.Module:
    """The transformer without its LM head (Qwen2Model for Qwen2ForCausalLM, GPT2Model for GPT-2)."""
    return model.base_model


def input_device(model: PreTrainedModel) -> torch.device:
    """Where token ids must go (the embedding's device; differs from others under device_map)."""
    return model.get_input_embeddings().weight.device


def backbone_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """A short id of the weights, for cache keys.

    Hub ids: id + revision. Local directories: config.json plus, for every weight file, its name, size and
    the sha256 of its first and last MiB (cheap even for 64 GB checkpoints; changes when weights change).
    """
    if is_shape(name_or_path):
        return shape_fingerprint(name_or_path)
    path = Path(resolve_backbone_path(name_or_path))
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(f"{name_or_path}@{revision or 'main'}".encode())
        return digest.hexdigest()[:16]
    digest.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def replica_max_memory(max_memory: dict | None, first_gpu: int, n_gpus: int, free_bytes: Callable[[int], int]) -> dict:
    """accelerate's max_memory for one copy of the model on GPUs first_gpu .. first_gpu + n_gpus - 1: accelerate
    places device_map "auto" on the devices max_memory names and no others. Each GPU's limit is the configured one
    (key: the GPU index), else free_bytes(gpu); a configured "cpu" / "disk" offload limit is kept."""
    max_memory = max_memory or {}
    placed = {gpu: max_memory.get(gpu, max_memory.get(str(gpu))) for gpu in range(first_gpu, first_gpu + n_gpus)}
    placed = {gpu: free_bytes(gpu) if limit is None else limit for gpu, limit in placed.items()}
    return placed | {key: max_memory[key] for key in ("cpu", "disk") if key in max_memory}


def check_replica_placement(spec: BackboneSpec, device_ids: list[int], world_size: int, visible_gpus: int) -> None:
    """device_map auto under several processes needs replica_gpus, and each process's GPUs [d, d + replica_gpus)
    (d: its trainer device) must exist and not overlap another's: one clear line before any model loads."""
    if spec.device_map != "auto":
        return
    example = ("e.g. --trainer.devices [0,2,4,6] --data.init_args.backbone.replica_gpus 2 (4 copies of 2 GPUs), or "
               "device_map null for one whole copy per GPU")  # fmt: skip
    if spec.replica_gpus is None:
        if world_size > 1:
            raise UserError(f"backbone.device_map auto with {world_size} processes: each would shard its copy over "
                            f"every GPU it sees; set backbone.replica_gpus (GPUs per copy), {example}")  # fmt: skip
        return
    taken: dict[int, int] = {}
    for first in device_ids:
        for gpu in range(first, first + spec.replica_gpus):
            if gpu >= visible_gpus or gpu in taken:
                problem = f"GPU {gpu} is not visible ({visible_gpus} are)" if gpu >= visible_gpus else (
                    f"GPU {gpu} is also in the copy starting at GPU {taken[gpu]}")  # fmt: skip
                raise UserError(f"backbone.replica_gpus {spec.replica_gpus} with trainer devices {device_ids}: "
                                f"{problem}; list each copy's first GPU, {example}")  # fmt: skip
            taken[gpu] = first


@dataclass
class BackboneSpec:
    """Which frozen backbone to load and how (the config's `backbone:` section)."""

    name_or_path: str = "tiny"
    """Hub id (e.g. Qwen/QwQ-32B), local save_pretrained directory, or built-in: tiny, tiny-qwq, tiny-r1-distill
    (random weights), toy-qwq, toy-r1-distill (trained on toy_arithmetic; built on first use, a few minutes), or a
    real architecture with random weights built on the device: shape:qwq-32b, shape:r1-distill-qwen-32b,
    shape:<config dir> (speed and memory measurements; device_map "meta" for no memory)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 | auto (the checkpoint's own)."""
    device_map: str | None = None
    """None: Lightning places the model on its device; "auto": accelerate shards it over the visible GPUs."""
    attn_implementation: str | None = None
    """sdpa | eager | flash_attention_2; None = the transformers default."""
    quantization: str | None = None
    """None | 8bit | 4bit (bitsandbytes: pip install -e '.[quantization]'; CUDA only)."""
    max_memory: dict[int | str, int | str] | None = None
    """With device_map auto: the most memory per device, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB} (accelerate's
    max_memory); checked before loading against the weights' size (parameters x bytes per parameter)."""
    replica_gpus: int | None = None
    """With device_map auto: the GPUs each process's copy spans, from the process's own GPU on: under DDP with
    trainer.devices [0, 2, 4, 6] and replica_gpus 2, rank r shards its copy over GPUs 2r and 2r + 1 (a
    model-parallel group per data-parallel replica). Needed for device_map auto with more than one process, where
    every rank would otherwise shard over all the GPUs it sees."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); part of the activation-cache key. The prompts' tokenizer and chat
    template come from the same revision."""
    trust_remote_code: bool = False
    """Let transformers run the Python files shipped in the model's repository (config, tokenizer, model).
    Never needed for Qwen2 models (QwQ-32B, DeepSeek-R1-Distill-Qwen-32B); turn it on only for a repository you
    trust: that code runs with your permissions."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"backbone.dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise UserError(f"backbone.quantization {self.quantization!r} is not one of None, '8bit', '4bit'")
        if self.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"backbone.quantization {self.quantization} needs bitsandbytes, which is not installed: "
                            "pip install -e '.[quantization]' (CUDA GPUs only)")  # fmt: skip
        if self.max_memory is not None and self.device_map is None:
            raise UserError("backbone.max_memory needs backbone.device_map (e.g. auto) to place the model with")
        if self.replica_gpus is not None and (self.device_map != "auto" or self.replica_gpus < 1):
            raise UserError(f"backbone.replica_gpus {self.replica_gpus} needs backbone.device_map auto and a positive "
                            "number of GPUs per copy")  # fmt: skip
        if self.name_or_path not in BUILTIN_BACKBONES:
            resolve_backbone_path(self.name_or_path)  # a missing local path fails here, before any loading
        self.check_max_memory()

    def check_max_memory(self) -> None:
        """UserError when `max_memory` cannot hold the weights: its total below parameters x bytes per parameter
        (the dtype's size; 1 for 8bit, 0.5 for 4bit), the parameters counted on the meta device."""
        if self.max_memory is None:
            return
        from accelerate.utils import convert_file_size_to_int

        try:
            budget = sum(convert_file_size_to_int(size) for size in self.max_memory.values())
        except ValueError as error:
            raise UserError(f"backbone.max_memory {self.max_memory}: {error}") from error
        config = self.config()
        dtype = DTYPES[self.dtype]
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        per_parameter = {"8bit": 1.0, "4bit": 0.5}.get(self.quantization, dtype.itemsize)
        n = parameter_count(config)
        if budget < n * per_parameter:
            raise UserError(f"backbone.max_memory totals {_gib(budget)}, less than the weights of "
                            f"{self.name_or_path} alone ({n / 1e9:.3g}B parameters x {per_parameter:g} bytes = "
                            f"{_gib(n * per_parameter)}): raise it, add devices or quantize")  # fmt: skip

    def for_replica(self, first_gpu: int, free_bytes: Callable[[int], int]) -> BackboneSpec:
        """This spec placed on GPUs first_gpu .. first_gpu + replica_gpus - 1 only (`replica_max_memory`); itself
        without replica_gpus. free_bytes(gpu): the memory to allow on a GPU max_memory does not name (e.g.
        torch.cuda.mem_get_info(gpu)[0])."""
        if self.replica_gpus is None:
            return self
        max_memory = replica_max_memory(self.max_memory, first_gpu, self.replica_gpus, free_bytes)
        return replace(self, max_memory=max_memory, replica_gpus=None)

    def config(self):
        """The architecture's config without loading (or building) any weights."""
        if self.name_or_path in BUILTIN_BACKBONES:
            return tiny_config(BUILTIN_BACKBONES[self.name_or_path])
        return load_config(self.name_or_path, self.revision, self.trust_remote_code)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_backbone(
            self.name_or_path, dtype=self.dtype, device_map=self.device_map,
            attn_implementation=self.attn_implementation, quantization=self.quantization,
            trust_remote_code=self.trust_remote_code, revision=self.revision, max_memory=self.max_memory,
        )  # fmt: skip

    def num_layers(self) -> int:
        """Depth without loading weights (built-ins: from their recipe, so nothing is built or written)."""
        return num_layers(self.config())

    def hidden_size(self) -> int:
        return self.config().get_text_config().hidden_size

    def fingerprint(self) -> dict:
        """What identifies the weights and numerics, for activation-cache keys."""
        return {
            "name_or_path": self.name_or_path,
            "weights": backbone_fingerprint(self.name_or_path, self.revision),
            "dtype": self.dtype,
            "quantization": self.quantization,
        }
