"""The logit lens: read any layer's residual stream through the model's own final norm and unembedding.

`LogitLens(model, tokenizer)` finds the final norm structurally (the last normalisation module that is a
direct child of the base model: `norm` in Qwen2 / Llama, `ln_f` in GPT-2) and the unembedding
(`model.get_output_embeddings()`), then
    logits(resid [..., d_model])                        -> [..., vocab] float32
    decode_layer_activations(acts [(batch,) n_layers, d_model], k) -> top-k ids / probs / strings per layer
    target_rank_and_prob(acts, target_token_id)         -> rank (0 = top) and probability per layer
    last_position_logits(prompts, layers)               -> [n_prompts, n_layers, vocab] at the last token
Applied to the last layer's `blocks.{L-1}.resid_post` (before the final norm) the lens gives the model's
own logits exactly. Per-layer loops keep memory at one [..., vocab] block at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
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


@dataclass
class LensTopK:
    """Top-k lens readout per layer; `...` is the batch axis when the activations had one."""

    ids: torch.Tensor  # [..., n_layers, k] long
    probs: torch.Tensor  # [..., n_layers, k] float32, softmax over the whole vocabulary
    tokens: list  # decoded strings, nested like ids: [n_layers][k] or [batch][n_layers][k]


class LogitLens:
    """The model's final norm + unembedding applied to any layer's residual stream (weights untouched)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.norm = final_norm(model)
        self.unembed = model.get_output_embeddings()
        if self.unembed is None:
            raise UserError(
                f"{type(model).__name__} has no output embedding (LM head) to read the lens through"
            )

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """[..., d_model] residual stream -> [..., vocab] float32 logits (on the LM head's device).

        Differentiable (no no_grad here), so lenses trained on top of it can backpropagate.
        """
        weight = self.unembed.weight
        norm_param = next(self.norm.parameters(), weight)
        hidden = self.norm(resid.to(device=norm_param.device, dtype=weight.dtype))
        return self.unembed(hidden.to(weight.device)).float()

    def _check(self, acts: torch.Tensor) -> None:
        d_model = self.model.config.get_text_config().hidden_size
        if acts.dim() not in (2, 3) or acts.shape[-1] != d_model:
            raise UserError(
                f"lens activations must be [n_layers, {d_model}] or [batch, n_layers, {d_model}]; "
                f"got {tuple(acts.shape)}"
            )

    @torch.no_grad()
    def decode_layer_activations(self, acts: torch.Tensor, k: int = 5) -> LensTopK:
        """Top-k tokens per layer for acts [n_layers, d_model] or [batch, n_layers, d_model]."""
        self._check(acts)
        vocab = self.unembed.weight.shape[0]
        if not 1 <= k <= vocab:
            raise UserError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
        if self.tokenizer is None:
            raise UserError("decode_layer_activations needs the tokenizer: LogitLens(model, tokenizer)")
        ids, probs = [], []
        for layer in range(acts.shape[-2]):
            top = self.logits(acts[..., layer, :]).softmax(-1).topk(k, dim=-1)  # [..., k]
            ids.append(top.indices.cpu())
            probs.append(top.values.cpu())
        ids_t, probs_t = torch.stack(ids, dim=-2), torch.stack(probs, dim=-2)  # [..., n_layers, k]

        def decode(rows: list) -> list:  # nested lists of ids -> the same nesting of strings
            if rows and isinstance(rows[0], list):
                return [decode(row) for row in rows]
            return [self.tokenizer.decode([token]) for token in rows]

        return LensTopK(ids_t, probs_t, decode(ids_t.tolist()))

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
            logits = self.logits(acts[..., layer, :])  # [..., vocab]
            index = target.to(logits.device)[..., None]
            ranks.append((logits > logits.gather(-1, index)).sum(-1).cpu())
            probs.append(logits.log_softmax(-1).gather(-1, index)[..., 0].exp().cpu())
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
