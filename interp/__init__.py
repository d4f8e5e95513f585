"""Plain torch + transformers measurement code (no Lightning): backbones, hooks, positions, activations."""

from interp.activations import capture_residuals, collect_activations
from interp.backbone import BUILTIN_BACKBONES, decoder_layers, load_backbone, load_tokenizer
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.positions import PositionSpec
from interp.prompts import format_chat_prompt, post_instruction_ids

__all__ = [
    "BUILTIN_BACKBONES",
    "PositionSpec",
    "UserError",
    "capture_residuals",
    "collect_activations",
    "decoder_layers",
    "format_chat_prompt",
    "hooked",
    "load_backbone",
    "load_tokenizer",
    "post_instruction_ids",
    "site_name",
]
