"""Ablating whole layers: `LayerAblator` replaces what a layer writes into the residual stream.

A layer's contribution is c_l = resid_post - resid_pre [batch, pos, d_model] (`layer_contributions`). The
ablator replaces it by zero, by role-aligned means over reference prompts, or by what the layer wrote on
reference prompts ("resample"). Role-aligned means: the first real (non-padding) token of a sequence gets
the mean contribution at the first real token of the reference prompts, every later token the mean over the
later tokens. On real Qwen models the first token is an attention sink whose activations are orders of
magnitude larger than the rest: one mean pooled over every position would be dominated by it and would
write that value at every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import check_layers, run_hooked_decoder
from interp.backbone import decoder_layers, input_device
from interp.errors import UserError
from interp.hooks import HookContext, HookFn, site_name
from interp.interventions import _d_model, _OnDevice
from interp.prompts import tokenize_prompts
from interp.token_roles import real_token_index

ABLATION_METHODS = ("zero", "mean", "resample")
FIRST, LATER = 0, 1  # rows of LayerAblator.means[layer]: [2, d_model]


def _reference_batches(
    reference_inputs, tokenizer, batch_size: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches [batch, seq] from a tokenized batch dict or a list of prompts."""
    if isinstance(reference_inputs, Mapping):
        ids = torch.as_tensor(reference_inputs["input_ids"])
        ids = ids[None] if ids.ndim == 1 else ids
        mask = reference_inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return [(ids, mask)]
    prompts = [reference_inputs] if isinstance(reference_inputs, str) else list(reference_inputs)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(
            "reference_inputs must be a tokenized batch {'input_ids', 'attention_mask'} or a list of prompts"
        )
    if tokenizer is None:
        raise UserError(
            "reference prompts given as text need the tokenizer (LayerAblator(..., tokenizer=...))"
        )
    size = batch_size or len(prompts)
    batches = [tokenize_prompts(tokenizer, prompts[i : i + size]) for i in range(0, len(prompts), size)]
    return [(batch["input_ids"], batch["attention_mask"]) for batch in batches]


@torch.no_grad()
def layer_contributions(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """What each layer adds to the residual stream, resid_post - resid_pre: float64 [batch, seq, d_model].

    One forward of the base decoder (left-padding-safe position ids, no cache, no LM head, stops after the
    deepest layer), with whatever other hooks are active at the time. Returned on the CPU.
    """
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    inputs: dict[int, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}

    def store(layer: int):
        return lambda hidden: inputs.__setitem__(layer, hidden)

    def difference(layer: int):
        def fn(hidden: torch.Tensor) -> None:
            out[layer] = (hidden.to(torch.float64) - inputs.pop(layer).to(torch.float64)).cpu()

        return fn

    hooks = [(site_name(layer, "resid_pre"), store(layer)) for layer in layers]
    hooks += [(site_name(layer), difference(layer)) for layer in layers]
    run_hooked_decoder(model, input_ids, attention_mask, hooks, max(layers))
    return out


def role_means(
    model: PreTrainedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], list[int]]:
    """Role-aligned mean contributions: ({layer: float64 [2, d_model]}, [n_first, n_later]).

    Row FIRST is the mean of c_l over the first real token of every reference row, row LATER the mean over
    all its other real tokens (padding excluded; left or right padded). A row with no token of a role is NaN.
    """
    d_model = _d_model(model)
    sums = {layer: torch.zeros(2, d_model, dtype=torch.float64) for layer in layers}
    counts = torch.zeros(2, dtype=torch.float64)
    for ids, mask in batches:
        contributions = layer_contributions(model, ids, mask, layers)
        index = real_token_index({"input_ids": ids, "attention_mask": mask})  # [batch, seq], -1 at padding
        roles = torch.stack([index == 0, index > 0]).to(torch.float64)  # [2, batch, seq]
        for layer in layers:
            sums[layer] = sums[layer] + torch.einsum("rbs,bsd->rd", roles, contributions[layer])
        counts = counts + roles.sum((1, 2))
    return {layer: sums[layer] / counts[:, None] for layer in layers}, [int(n) for n in counts]


class LayerAblator(HookContext):
    """Replace the contribution c_l = resid_post - resid_pre of chosen layers while the `with` block runs.

    ablation_method:
        "zero":     c_l <- 0, i.e. resid_post = resid_pre exactly (the layer is skipped; same as deleting it
                    from the layer stack).
        "mean":     role-aligned means (see the module docstring): at the first real token of each row
                    c_l <- m_first, at every later real token c_l <- m_later, where m_first / m_later are
                    the float64 means of c_l over the first / the later real tokens of the reference prompts
                    (`self.means[l]`, [2, d_model]: row FIRST = 0, row LATER = 1; `self.counts` = the
                    numbers of tokens averaged). "First" is read from the ablated forward's attention mask
                    (the first 1 of each row; column 0 without a mask); KV-cached decoding steps hold only
                    later tokens. Padding positions get m_later (they are masked out of attention).
        "resample": c_l[i, j] <- the contribution the layer wrote at row i, column j of the reference batch
                    (`self.contributions[l]`, [n_ref, seq, d_model]). Rows are paired by index and columns by
                    position in the left-padded batches, i.e. aligned at the last token: column j of both is
                    the same number of tokens before the end. The ablated forward must therefore have the
                    reference batch's shape [n_ref, seq] (single forwards, not KV-cached decoding steps), and
                    every real token of row i must face a real token of reference row i (the reference prompt
                    is at least as long). To resample from other prompts of the same batch, pass the batch
                    with its rows permuted, e.g. `tokenize_prompts(tokenizer, prompts[1:] + prompts[:1])`.
    reference_inputs: a tokenized batch {"input_ids", "attention_mask"} ([batch, seq]) or a list of prompt
        strings (then pass `tokenizer`; "mean" tokenizes them in batches of `batch_size`, "resample" as one
        left-padded batch). Reference contributions are computed once, here, from a run with the hooks that
        are active at construction time (normally none: the clean model).
    Hooks of the outer `with` block run first: put an ablator outside a handler whose edits must survive it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layer_indices: int | Sequence[int],
        ablation_method: str = "zero",
        reference_inputs=None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 8,
    ):
        if ablation_method not in ABLATION_METHODS:
            raise UserError(
                f"unknown ablation_method {ablation_method!r}; expected one of {', '.join(ABLATION_METHODS)}"
            )
        layer_indices = [layer_indices] if isinstance(layer_indices, int) else layer_indices
        self.model, self.method = model, ablation_method
        self.layers = check_layers(layer_indices, len(decoder_layers(model)))
        self._replacements: dict[int, _OnDevice] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._first: torch.Tensor | None = None  # "mean": [batch, seq] bool, first real token of the forward
        self.reference_mask: torch.Tensor | None = None
        if ablation_method == "zero":
            if reference_inputs is not None:
                raise UserError("reference_inputs are only used by ablation_method 'mean' and 'resample'")
            return
        if reference_inputs is None:
            raise UserError(
                f"ablation_method {ablation_method!r} needs reference_inputs (prompts or a tokenized batch)"
            )
        if ablation_method == "mean":
            batches = _reference_batches(reference_inputs, tokenizer, batch_size)
            self.means, self.counts = role_means(model, batches, self.layers)
            if self.counts[FIRST] == 0:
                raise UserError("reference_inputs hold no real tokens (the attention mask is all zeros)")
            # A role without reference tokens (NaN row) is never used at a real token (`_observe_roles` raises);
            # padding gets 0 then, as NaN would leak through zero attention weights.
            self._replacements = {
                layer: _OnDevice(self.means[layer].nan_to_num(0.0).to(torch.float32)) for layer in self.layers
            }
        else:
            [(ids, mask)] = _reference_batches(reference_inputs, tokenizer, None)
            contributions = layer_contributions(model, ids, mask, self.layers)
            self.contributions = {layer: contributions[layer].to(torch.float32) for layer in self.layers}
            self.reference_mask = mask.bool().cpu()  # [n_ref, seq]
            self._replacements = {layer: _OnDevice(self.contributions[layer]) for layer in self.layers}

    def _check_resample_batch(self, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        shape, expected = tuple(tokens.shape[:2]), tuple(self.reference_mask.shape)
        if shape != expected:
            raise UserError(
                f"resample ablation: the forward has {shape[0]} x {shape[1]} tokens but the reference batch "
                f"{expected[0]} x {expected[1]}; rows and (left-padded) columns are paired: shapes must match"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            uncovered = mask.bool().cpu() & ~self.reference_mask
            if bool(uncovered.any()):
                row = int(uncovered.any(-1).nonzero()[0, 0])
                raise UserError(
                    f"resample ablation: reference prompt {row} is shorter than the prompt in row {row}"
                )

    def _observe_roles(self, kwargs: dict) -> None:
        index = real_token_index(kwargs)  # [batch, seq], -1 at padding
        self._first = index == 0
        if self.counts[LATER] == 0 and bool((index > 0).any()):
            raise UserError(
                "mean ablation: the reference prompts have no token after the first, so there is no mean "
                "for later positions (use longer reference prompts)"
            )

    def _store(self, layer: int):
        return lambda hidden: self._inputs.__setitem__(layer, hidden)

    def _replace(self, layer: int):
        def fn(hidden: torch.Tensor) -> torch.Tensor:
            resid_pre = self._inputs.pop(layer)
            if self.method == "zero":
                return resid_pre
            replacement = self._replacements[layer].on(hidden.device)  # [2, d_model] or [batch, seq, d_model]
            if self.method == "mean":  # [batch, seq, d_model]: m_first at first tokens, m_later elsewhere
                first = self._first.to(hidden.device)[..., None]
                replacement = torch.where(first, replacement[FIRST], replacement[LATER])
            return (resid_pre.to(torch.float32) + replacement).to(hidden.dtype)

        return fn

    def hooks(self) -> list[tuple[str, HookFn]]:
        """The (site, fn) pairs this ablator registers: store resid_pre, then replace resid_post."""
        hooks = [(site_name(layer, "resid_pre"), self._store(layer)) for layer in self.layers]
        return hooks + [(site_name(layer), self._replace(layer)) for layer in self.layers]

    def observe_inputs(self):
        return {"resample": self._check_resample_batch, "mean": self._observe_roles}.get(self.method)

    def _on_exit(self) -> None:
        self._inputs.clear()
        self._first = None
