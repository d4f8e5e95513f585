"""Activation patching: run a target batch with some residual-stream values taken from a source run.

- `capture_sites(model, input_ids, attention_mask, layers, positions)`: `blocks.{l}.resid_post` of a run, as
  `{layer: [batch, pos, d_model]}` float32 on the CPU, the form `PathPatcher` takes.
- `PathPatcher(model, source, layers, positions, attention_mask=...)`: a context manager (built on
  `interp.hooks.hooked`) that replaces `blocks.{l}.resid_post` at the given positions with the source values.
The sweeps over prompt pairs built on these (`patching_sweep`, `attribution_patching`) are in
`interp.patching_sweep`.

Positions of a left-padded batch are resolved only through `interp.positions` on the TARGET batch's
attention mask, so a source captured from differently padded prompts lands on the same roles (e.g. "the
last token", "the k-th post-instruction token").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from interp.activations import capture_residuals, check_layers, run_hooked_decoder
from interp.backbone import decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, site_name
from interp.positions import PositionSpec, position_index

# --------------------------------------------------------------------------------------------- positions


def _token_spec(positions) -> PositionSpec:
    spec = PositionSpec.parse(positions)
    if spec.kind == "mean":
        raise UserError(
            "positions 'mean' name no token to patch; use 'last', 'last_<k>' or 'post_instruction'"
        )
    return spec


def resolve_positions(
    positions, attention_mask: torch.Tensor, n_source_positions: int | None = None
) -> torch.Tensor:
    """Token indices [batch, n_pos] (long, on the mask's device), each checked to lie on a real prompt token.

    positions: a spec ("last", "last_k", "post_instruction"; resolved with `position_index` on this mask;
    "post_instruction" takes its length from `n_source_positions`) or explicit indices [batch, n_pos] / [n_pos].
    """
    batch, seq = attention_mask.shape
    if isinstance(positions, torch.Tensor):
        index = positions.to(attention_mask.device).long()
        if index.dim() == 1:
            index = index[None].expand(batch, -1)
        if index.dim() != 2 or index.shape[0] != batch or index.shape[1] == 0:
            raise UserError(
                f"position indices of shape {tuple(positions.shape)}; expected [{batch}, n_pos] or [n_pos]"
            )
    else:
        index = position_index(_token_spec(positions), attention_mask, n_source_positions)
    outside = (index < 0) | (index >= seq)
    if bool(outside.any()):
        raise UserError(f"position {int(index[outside][0])} is outside the prompt (sequence length {seq})")
    on_padding = ~attention_mask.gather(1, index).bool()
    if bool(on_padding.any()):
        row = int(on_padding.any(1).nonzero()[0])
        raise UserError(
            f"position {int(index[on_padding][0])} of prompt {row} is padding, outside the prompt"
        )
    if index.shape[1] > 1 and bool((index.sort(-1).values.diff(dim=-1) == 0).any()):
        raise UserError("positions repeat a token index within a prompt")
    return index


# --------------------------------------------------------------------------------------------- capture


@torch.inference_mode()
def _capture_every_position(model, input_ids, attention_mask, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: float32 [batch, seq, d_model] on the CPU}; stops after the deepest layer, no LM head."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        return lambda hidden: captured.__setitem__(layer, hidden.to(torch.float32).cpu())

    run_hooked_decoder(model, input_ids, attention_mask, [(site_name(layer), keep(layer)) for layer in layers], max(layers))
    return captured


def capture_sites(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None,
    positions=None,
    post_instruction: Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """`blocks.{l}.resid_post` of one batch, ready to hand to `PathPatcher`.

    Args:
        input_ids, attention_mask: [batch, seq] (left padded as `tokenize_prompts` makes them).
        layers: layer indices (None = all).
        positions: None = every position; a spec "last" | "last_k" | "post_instruction" (the latter needs
            `post_instruction`, the template's suffix ids); or token indices [batch, n_pos] / [n_pos].
    Returns:
        {layer: float32 [batch, seq, d_model]} for positions=None, else {layer: float32 [batch, n_pos, d_model]};
        CPU tensors (PathPatcher moves them to the hidden state's device and dtype).
    """
    layers = check_layers(layers, len(decoder_layers(model)))
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if positions is None or isinstance(positions, torch.Tensor):
        full = _capture_every_position(model, input_ids, attention_mask, layers)
        if positions is None:
            return full
        index = resolve_positions(positions, attention_mask).cpu()[:, :, None]  # [batch, n_pos, 1]
        return {layer: full[layer].gather(1, index.expand(-1, -1, full[layer].shape[-1])) for layer in layers}
    acts = capture_residuals(
        model, input_ids, attention_mask, layers, _token_spec(positions), post_instruction
    )
    return {
        layer: acts[:, :, i].contiguous() for i, layer in enumerate(layers)
    }  # acts: [batch, n_pos, n_layers, d]


# --------------------------------------------------------------------------------------------- patcher


class PathPatcher(HookContext):
    """While active, every forward of `model` sees `blocks.{l}.resid_post` replaced by the source's values.

    Args:
        model: the backbone (any `interp.load_backbone` model).
        source_activations: {layer: [batch, seq, d_model]} with positions=None (every position of a target
            batch of the same shape), or {layer: [batch, n_pos, d_model]} holding the values for the given
            positions in order (e.g. from `capture_sites`). Cast to the hidden state's dtype and device.
        layer_indices: layers to patch (None = every key of source_activations).
        positions: None | spec ("last", "last_k", "post_instruction") | token indices [batch, n_pos] or [n_pos].
            A spec is resolved on the TARGET batch's attention mask, so left padding is handled.
        attention_mask: the target batch's mask [batch, seq]; required whenever positions is given.

    Generation: the patch applies to the prompt only. With a KV cache (`generate`) the prefill forward is
    patched and the later, shorter decoding steps run unpatched (they read the patched prompt through the
    cache); without a cache, each longer re-run of prompt + generated tokens gets the prompt positions patched.
    A first forward of another length raises UserError. Hooks are removed on exit, also on errors.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        source_activations: dict[int, torch.Tensor],
        layer_indices: Sequence[int] | None = None,
        positions=None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        wanted = list(source_activations) if layer_indices is None else list(layer_indices)
        self.layers = check_layers(wanted, len(decoder_layers(model)))
        missing = [layer for layer in self.layers if layer not in source_activations]
        if missing:
            raise UserError(f"PathPatcher: no source activations for layers {missing}")
        d_model = model.config.get_text_config().hidden_size
        self.source = {layer: source_activations[layer] for layer in self.layers}
        shape = tuple(self.source[self.layers[0]].shape)
        for layer, values in self.source.items():
            if values.dim() != 3 or values.shape[-1] != d_model or tuple(values.shape) != shape:
                raise UserError(
                    f"source activations for layer {layer} have shape {tuple(values.shape)}; expected "
                    f"[batch, pos, {d_model}], the same for every layer"
                )
        if positions is None:
            if attention_mask is not None and tuple(attention_mask.shape) != shape[:2]:
                raise UserError(
                    f"source activations cover {shape[:2]} (batch, positions) but the target attention_mask "
                    f"is {tuple(attention_mask.shape)}; give positions to patch only some tokens"
                )
            self.seq = shape[1]
            self.index = torch.arange(shape[1]).expand(shape[0], -1)  # [batch, seq]: every position
        else:
            if attention_mask is None:
                raise UserError("PathPatcher with positions needs the target batch's attention_mask")
            self.seq = attention_mask.shape[1]
            self.index = resolve_positions(positions, attention_mask, shape[1])  # [batch, n_pos]
            if tuple(self.index.shape) != shape[:2]:
                raise UserError(
                    f"source activations hold {shape[1]} positions for {shape[0]} prompts; positions {positions!r} "
                    f"select {self.index.shape[1]} for {self.index.shape[0]}"
                )
        self._patched: set[int] = set()  # layers patched since __enter__

    def _hook(self, layer: int):
        source = self.source[layer]

        def patch(hidden: torch.Tensor) -> torch.Tensor | None:  # hidden: [batch, seq, d_model]
            seq = hidden.shape[1]
            if seq < self.seq and layer in self._patched:
                return None  # a decoding step with a KV cache, after the patched prefill
            if seq < self.seq or (seq > self.seq and layer not in self._patched):
                raise UserError(f"PathPatcher: the target batch has {seq} positions, expected {self.seq}")
            if hidden.shape[0] != source.shape[0]:
                raise UserError(
                    f"PathPatcher: the target batch has {hidden.shape[0]} prompts, the source {source.shape[0]}"
                )
            self._patched.add(layer)
            values = source.to(device=hidden.device, dtype=hidden.dtype)
            index = self.index.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
            return hidden.scatter(1, index, values)  # out of place; index < self.seq <= seq

        return patch

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(site_name(layer), self._hook(layer)) for layer in self.layers]

    def _on_enter(self) -> None:
        self._patched = set()
