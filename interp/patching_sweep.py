"""Patching sweeps over matched (reasoning, control) prompt pairs, at every (layer, post-instruction token).

- `patching_sweep(...)`: patch the reasoning run's `blocks.{l}.resid_post` at ONE layer and ONE post-instruction
  position into the control run (with `interp.patching.PathPatcher`), for every (layer, position): the fraction
  of a metric's reasoning-control gap recovered, a [n_layers, n_post] heatmap (a ratio of means over pairs with
  Fieller's CI; defined in `interp.patching_stats`, which also holds the metric factories `logit_difference`
  and `target_log_prob`).
- `attribution_patching(...)`: the same heatmap from a first-order (gradient) approximation, one
  forward + backward on the control prompts and one forward on the reasoning prompts per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import capture_residuals, check_layers
from interp.backbone import decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import hooked, site_name
from interp.metrics import last_position_logits
from interp.patching import PathPatcher
from interp.patching_stats import MetricFn, PatchingResult, check_summary_settings, mean_gap_is_cut, summarise
from interp.positions import PositionSpec, position_index, select_positions
from interp.prompts import (
    check_ends_with_template,
    length_sorted_chunks,
    post_instruction_ids,
    tokenize_prompts,
)

_POST = PositionSpec("post_instruction")


def _setup(model, tokenizer, layers):
    layers = check_layers(layers, len(decoder_layers(model)))
    post = post_instruction_ids(tokenizer)
    if not post:
        raise UserError("the chat template puts no tokens after the user's text: nothing to patch")
    return layers, post, [tokenizer.decode([token]) for token in post]


def _pair_batches(model, tokenizer, reasoning, control, batch_size, post) -> Iterator[tuple]:
    """(pair_index [b] long CPU, reasoning batch, control batch); pairs sorted by control length."""
    if len(reasoning) != len(control) or len(reasoning) == 0:
        raise UserError(
            f"need matched reasoning/control pairs; got {len(reasoning)} and {len(control)} prompts"
        )
    control_ids = tokenizer(list(control), add_special_tokens=False)["input_ids"]
    check_ends_with_template(tokenizer(list(reasoning), add_special_tokens=False)["input_ids"], post,
                             "reasoning prompt", texts=reasoning)  # fmt: skip
    check_ends_with_template(control_ids, post, "control prompt", texts=control)
    device = input_device(model)
    for chunk in length_sorted_chunks([len(ids) for ids in control_ids], batch_size):
        r_batch = tokenize_prompts(tokenizer, [reasoning[i] for i in chunk], device=device)
        c_batch = tokenize_prompts(tokenizer, [control[i] for i in chunk], device=device)
        yield torch.tensor(chunk), r_batch, c_batch


def _info(pair_index, batch, run, layer=None, position=None) -> dict:
    """What metric_fn sees besides the logits: which pairs, which run, which patch."""
    return {"pair_index": pair_index, "run": run, "layer": layer, "position": position, **batch}


def _run_metric(model, metric_fn: MetricFn, batch: dict, info: dict, hooks=()) -> torch.Tensor:
    """metric_fn on the float32 last-position logits [batch, vocab] of a full forward under `hooks`: [batch]."""
    with hooked(model, hooks):
        logits = last_position_logits(model, batch["input_ids"], batch["attention_mask"], 1)[:, -1].float()
    value = metric_fn(logits, info)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (logits.shape[0],):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(f"metric_fn must return a tensor [batch] = [{logits.shape[0]}], got {got}")
    return value


def _post_capture(store: dict, layer: int, mask: torch.Tensor, n_post: int):
    def keep(hidden: torch.Tensor) -> None:  # store[layer]: float32 [batch, n_post, d_model]
        store[layer] = select_positions(hidden.detach(), mask, _POST, n_post)

    return keep


def _add_zero_leaf(store: dict, layer: int):
    def add(hidden: torch.Tensor) -> torch.Tensor:  # the gradient w.r.t. the leaf is d metric / d hidden
        store[layer] = torch.zeros_like(hidden, requires_grad=True)
        return hidden + store[layer]

    return add


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
        metric = _run_metric(model, metric_fn, r_batch, _info(pair_index, r_batch, "reasoning"))
        metric_r[pair_index] = metric.double().cpu()
        metric = _run_metric(model, metric_fn, c_batch, _info(pair_index, c_batch, "control"))
        metric_c[pair_index] = metric.double().cpu()
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
                info = _info(pair_index, c_batch, "patched", layer, k)
                with PathPatcher(model, source, [layer], target[:, k : k + 1], mask_c):
                    metric = _run_metric(model, metric_fn, c_batch, info)
                metric_patched[pair_index, i, k] = metric.double().cpu()
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
            metric = _run_metric(model, metric_fn, r_batch, _info(pair_index, r_batch, "reasoning"), hooks)
            metric_r[pair_index] = metric.double().cpu()
        acts_c: dict[int, torch.Tensor] = {}
        deltas: dict[int, torch.Tensor] = {}  # layer -> zero leaf [batch, seq, d_model] added to resid_post
        with torch.enable_grad():
            hooks = []
            for layer in layers:
                hooks += [
                    (site_name(layer), _post_capture(acts_c, layer, mask_c, n_post)),
                    (site_name(layer), _add_zero_leaf(deltas, layer)),
                ]
            metric = _run_metric(model, metric_fn, c_batch, _info(pair_index, c_batch, "control"), hooks)
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
