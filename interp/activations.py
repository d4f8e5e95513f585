"""Reading the residual stream at chosen layers and positions, with early exit and no unembedding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.backbone import base_decoder, decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import hooked, run_until, site_name
from interp.positions import PositionSpec, padded_position_ids, select_positions
from interp.prompts import (
    check_ends_with_template,
    length_sorted_chunks,
    post_instruction_ids,
    tokenize_prompts,
)


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """None -> all layers; otherwise sorted unique indices, each checked against the model's depth."""
    if layers is None:
        return list(range(n_layers))
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise UserError(f"layers {bad or '[]'} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layers


def run_hooked_decoder(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hooks: Sequence,
    deepest_layer: int,
) -> None:
    """One forward of the decoder stack (no LM head) with `hooks`, stopping after `deepest_layer`.

    input_ids / attention_mask: [batch, seq], left or right padded (position_ids follow the mask).
    """
    stop = deepest_layer if deepest_layer < len(decoder_layers(model)) - 1 else None
    with hooked(model, hooks, stop_after_layer=stop):
        run_until(
            lambda: base_decoder(model)(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=padded_position_ids(attention_mask),
                use_cache=False,
            )
        )


@torch.inference_mode()
def capture_residuals(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    positions: PositionSpec,
    post_instruction: Sequence[int] | None = None,
) -> torch.Tensor:
    """Residual stream `blocks.{l}.resid_post` for one tokenized batch.

    Args:
        input_ids, attention_mask: [batch, seq], left or right padded.
        layers: sorted layer indices; the forward stops after the deepest one and never runs the LM head.
        positions: which tokens; "post_instruction" needs `post_instruction` (the template's suffix ids),
            which every prompt must end with.
    Returns:
        float32 [batch, n_pos, n_layers, d_model] on the CPU.
    """
    n_post = None
    if positions.kind == "post_instruction":
        n_post = positions.num_positions(len(post_instruction or ()))  # raises when the template adds none
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]  # padding removed
        check_ends_with_template(rows, post_instruction, "prompt read at positions 'post_instruction'")
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            captured[layer] = select_positions(hidden, attention_mask, positions, n_post)

        return fn

    hooks = [(site_name(layer), capture(layer)) for layer in layers]
    run_hooked_decoder(model, input_ids, attention_mask, hooks, max(layers))
    return torch.stack([captured[layer].cpu() for layer in layers], dim=2)


def collect_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: str | PositionSpec = "last",
    batch_size: int = 8,
) -> torch.Tensor:
    """Residual stream at `blocks.{l}.resid_post` for every prompt.

    Prompts are tokenized as given (no BOS added: format them with `format_chat_prompt` for chat models).
    Batches are built from prompts of similar length (less padding); the output keeps the input order.

    Returns:
        float32 on the CPU: [n_prompts, n_layers, d_model] for one-vector specs ("last", "mean"), else
        [n_prompts, n_pos, n_layers, d_model] ("last_k", "post_instruction").
    """
    if len(prompts) == 0:
        raise UserError("collect_activations got no prompts")
    spec = PositionSpec.parse(positions)
    layers = check_layers(layers, len(decoder_layers(model)))
    post = post_instruction_ids(tokenizer) if spec.kind == "post_instruction" else None
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    out: torch.Tensor | None = None
    for chunk in length_sorted_chunks(lengths, batch_size):
        batch = tokenize_prompts(tokenizer, [prompts[i] for i in chunk])
        acts = capture_residuals(model, batch["input_ids"], batch["attention_mask"], layers, spec, post)
        if out is None:
            out = torch.empty((len(prompts), *acts.shape[1:]), dtype=torch.float32)
        out[chunk] = acts
    return out[:, 0] if spec.is_single else out
