"""Activation patching: run a target batch with some residual-stream values taken from a source run.

- `capture_sites(model, input_ids, attention_mask, layers, positions)`: `blocks.{l}.resid_post` of a run, as
  `{layer: [batch, pos, d_model]}` float32 on the CPU, the form `PathPatcher` takes.
- `PathPatcher(model, source, layers, positions, attention_mask=...)`: a context manager (built on
  `interp.hooks.hooked`) that replaces `blocks.{l}.resid_post` at the given positions with the source values.
- `patching_sweep(...)`: for matched (reasoning, control) prompt pairs, patch the reasoning run's value at ONE
  layer and ONE post-instruction position into the control run, for every (layer, position): the fraction of
  a metric's reasoning-control gap recovered, a [n_layers, n_post] heatmap (a ratio of means over pairs with
  Fieller's CI; defined in `interp.patching_stats`, which also holds the metric factories).
- `attribution_patching(...)`: the same heatmap from a first-order (gradient) approximation, one
  forward + backward on the control prompts and one forward on the reasoning prompts per batch.

Positions of a left-padded batch are resolved only through `interp.positions` on the TARGET batch's
attention mask, so a source captured from differently padded prompts lands on the same roles (e.g. "the
last token", "the k-th post-instruction token").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import capture_residuals, check_layers, run_hooked_decoder
from interp.backbone import decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, hooked, site_name
from interp.metrics import last_position_logits
from interp.patching_stats import (  # noqa: F401  (the metric factories are part of this module's API)
    MetricFn,
    PatchingResult,
    check_summary_settings,
    logit_difference,
    mean_gap_is_cut,
    summarise,
    target_log_prob,
)
from interp.positions import PositionSpec, position_index, select_positions
from interp.prompts import post_instruction_ids, tokenize_prompts

_POST = PositionSpec("post_instruction")


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


# --------------------------------------------------------------------------------------------- sweeps


def _check_ends_with_template(batch: dict, post: list[int], which: str) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = len(post)
    ok = 0 < n <= ids.shape[1] and bool(mask[:, -1].all())
    ok = ok and bool((ids[:, -n:] == torch.tensor(post, device=ids.device)).all())
    if not ok:
        raise UserError(
            f"every {which} prompt must end with the chat template's post-instruction tokens "
            "(format it with interp.format_chat_prompt)"
        )


def _pair_batches(model, tokenizer, reasoning, control, batch_size, post) -> Iterator[tuple]:
    """(pair_index [b] long CPU, reasoning batch, control batch); pairs sorted by control length."""
    if len(reasoning) != len(control) or len(reasoning) == 0:
        raise UserError(
            f"need matched reasoning/control pairs; got {len(reasoning)} and {len(control)} prompts"
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(list(control), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(control)), key=lambda i: lengths[i])
    device = input_device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        r_batch = tokenize_prompts(tokenizer, [reasoning[i] for i in chunk], device=device)
        c_batch = tokenize_prompts(tokenizer, [control[i] for i in chunk], device=device)
        _check_ends_with_template(r_batch, post, "reasoning")
        _check_ends_with_template(c_batch, post, "control")
        yield torch.tensor(chunk), r_batch, c_batch


def _last_logits(model, batch: dict, hooks=()) -> torch.Tensor:
    """Full forward of a left-padded batch under `hooks`; float32 logits at the last position [batch, vocab]."""
    with hooked(model, hooks):
        return last_position_logits(model, batch["input_ids"], batch["attention_mask"], 1)[:, -1].float()


def _metric(metric_fn: MetricFn, logits: torch.Tensor, info: dict) -> torch.Tensor:
    value = metric_fn(logits, info)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (logits.shape[0],):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(f"metric_fn must return a tensor [batch] = [{logits.shape[0]}], got {got}")
    return value


def _info(pair_index, batch, run, layer=None, position=None) -> dict:
    """What metric_fn sees besides the logits: which pairs, which run, which patch."""
    return {"pair_index": pair_index, "run": run, "layer": layer, "position": position, **batch}


def _post_capture(store: dict, layer: int, mask: torch.Tensor, n_post: int):
    def keep(hidden: torch.Tensor) -> None:  # store[layer]: float32 [batch, n_post, d_model]
        store[layer] = select_positions(hidden.detach(), mask, _POST, n_post)

    return keep


def _add_zero_leaf(store: dict, layer: int):
    def add(hidden: torch.Tensor) -> torch.Tensor:  # the gradient w.r.t. the leaf is d metric / d hidden
        store[layer] = torch.zeros_like(hidden, requires_grad=True)
        return hidden + store[layer]

    return add


def _setup(model, tokenizer, layers):
    layers = check_layers(layers, len(decoder_layers(model)))
    post = post_instruction_ids(tokenizer)
    if not post:
        raise UserError("the chat template puts no tokens after the user's text: nothing to patch")
    return layers, post, [tokenizer.decode([token]) for token in post]


@torch.no_grad()
def patching_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reasoning_prompts: Sequence[str],
    control_prompts: Sequence[str],
    metric_fn: MetricFn,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    rel_tol: float = 0.1,
    alpha: float = 0.05,
) -> PatchingResult:
    """Exact activation patching, reasoning -> control, at every (layer, post-instruction position).

    Pair i is (reasoning_prompts[i], control_prompts[i]), both chat-formatted (ending with the template's
    post-instruction tokens). Position k is the k-th of those tokens in both prompts (aligned by role).
    metric_fn(logits_last [batch, vocab] float32, batch_info) -> [batch]; batch_info holds "pair_index" [batch]
    (indices into the prompt lists), "run" ("reasoning" | "control" | "patched"), "layer", "position" (k)
    and the batch's "input_ids" / "attention_mask".

    The result (`interp.patching_stats.PatchingResult`): recovered[l, k] = (mean_i patched - mean_i control) /
    (mean_i reasoning - mean_i control) over all pairs, NaN with a `cut_reason` when |mean gap| <= rel_tol *
    mean_i |reasoning_i - control_i|; Fieller's level 1 - alpha CI for the ratio of the paired means (NaN, with a
    `ci_reason`, for < 2 pairs or when the mean gap is not significantly non-zero at level alpha).

    Cost: 2 forwards per batch for the unpatched metrics, then (unless the mean gap is cut, which leaves
    metric_patched NaN) 1 reasoning forward + n_layers x n_post patched forwards per batch (full forwards,
    LM head at the last position only).
    """
    check_summary_settings(rel_tol, alpha)
    layers, post, post_tokens = _setup(model, tokenizer, layers)
    n_post, n_pairs = len(post), len(control_prompts)
    metric_r = torch.zeros(n_pairs, dtype=torch.float64)
    metric_c = torch.zeros(n_pairs, dtype=torch.float64)
    for pair_index, r_batch, c_batch in _pair_batches(
        model, tokenizer, reasoning_prompts, control_prompts, batch_size, post
    ):
        logits = _last_logits(model, r_batch)
        metric_r[pair_index] = (
            _metric(metric_fn, logits, _info(pair_index, r_batch, "reasoning")).double().cpu()
        )
        logits = _last_logits(model, c_batch)
        metric_c[pair_index] = (
            _metric(metric_fn, logits, _info(pair_index, c_batch, "control")).double().cpu()
        )
    metric_patched = torch.full((n_pairs, len(layers), n_post), float("nan"), dtype=torch.float64)
    summary = dict(layers=layers, post_tokens=post_tokens, rel_tol=rel_tol, alpha=alpha)
    if mean_gap_is_cut(metric_r, metric_c, rel_tol):  # every cell would be NaN: skip the patched forwards
        return summarise("exact", metric_r, metric_c, metric_patched, **summary)
    for pair_index, r_batch, c_batch in _pair_batches(
        model, tokenizer, reasoning_prompts, control_prompts, batch_size, post
    ):
        # [batch, n_post, n_layers, d_model]: the reasoning run at its post-instruction tokens (early exit)
        acts = capture_residuals(model, r_batch["input_ids"], r_batch["attention_mask"], layers, _POST, post)
        mask_c = c_batch["attention_mask"]
        target = position_index(_POST, mask_c, n_post)  # [batch, n_post] the same roles in the control batch
        for i, layer in enumerate(layers):
            for k in range(n_post):
                source = {layer: acts[:, k : k + 1, i]}  # [batch, 1, d_model]
                with PathPatcher(model, source, [layer], target[:, k : k + 1], mask_c):
                    logits = _last_logits(model, c_batch)
                info = _info(pair_index, c_batch, "patched", layer, k)
                metric_patched[pair_index, i, k] = _metric(metric_fn, logits, info).double().cpu()
    return summarise("exact", metric_r, metric_c, metric_patched, **summary)


def attribution_patching(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reasoning_prompts: Sequence[str],
    control_prompts: Sequence[str],
    metric_fn: MetricFn,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    rel_tol: float = 0.1,
    alpha: float = 0.05,
) -> PatchingResult:
    """Attribution patching: the first-order estimate of `patching_sweep`, same arguments and result.

    metric_patched[i, l, k] ~ metric_control + (a_reasoning - a_control) . d metric / d a, with a the
    `blocks.{l}.resid_post` value at post-instruction token k and the gradient taken on the control run.
    The gradient is the total derivative (through every later layer): each layer's output gets a zero
    "delta" leaf added by a hook and the gradients land on those; the backbone's weights stay frozen.
    Per batch: one forward on the reasoning prompts, one forward + backward on the control prompts (the
    backward keeps every layer's activations of the batch: lower batch_size for large models).
    metric_fn must be differentiable in the logits. The estimate is exact when the metric is linear in the
    patched value (e.g. the last layer without a final norm) and degrades as patches move further.
    recovered, its cutoff and its Fieller CI are computed from these estimates exactly as in
    `patching_sweep` (a ratio of means normalised by the mean reasoning - control gap).
    """
    check_summary_settings(rel_tol, alpha)
    layers, post, post_tokens = _setup(model, tokenizer, layers)
    n_post, n_pairs = len(post), len(control_prompts)
    metric_r = torch.zeros(n_pairs, dtype=torch.float64)
    metric_c = torch.zeros(n_pairs, dtype=torch.float64)
    metric_patched = torch.zeros((n_pairs, len(layers), n_post), dtype=torch.float64)
    for pair_index, r_batch, c_batch in _pair_batches(
        model, tokenizer, reasoning_prompts, control_prompts, batch_size, post
    ):
        mask_r, mask_c = r_batch["attention_mask"], c_batch["attention_mask"]
        acts_r: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            hooks = [(site_name(layer), _post_capture(acts_r, layer, mask_r, n_post)) for layer in layers]
            logits = _last_logits(model, r_batch, hooks)
            metric_r[pair_index] = (
                _metric(metric_fn, logits, _info(pair_index, r_batch, "reasoning")).double().cpu()
            )
        acts_c: dict[int, torch.Tensor] = {}
        deltas: dict[int, torch.Tensor] = {}  # layer -> zero leaf [batch, seq, d_model] added to resid_post
        with torch.enable_grad():
            hooks = []
            for layer in layers:
                hooks += [
                    (site_name(layer), _post_capture(acts_c, layer, mask_c, n_post)),
                    (site_name(layer), _add_zero_leaf(deltas, layer)),
                ]
            logits = _last_logits(model, c_batch, hooks)
            metric = _metric(metric_fn, logits, _info(pair_index, c_batch, "control"))
            if not metric.requires_grad:
                raise UserError("attribution_patching needs a metric_fn that is differentiable in the logits")
            grads = torch.autograd.grad(metric.sum(), [deltas[layer] for layer in layers], allow_unused=True)
        metric_c[pair_index] = metric.detach().double().cpu()
        for i, (layer, grad) in enumerate(zip(layers, grads)):
            if grad is None:
                continue  # the metric does not depend on this layer: estimate 0
            grad = select_positions(grad, mask_c, _POST, n_post).double()  # [batch, n_post, d_model]
            diff = acts_r[layer].double() - acts_c[layer].double()
            metric_patched[pair_index, i] = (diff * grad).sum(-1).cpu()  # [batch, n_post]
    metric_patched = metric_patched + metric_c[:, None, None]
    summary = dict(layers=layers, post_tokens=post_tokens, rel_tol=rel_tol, alpha=alpha)
    return summarise("attribution", metric_r, metric_c, metric_patched, **summary)
