"""Which tokens of a forward are prompt and which are generated: the token roles behind
`InterventionHandler(apply_to="prompt" | "generated")` and role-aligned mean ablation.

- `real_token_index`: each token's index among its row's real (non-padding) tokens, KV cache included.
- `prompt_boundary(model, prompt_lengths)`: declares, for teacher-forced forwards (prompt + continuation in one
  sequence), where each row's prompt ends.
- `_PromptTracker`: per forward, which tokens an intervention with apply_to "prompt" / "generated" touches.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.generation.utils import GenerationMixin

from interp.backbone import base_decoder
from interp.errors import UserError


def _past_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def _tokens_and_cache(kwargs: dict) -> tuple[torch.Tensor, object]:
    """The forward's input_ids (or inputs_embeds) [batch, seq(, d)] and its KV cache (None without one)."""
    tokens = kwargs.get("input_ids")
    tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
    return tokens, kwargs.get("cache", kwargs.get("past_key_values"))


def real_token_index(kwargs: dict) -> torch.Tensor:
    """[batch, seq] long: the index of each token of a forward among its row's real (non-padding) tokens,
    counting tokens already in the KV cache; -1 at padding.

    `kwargs` are the base decoder's forward arguments (as `hooked(observe_inputs=...)` passes them); padding
    is read from the 2D `attention_mask` (left or right padded; None: no padding), which spans the cached
    tokens too (as in HF generate).
    """
    tokens, cache = _tokens_and_cache(kwargs)
    (batch, seq), past = tokens.shape[:2], _past_length(cache)
    mask = kwargs.get("attention_mask")
    if mask is None:
        return torch.arange(past, past + seq, device=tokens.device).expand(batch, seq)
    if mask.ndim != 2 or tuple(mask.shape) != (batch, past + seq):
        raise UserError(
            f"cannot tell padding from real tokens: expected a 2D attention_mask of shape {(batch, past + seq)}, "
            f"got {tuple(mask.shape)}"
        )
    real = mask.bool()
    index = (real.long().cumsum(-1) - 1).masked_fill(~real, -1)
    return index[:, past:]


# base decoder -> [batch] prompt lengths declared by the innermost active `prompt_boundary`
_BOUNDARIES: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _check_prompt_lengths(prompt_lengths) -> torch.Tensor:
    lengths = torch.as_tensor(prompt_lengths).detach().cpu()
    if lengths.ndim != 1 or lengths.numel() == 0 or lengths.is_floating_point() or bool((lengths < 0).any()):
        raise UserError(f"prompt_lengths must be a [batch] list of token counts >= 0, got {prompt_lengths!r}")
    return lengths.long()


@contextmanager
def prompt_boundary(model: nn.Module, prompt_lengths) -> Iterator[None]:
    """Declare, for the teacher-forced forwards of `model` inside the block, that row i's first
    `prompt_lengths[i]` real (non-padding) tokens are its prompt and its later real tokens are "generated".

    Read by every active intervention with apply_to "prompt" / "generated" (it overrides the
    handler's own `prompt_lengths`) in every forward without a KV cache, which must have len(prompt_lengths)
    rows. Forwards with a KV cache (HF generate) keep the generation rule.
    """
    lengths, key = _check_prompt_lengths(prompt_lengths), base_decoder(model)
    previous = _BOUNDARIES.get(key)
    _BOUNDARIES[key] = lengths
    try:
        yield
    finally:
        if previous is None:
            _BOUNDARIES.pop(key, None)
        else:
            _BOUNDARIES[key] = previous


_GENERATE = inspect.unwrap(GenerationMixin.generate).__code__


def _inside_generate() -> bool:
    """True when HF `generate` is on the call stack. Its first forward without a KV cache looks exactly like
    a teacher-forced forward; only where it is called from tells them apart."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _GENERATE:
            return True
        frame = frame.f_back
    return False


class _PromptTracker:
    """Which tokens of the current forward are prompt, for apply_to "prompt" / "generated".

    - A forward without a KV cache under a declared boundary (`prompt_lengths`): row i's first
      prompt_lengths[i] real tokens are prompt, its later real tokens generated; padding is neither.
    - Otherwise only forwards of HF `generate` are understood: a forward with an empty KV cache (or, without a
      cache, one that does not extend the previous forward's tokens) starts a new prompt, its whole (padded)
      width; with a cache each decoding step sits at absolute position `past length`; without a cache
      (generate(use_cache=False) re-runs prompt + generated tokens at every step) a forward whose tokens extend
      the current prompt's tokens has its tail generated.
    - Any other forward (teacher forcing without a boundary) raises UserError: there is no prompt to tell.
    """

    def __init__(self, model: nn.Module, apply_to: str, prompt_lengths: torch.Tensor | None = None):
        self.decoder, self.apply_to, self.own_lengths = base_decoder(model), apply_to, prompt_lengths
        self.prompt_len: int | None = None
        self.prompt_tokens: torch.Tensor | None = None  # [batch, prompt_len] ids (or [.., d] embeddings)
        self.start = 0  # absolute position of the current forward's first token
        self.declared: tuple[torch.Tensor, torch.Tensor] | None = None  # (is_prompt, is_real) [batch, seq]

    def observe(self, kwargs: dict) -> None:
        """Called before every forward of the base decoder (`hooked(observe_inputs=...)`)."""
        tokens, cache = _tokens_and_cache(kwargs)
        past, seq = _past_length(cache), tokens.shape[1]
        self.start, self.declared = past, None
        lengths = _BOUNDARIES.get(self.decoder, self.own_lengths)
        if lengths is not None and cache is None:
            self.prompt_len = self.prompt_tokens = None  # a later generate starts afresh
            self._declare(kwargs, lengths)
            return
        if past > 0:  # a decoding step (or a continued cache: then everything seen so far is prompt)
            if self.prompt_len is None:
                self.prompt_len = past + seq
            return
        continues = (
            self.prompt_tokens is not None
            and seq > self.prompt_len
            and tokens.shape[0] == self.prompt_tokens.shape[0]
            and torch.equal(tokens[:, : self.prompt_len].to(self.prompt_tokens.device), self.prompt_tokens)
        )
        if continues:
            return
        if cache is None and not _inside_generate():
            raise UserError(
                f"apply_to={self.apply_to!r} on a forward outside generate: say where each prompt ends with "
                "InterventionHandler(..., prompt_lengths=...) or interp.token_roles.prompt_boundary"
            )
        self.prompt_len, self.prompt_tokens = seq, tokens.detach().clone()

    def _declare(self, kwargs: dict, lengths: torch.Tensor) -> None:
        index = real_token_index(kwargs)  # [batch, seq]
        if lengths.shape[0] != index.shape[0]:
            raise UserError(f"prompt_lengths has {lengths.shape[0]} rows but the forward has {index.shape[0]}")
        n_real = (index >= 0).sum(-1).cpu()
        if bool((lengths > n_real).any()):
            row = int((lengths > n_real).nonzero()[0, 0])
            raise UserError(f"prompt_lengths[{row}] = {int(lengths[row])} exceeds row {row}'s {int(n_real[row])} tokens")
        is_prompt = (index >= 0) & (index < lengths.to(index.device)[:, None])
        self.declared = (is_prompt, index >= 0)

    def selected(self, seq: int, device: torch.device) -> torch.Tensor:
        """[batch or 1, pos] bool: which of the current forward's `seq` tokens the intervention applies to."""
        if self.declared is not None:
            is_prompt, real = (mask.to(device) for mask in self.declared)
            return is_prompt if self.apply_to == "prompt" else real & ~is_prompt
        absolute = torch.arange(self.start, self.start + seq, device=device)
        is_prompt = absolute < (self.prompt_len if self.prompt_len is not None else seq)
        return (is_prompt if self.apply_to == "prompt" else ~is_prompt)[None]
