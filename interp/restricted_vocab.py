"""Training a causal LM on the few hundred token ids a corpus uses, exactly as if over the full vocabulary.

The toy models keep the real Qwen2.5 vocabulary (152,064 unembedding rows), but their corpus uses ~200 ids.
Training computes logits only for those ids plus ONE shared row standing for all the others: every unseen id
gets the same unembedding row `w_other`, so the full softmax's denominator is
    sum_seen exp(w_i . h) + n_unseen * exp(w_other . h)
and the restricted model's last logit is `w_other . h + log(n_unseen)` (`unseen_logit_offset`). The restricted
cross-entropy is then the full-vocabulary cross-entropy of the exported model, to float rounding (tested).

`expand_to_full` writes the trained weights into a full-vocabulary model: seen rows where they belong, every
unseen unembedding row equal to `w_other` (training pushes its logit far below the seen ones: greedy decoding
never picks an unseen id, which tests check on held-out prompts), every unseen embedding row zero (those ids
never occur in the inputs). `restrict` is its inverse, for reading a saved model back.

Shapes: restricted vocab V = len(ids) + 1 (the last index is "other"); full vocab N; hidden d.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from transformers import LogitsProcessor, PreTrainedModel


class RestrictedVocab:
    """The ids a corpus uses (sorted) inside a full vocabulary of `full_size` ids."""

    def __init__(self, token_ids: Iterable[int], full_size: int):
        self.ids = torch.tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)  # [V - 1]
        self.full_size = int(full_size)
        if len(self.ids) == 0 or self.ids[0] < 0 or self.ids[-1] >= self.full_size:
            raise ValueError(f"token ids must lie in 0..{self.full_size - 1}")
        self._to_restricted = torch.full((self.full_size,), -1, dtype=torch.long)
        self._to_restricted[self.ids] = torch.arange(len(self.ids))

    @property
    def size(self) -> int:
        """Restricted vocabulary size: the seen ids plus the shared "other" row."""
        return len(self.ids) + 1

    @property
    def other(self) -> int:
        return len(self.ids)

    @property
    def unseen_logit_offset(self) -> float:
        """log(number of unseen ids), added to the "other" logit."""
        return math.log(self.full_size - len(self.ids))

    def encode(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> restricted ids (same shape); ValueError for an id outside the corpus."""
        out = self._to_restricted[full_ids]
        if (out < 0).any():
            raise ValueError(f"token id {int(full_ids[out < 0][0])} is not in the restricted vocabulary")
        return out

    def decode(self, restricted_ids: torch.Tensor) -> torch.Tensor:
        """Restricted ids -> full-vocabulary ids ("other" -> -1)."""
        return torch.cat([self.ids, torch.tensor([-1])])[restricted_ids]

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., V] logits of a model whose unembedding has V rows -> the same with the "other" logit counting
        every unseen id (log-softmax of the result = full-vocabulary log-softmax at the seen ids)."""
        return torch.cat([raw[..., :-1], raw[..., -1:] + self.unseen_logit_offset], dim=-1)


class UnseenMassLogits(LogitsProcessor):
    """For `generate` on a restricted model: makes its greedy choice that of the full-vocabulary model."""

    def __init__(self, vocab: RestrictedVocab):
        self.offset = vocab.unseen_logit_offset

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, -1] += self.offset
        return scores


def restricted_config(config, vocab: RestrictedVocab):
    """A copy of a full-vocabulary config for the restricted model (vocab_size V, no padding row: the full
    config's pad id is out of range there)."""
    config = config.__class__.from_dict(config.to_dict())
    config.vocab_size, config.pad_token_id = vocab.size, None
    return config


@torch.no_grad()
def expand_to_full(model: PreTrainedModel, vocab: RestrictedVocab, full_config) -> PreTrainedModel:
    """A model of `full_config` (vocab_size N) holding the restricted `model`'s weights: see the module
    docstring. Every other field of `full_config` must match the model's shape."""
    if model.config.tie_word_embeddings or full_config.tie_word_embeddings:
        raise ValueError("expand_to_full needs untied embeddings (an unseen row differs in and out)")
    if full_config.vocab_size != vocab.full_size:
        raise ValueError(
            f"full_config.vocab_size {full_config.vocab_size} != vocab.full_size {vocab.full_size}"
        )
    full = model.__class__(full_config).to(model.dtype)
    state = model.state_dict()
    embed = state.pop("model.embed_tokens.weight")  # [V, d]
    head = state.pop("lm_head.weight")  # [V, d]
    full_embed = torch.zeros(vocab.full_size, embed.shape[1], dtype=embed.dtype)
    full_embed[vocab.ids] = embed[:-1]
    full_head = head[-1].expand(vocab.full_size, -1).clone()
    full_head[vocab.ids] = head[:-1]
    state.update({"model.embed_tokens.weight": full_embed, "lm_head.weight": full_head})
    full.load_state_dict(state)
    return full.eval()


@torch.no_grad()
def restrict(full: PreTrainedModel, vocab: RestrictedVocab) -> PreTrainedModel:
    """The restricted model a full one was expanded from (any unseen unembedding row serves as "other")."""
    small = full.__class__(restricted_config(full.config, vocab)).to(full.dtype)
    state = full.state_dict()
    unseen = int(torch.nonzero(vocab._to_restricted < 0)[0])  # the first id outside the corpus
    embed, head = state.pop("model.embed_tokens.weight"), state.pop("lm_head.weight")
    state["model.embed_tokens.weight"] = torch.cat([embed[vocab.ids], embed[unseen : unseen + 1]])
    state["lm_head.weight"] = torch.cat([head[vocab.ids], head[unseen : unseen + 1]])
    small.load_state_dict(state)
    return small.eval()
