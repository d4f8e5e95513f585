"""The one position resolver: which token positions of a (left- or right-padded) batch to read.

Position specs (strings in configs, `PositionSpec` in code):
    "last"              the last prompt token                                   -> 1 position
    "last_k" e.g. "last_4"  the last k prompt tokens, in order                  -> k positions
    "post_instruction"  the chat-template tokens after the user's text, e.g.
                        `<|im_end|>\\n<|im_start|>assistant\\n<think>\\n` for QwQ -> len(template suffix)
    "mean"              the mean over all prompt tokens (padding excluded)       -> 1 position
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from interp.errors import UserError

_LAST_K = re.compile(r"^last[_:](\d+)$")


@dataclass(frozen=True)
class PositionSpec:
    """Which prompt tokens to read, parsed from a config string (module docstring) by `parse`.

    `str(spec)` gives the config string back (it is part of the activation-cache key); `num_positions` says how
    many vectors one prompt yields, `is_single` whether that is one (then the position axis is dropped).
    Resolve a spec against a padded batch with `select_positions`.
    """

    kind: str  # "last" | "post_instruction" | "mean"; "last" with k > 1 is last_k
    k: int = 1  # number of last tokens ("last" only)

    @classmethod
    def parse(cls, spec: str | int | PositionSpec) -> PositionSpec:
        if isinstance(spec, PositionSpec):
            return spec
        text = str(spec).strip()
        if text in ("last", "post_instruction", "mean"):
            return cls(text)
        match = _LAST_K.match(text)
        if match and int(match.group(1)) >= 1:
            return cls("last", int(match.group(1)))
        raise UserError(f"unknown positions {spec!r}; expected 'last', 'last_<k>', 'post_instruction' or 'mean'")

    def __str__(self) -> str:
        return f"last_{self.k}" if self.kind == "last" and self.k > 1 else self.kind

    @property
    def is_single(self) -> bool:
        """True when the spec yields one vector per prompt (then the position axis is dropped)."""
        return self.kind == "mean" or (self.kind == "last" and self.k == 1)

    def num_positions(self, post_instruction_len: int | None = None) -> int:
        if self.kind == "post_instruction":
            if not post_instruction_len:
                raise UserError("positions 'post_instruction' need a tokenizer with a chat template")
            return post_instruction_len
        return self.k if self.kind == "last" else 1


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids that start at 0 on each row's first real token ([batch, seq]); left padding safe."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding: [batch]."""
    seq = attention_mask.shape[1]
    return seq - 1 - attention_mask.long().flip(-1).argmax(-1)


def position_index(
    spec: PositionSpec, attention_mask: torch.Tensor, post_instruction_len: int | None = None
) -> torch.Tensor:
    """Token indices [batch, n_pos] for index specs (not "mean"); raises if a prompt is too short."""
    n_pos = spec.num_positions(post_instruction_len)
    lengths = attention_mask.long().sum(-1)
    if bool((lengths < n_pos).any()):
        raise UserError(f"positions {spec}: a prompt has {int(lengths.min())} tokens, fewer than {n_pos}")
    offsets = torch.arange(n_pos - 1, -1, -1, device=attention_mask.device)  # [n_pos], oldest first
    return last_token_index(attention_mask)[:, None] - offsets[None, :]


def select_positions(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    spec: PositionSpec,
    post_instruction_len: int | None = None,
) -> torch.Tensor:
    """[batch, seq, d] -> [batch, n_pos, d] in float32 (mean: accumulated in float32 over real tokens)."""
    attention_mask = attention_mask.to(hidden.device)
    if spec.kind == "mean":
        weights = attention_mask.to(torch.float32)[:, :, None]  # [batch, seq, 1]
        total = (hidden.to(torch.float32) * weights).sum(1, keepdim=True)
        return total / weights.sum(1, keepdim=True)
    index = position_index(spec, attention_mask, post_instruction_len)  # [batch, n_pos]
    picked = torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return picked.to(torch.float32)
