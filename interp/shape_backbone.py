"""Real-shape backbones with random weights, for measuring speed and memory where no weights can be downloaded.

    load_backbone("shape:qwq-32b", dtype="bfloat16", device_map="cuda")   # QwQ-32B's architecture, random weights
    load_backbone("shape:r1-distill-qwen-32b", device_map="meta")        # no memory at all: for planning placement
    load_backbone("shape:/path/to/dir")                                  # any directory holding a config.json

The architecture is the model's own config.json (shipped in interp/assets for the two named models); the weights are
drawn by the model's own `_init_weights` with seed 0 directly on the target device, in the requested dtype, never
materialized on the CPU first (`torch.device` context). device_map: None / "cpu", "cuda" / "cuda:N", "auto" (the
first GPU if there is one, else the CPU) or "meta". The tokenizer is the real Qwen2.5 BPE with the model's chat
template (the built-in tiny-qwq's / tiny-r1-distill's); a directory with tokenizer files uses its own, one without
uses QwQ's. Activations of such a model mean nothing: its fingerprint ("shape-...") never equals a real model's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from interp.errors import UserError

PREFIX = "shape:"
KNOWN = {"qwq-32b": "tiny-qwq", "r1-distill-qwen-32b": "tiny-r1-distill"}  # asset dir -> built-in with its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def is_shape(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(PREFIX)


def shape_config_dir(name: str) -> Path:
    """The directory holding the config.json of `shape:<model>`; UserError for an unknown model."""
    from interp.backbone import ASSETS

    key = name.removeprefix(PREFIX)
    if key in KNOWN:
        return ASSETS / key
    path = Path(key).expanduser()
    if key and (path / "config.json").is_file():
        return path
    raise UserError(f"unknown shape backbone {name!r}: use {', '.join(PREFIX + k for k in KNOWN)} or "
                    f"shape:<a directory with a config.json>")  # fmt: skip


def shape_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The real tokenizer of the model's family (module docstring)."""
    from interp.backbone import BUILTIN_BACKBONES, _tiny_tokenizer

    directory = shape_config_dir(name)
    key = name.removeprefix(PREFIX)
    if key not in KNOWN and any((directory / f).is_file() for f in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(directory)
    return _tiny_tokenizer(BUILTIN_BACKBONES[KNOWN.get(key, "tiny-qwq")])


def shape_fingerprint(name: str) -> str:
    """'shape-' + a hash of the config.json: never a real model's fingerprint."""
    digest = hashlib.sha256(b"random weights, seed 0\n")
    digest.update((shape_config_dir(name) / "config.json").read_bytes())
    return "shape-" + digest.hexdigest()[:16]


def _device(device_map) -> torch.device:
    if device_map is None or device_map == "cpu":
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, str) and (device_map == "meta" or device_map.split(":")[0] == "cuda"):
        if device_map != "meta" and not torch.cuda.is_available():
            raise UserError(f"backbone device_map {device_map!r}: no CUDA device is visible")
        return torch.device(device_map)
    raise UserError(f"a shape backbone is built on one device: device_map None, 'cpu', 'cuda[:N]', 'auto' or 'meta', "
                    f"not {device_map!r}")  # fmt: skip


def build_shape_model(name: str, dtype: torch.dtype | str | None = None, device_map=None) -> PreTrainedModel:
    """The architecture of `name` with seed-0 random weights on one device (module docstring); eval, frozen.
    dtype: a torch dtype, or None / "auto" = the config's own (bfloat16 for the 32B models)."""
    config = AutoConfig.from_pretrained(shape_config_dir(name))
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = _device(device_map)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False).eval()
