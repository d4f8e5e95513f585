"""The logit lens: read any layer's residual stream through the model's own final norm and unembedding.

`LogitLens(model, tokenizer)` finds the final norm structurally (the last normalisation module that is a
direct child of the base model: `norm` in Qwen2 / Llama, `ln_f` in GPT-2) and the unembedding
(`model.get_output_embeddings()`), then
    logits(resid [..., d_model])                        -> [..., vocab] float32
    decode_layer_activations(acts [(batch,) n_layers, d_model], k) -> top-k ids / probs / strings per layer
                                                           (`lens_top_k` with any lens's one-layer readout)
    target_rank_and_prob(acts, target_token_id)         -> rank (0 = top) and probability per layer
                                                           (`rank_and_prob` on any lens's logits)
    last_position_logits(prompts, layers)               -> [n_prompts, n_layers, vocab] at the last token
Applied to the last layer's `blocks.{L-1}.resid_post` (before the final norm) the lens gives the model's
own logits exactly. Per-layer loops keep memory at one [..., vocab] block at a time. `LensReadout` is that
readout (final norm + unembedding) as a module of its own.

`TunedLens` (Belrose et al. 2023) puts a trained affine translator per layer (`AffineTranslators`) in front of
the same readout and measures KL(model's final distribution || lens) per layer; `lightning_modules/tuned_lens.py`
trains it on an activation cache. Both lenses read one layer with `layer_logits(resid [batch, d_model], slot)`
(the logit lens ignores the slot), which is what `interp.lens_depth` uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.activations import collect_activations
from interp.backbone import base_decoder
from interp.errors import UserError


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The normalisation applied after the last decoder layer: the base model's last direct child that is a
    norm module (LayerNorm / RMSNorm / a class named *Norm*), e.g. Qwen2Model.norm or GPT2Model.ln_f."""
    base = base_decoder(model)
    norms = [module for module in base.children() if _is_norm(module)]
    if not norms:
        raise UserError(
            f"cannot find the final norm of {type(base).__name__} (no norm module among its children)"
        )
    return norms[-1]


def rank_and_prob(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top; ties count in the target's favour) and probability of target [...] under logits
    [..., vocab]: (long [...], float32 [...]) on the CPU."""
    index = target.to(logits.device).long()[..., None]
    ranks = (logits > logits.gather(-1, index)).sum(-1)
    probs = logits.float().log_softmax(-1).gather(-1, index)[..., 0].exp()
    return ranks.cpu(), probs.cpu()


@dataclass
class LensTopK:
    """Top-k lens readout per layer; `...` is the batch axis when the activations had one."""

    ids: torch.Tensor  # [..., n_layers, k] long
    probs: torch.Tensor  # [..., n_layers, k] float32, softmax over the whole vocabulary
    tokens: list  # decoded strings, nested like ids: [n_layers][k] or [batch][n_layers][k]


@torch.no_grad()
def lens_top_k(layer_logits, acts: torch.Tensor, k: int, tokenizer: PreTrainedTokenizerBase) -> LensTopK:
    """The k most probable tokens of a lens at every layer: `layer_logits(resid [..., d_model], slot)` -> [..., vocab]
    is a lens's one-layer readout (`LogitLens.layer_logits`, `TunedLens.layer_logits`); acts [(batch,) n_layers,
    d_model] with slot = index into its layers. Probabilities are the softmax over the whole vocabulary."""
    ids, probs = [], []
    for slot in range(acts.shape[-2]):
        logits = layer_logits(acts[..., slot, :], slot)
        if not 1 <= k <= logits.shape[-1]:
            raise UserError(f"k must be between 1 and the vocabulary size {logits.shape[-1]}, got {k}")
        top = logits.softmax(-1).topk(k, dim=-1)  # [..., k]
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    ids_t, probs_t = torch.stack(ids, dim=-2), torch.stack(probs, dim=-2)  # [..., n_layers, k]

    def decode(rows: list) -> list:  # nested lists of ids -> the same nesting of strings
        if rows and isinstance(rows[0], list):
            return [decode(row) for row in rows]
        return [tokenizer.decode([token]) for token in rows]

    return LensTopK(ids_t, probs_t, decode(ids_t.tolist()))


class LensReadout(nn.Module):
    """The model's final norm + unembedding and nothing else: [..., d_model] -> [..., vocab] float32 logits.

    Holding only these two modules lets a lens keep its readout while the rest of the backbone is freed.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.norm = final_norm(model)
        self.unembed = model.get_output_embeddings()
        if self.unembed is None:
            raise UserError(
                f"{type(model).__name__} has no output embedding (LM head) to read the lens through"
            )

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits on the LM head's device; inputs are moved to the norm's device and the LM head's dtype.

        Differentiable (no no_grad here), so lenses trained on top of it can backpropagate.
        """
        weight = self.unembed.weight
        norm_param = next(self.norm.parameters(), weight)
        hidden = self.norm(resid.to(device=norm_param.device, dtype=weight.dtype))
        return self.unembed(hidden.to(weight.device)).float()


class LogitLens:
    """The model's final norm + unembedding applied to any layer's residual stream (weights untouched)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.readout = LensReadout(model)
        self.norm, self.unembed = self.readout.norm, self.readout.unembed

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """[..., d_model] residual stream -> [..., vocab] float32 logits (on the LM head's device)."""
        return self.readout(resid)

    def layer_logits(self, resid: torch.Tensor, slot: int | None = None) -> torch.Tensor:
        """One layer's readout, [batch, d_model] -> [batch, vocab]: the same at every layer (`slot` unused)."""
        return self.readout(resid)

    def _check(self, acts: torch.Tensor) -> None:
        d_model = self.model.config.get_text_config().hidden_size
        if acts.dim() not in (2, 3) or acts.shape[-1] != d_model:
            raise UserError(
                f"lens activations must be [n_layers, {d_model}] or [batch, n_layers, {d_model}]; "
                f"got {tuple(acts.shape)}"
            )

    def decode_layer_activations(self, acts: torch.Tensor, k: int = 5) -> LensTopK:
        """Top-k tokens per layer for acts [n_layers, d_model] or [batch, n_layers, d_model]."""
        self._check(acts)
        if self.tokenizer is None:
            raise UserError("decode_layer_activations needs the tokenizer: LogitLens(model, tokenizer)")
        return lens_top_k(self.layer_logits, acts, k, self.tokenizer)

    @torch.no_grad()
    def target_rank_and_prob(self, acts: torch.Tensor, target_token_id) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank (0 = top; ties count in the target's favour) and probability of a target token per layer.

        acts: [n_layers, d_model] with an int target, or [batch, n_layers, d_model] with an int or ids [batch].
        Returns (ranks long, probs float32), each [n_layers] or [batch, n_layers].
        """
        self._check(acts)
        vocab = self.unembed.weight.shape[0]
        target = torch.as_tensor(target_token_id).long()
        if target.dim() > 1 or (target.dim() == 1 and (acts.dim() != 3 or target.shape[0] != acts.shape[0])):
            raise UserError(
                f"target_token_id must be one id or one per prompt [batch]; got shape {tuple(target.shape)}"
            )
        if bool(((target < 0) | (target >= vocab)).any()):
            raise UserError(f"target_token_id out of range for a vocabulary of {vocab}")
        if acts.dim() == 3:
            target = target.expand(acts.shape[0])
        ranks, probs = [], []
        for layer in range(acts.shape[-2]):
            rank, prob = rank_and_prob(self.logits(acts[..., layer, :]), target)  # [...] each
            ranks.append(rank)
            probs.append(prob)
        return torch.stack(ranks, dim=-1), torch.stack(probs, dim=-1)

    @torch.no_grad()
    def last_position_logits(
        self, prompts: Sequence[str], layers: Sequence[int] | None = None, batch_size: int = 8
    ) -> torch.Tensor:
        """Lens logits at each prompt's last token: float32 [n_prompts, n_layers, vocab] on the CPU.

        Prompts are tokenized as given (format them with `format_chat_prompt`). Memory: n_prompts x n_layers
        x vocab floats (152064 x 4 bytes per (prompt, layer) for Qwen2.5): pass few prompts or few layers.
        """
        if self.tokenizer is None:
            raise UserError("last_position_logits needs the tokenizer: LogitLens(model, tokenizer)")
        acts = collect_activations(self.model, self.tokenizer, prompts, layers, "last", batch_size)
        return torch.stack([self.logits(acts[:, i]).cpu() for i in range(acts.shape[1])], dim=1)


# ---- the tuned lens ------------------------------------------------------------------------------------------------
# At most this many logits (batch x layers-per-block x vocab) per readout block: 128 MB in float32.
READOUT_BLOCK_ELEMENTS = 1 << 25


class AffineTranslators(nn.Module):
    """x [batch, n_layers, d_model] -> x + (A_l x_l + b_l) per layer l, the identity at initialisation.

    Full rank: weight [n_layers, d_model(out), d_model(in)]. Low rank (`rank=r`): A_l = up_l @ down_l^T with
    up [n_layers, d_model, r] (zeros) and down [n_layers, d_model, r] (random, scale 1/sqrt(d_model)).
    """

    def __init__(self, n_layers: int, d_model: int, rank: int | None = None):
        super().__init__()
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        else:
            self.up = nn.Parameter(torch.zeros(n_layers, d_model, rank))
            self.down = nn.Parameter(torch.randn(n_layers, d_model, rank) / math.sqrt(d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def matrices(self) -> torch.Tensor:
        """A_l as dense matrices [n_layers, d_model(out), d_model(in)] (for inspection; d^2 per layer)."""
        if self.rank is None:
            return self.weight
        return torch.einsum("ler,ldr->led", self.up, self.down)

    def apply_layer(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """The translator of one slot alone: x [batch, d_model] -> x + (A_slot x + b_slot), as `forward` would."""
        if self.rank is None:
            delta = x @ self.weight[slot].T
        else:
            delta = (x @ self.down[slot]) @ self.up[slot].T
        return x + (delta + self.bias[slot])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            delta = torch.einsum("bld,led->ble", x, self.weight)  # [batch, n_layers, d_model]
        else:
            low = torch.einsum("bld,ldr->blr", x, self.down)  # [batch, n_layers, rank]
            delta = torch.einsum("blr,ler->ble", low, self.up)
        return x + (delta + self.bias)


def final_layer_slot(layers: Sequence[int], n_backbone_layers: int) -> int:
    """Index in `layers` of the backbone's last layer, the tuned lens's target; UserError unless `layers` hold it
    and at least one other layer."""
    layers = list(layers)
    if n_backbone_layers - 1 not in layers:
        raise UserError(
            f"the tuned lens needs the last layer ({n_backbone_layers - 1}) in data.layers: its "
            f"resid_post gives the model's own logits (the training target); got layers {layers}"
        )
    if len(layers) < 2:
        raise UserError(f"the tuned lens needs a layer besides the last in data.layers: {layers}")
    return layers.index(n_backbone_layers - 1)


class TunedLens:
    """The tuned lens (Belrose et al. 2023) over residuals cached at several layers, the backbone's last among them.

    Each cached layer l has an affine translator h -> h + (A_l h + b_l) (`AffineTranslators`, the identity at
    initialisation, so the untrained tuned lens IS the logit lens), read through the frozen final norm and
    unembedding (`LensReadout`). It is trained to minimise, per layer,
        KL(p_final || q_l),   p_final = softmax(unembed(norm(resid_post of the LAST layer))), the model's own
                              next-token distribution at the cached position;  q_l = the tuned lens at layer l.
    At the last layer the lens IS the model (KL 0), so its translator is left out of training (`trained_slots`)
    and stays the identity. Log-softmaxes and the KL sum over the vocabulary are float32 (a float64
    [batch, vocab] block would double the largest tensors).

    Memory (d_model = 5120, 64 layers, vocab 152064): a full translator is d^2 + d = 26.2M parameters (105 MB
    float32), 64 of them 1.68B (about 27 GB with gradients and AdamW state); rank r uses A_l = U_l V_l^T instead
    (2 d r + d per layer: 0.66M at r = 64). The readout makes [batch, k, vocab] float32 blocks, k layers at a
    time with at most READOUT_BLOCK_ELEMENTS logits per block (one pass over the LM head weight serves k layers);
    with gradients each block is recomputed in the backward pass (activation checkpointing), so only one block is
    alive at a time instead of batch x n_layers x vocab logits and their softmaxes.

    translators: trained by the caller (it owns their parameters); final_slot: `final_layer_slot(layers, ...)`.
    Inputs go to the translators' device; KLs come back there, logits on the LM head's.
    """

    def __init__(self, translators: AffineTranslators, readout: LensReadout, final_slot: int):
        self.translators, self.readout, self.final_slot = translators, readout, final_slot

    @classmethod
    def for_model(cls, model: PreTrainedModel, layers: Sequence[int], rank: int | None = None) -> TunedLens:
        """An untrained tuned lens for residuals of `model` cached at `layers` (translators on the CPU)."""
        config = model.config.get_text_config()
        final_slot = final_layer_slot(layers, config.num_hidden_layers)
        return cls(AffineTranslators(len(layers), config.hidden_size, rank), LensReadout(model), final_slot)

    @property
    def trained_slots(self) -> list[int]:
        """Every slot but the last layer's (whose translator stays the identity)."""
        return [slot for slot in range(self.translators.bias.shape[0]) if slot != self.final_slot]

    @property
    def device(self) -> torch.device:
        return self.translators.bias.device

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tuned-lens logits [batch, n_layers, vocab] float32 of cached residuals [batch, n_layers, d_model].

        Memory: batch x n_layers x vocab floats; use `kl_per_layer` for anything large.
        """
        return self.readout(self.translators(x.to(self.device)))

    def layer_logits(self, resid: torch.Tensor, slot: int) -> torch.Tensor:
        """Tuned-lens logits [batch, vocab] float32 of one cached layer's residuals [batch, d_model] (`slot`
        indexes the translators' layers)."""
        return self.readout(self.translators.apply_layer(resid.to(self.device), slot))

    @torch.no_grad()
    def final_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own next-token log-probabilities [batch, vocab] float32, from the last layer in x."""
        return self.readout(x[:, self.final_slot].to(self.device)).log_softmax(-1)

    def kl_per_layer(self, x: torch.Tensor, tuned: bool = True, slots: Sequence[int] | None = None) -> torch.Tensor:
        """KL(final distribution || lens distribution) [batch, n_slots] float32 (tuned=False: the logit lens).

        x: cached residuals [batch, n_layers, d_model]; slots: indices into the cached layers (None = all).
        Layers are read out a few at a time (at most READOUT_BLOCK_ELEMENTS logits per block); with gradients
        enabled each block is checkpointed, i.e. recomputed in the backward pass instead of kept.
        """
        x = x.to(self.device)
        slots = list(range(x.shape[1])) if slots is None else list(slots)
        log_p = self.final_log_probs(x)[:, None]  # [batch, 1, vocab]
        p = log_p.exp()
        h = self.translators(x) if tuned else x  # [batch, n_layers, d_model]
        vocab = self.readout.unembed.weight.shape[0]
        per_block = max(1, READOUT_BLOCK_ELEMENTS // (x.shape[0] * vocab))

        def block_kl(h_block: torch.Tensor) -> torch.Tensor:  # [batch, k, d_model] -> [batch, k]
            log_q = self.readout(h_block).log_softmax(-1)  # [batch, k, vocab]
            return (p * (log_p - log_q)).sum(-1).to(self.device)

        # The last layer is read alone, exactly like log_p (same shapes, same kernels), so its logit-lens KL
        # is exactly 0 rather than float32 noise of a differently blocked matmul.
        others = [slot for slot in slots if slot != self.final_slot]
        blocks = [others[i : i + per_block] for i in range(0, len(others), per_block)]
        blocks += [[self.final_slot]] if self.final_slot in slots else []
        kls = []
        for block in blocks:
            h_block = h[:, block]
            if torch.is_grad_enabled() and h_block.requires_grad:
                kls.append(checkpoint(block_kl, h_block, use_reentrant=False))
            else:
                kls.append(block_kl(h_block))
        order = [slot for block in blocks for slot in block]
        return torch.cat(kls, dim=1)[:, [order.index(slot) for slot in slots]]
