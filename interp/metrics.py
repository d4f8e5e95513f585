"""Reasoning metrics read off the model's own forward: gold-solution NLL, first-token log-prob, next-token KL.

Every function calls the full causal LM (`model(...)`), so any hooks active on it apply: wrap a call in an
intervention's context manager (ablation, addition, patching) and the metric measures the intervened model.

Prompts are tokenized as given (no tokens added), like `interp.activations.collect_activations`: format them
with `interp.prompts.format_chat_prompt` first. Prompt and solution are tokenized SEPARATELY and their ids
concatenated, so the boundary between them is exact (no BPE merge across it). Batches are left padded and
get `padded_position_ids`, so a padded batch scores exactly like each prompt alone. The solution scores
declare the prompt / solution boundary (`interp.token_roles.prompt_boundary`): inside an
`InterventionHandler(..., apply_to="generated")` the solution tokens count as generated, the prompt's as prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.backbone import input_device
from interp.errors import UserError
from interp.positions import padded_position_ids
from interp.prompts import length_sorted_chunks, tokenize_prompts
from interp.token_roles import prompt_boundary


def _supports_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_position_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
) -> torch.Tensor:
    """Logits of the last `keep` positions of a left-padded batch: [batch, keep, vocab] (model dtype)."""
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kwargs = {"logits_to_keep": keep} if _supports_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=padded_position_ids(attention_mask),
        use_cache=False,
        **kwargs,
    )
    return out.logits[:, -keep:]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded input_ids and attention_mask, [batch, max_len] each."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def completion_logprobs(
    model: PreTrainedModel, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token | prompt, earlier completion tokens) of one batch, teacher forced, differentiable.

    The rows are left padded prompt + completion ids; the boundary is declared (`prompt_boundary`), so an
    intervention with apply_to "prompt" / "generated" acts on the prompt / the completion tokens.
    Returns (logprobs float32 [batch, n], mask bool [batch, n]) on the logits' device, n = the longest
    completion; row i's completion is its last len(completion_ids[i]) columns, where mask is True.
    """
    ids, attention = _left_pad([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)], pad_id)
    lengths = torch.tensor([len(c) for c in completion_ids])
    n = int(lengths.max())
    # With left padding every row ends at the last column: the completion tokens are each row's last
    # len(completion) tokens, predicted by the logits one position earlier.
    with prompt_boundary(model, [len(p) for p in prompt_ids]):
        logits = last_position_logits(model, ids, attention, n + 1)[:, :-1]  # [batch, n, vocab]
    targets = ids[:, -n:].to(logits.device)  # [batch, n]
    logprobs = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [batch, n]
    mask = torch.arange(n)[None, :] >= (n - lengths)[:, None]  # [batch, n]
    return logprobs, mask.to(logits.device)


@torch.no_grad()
def _solution_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    solutions: Sequence[str],
    batch_size: int,
    max_solution_tokens: int | None,
) -> torch.Tensor:
    """Mean log p(solution token | prompt, earlier solution tokens) per prompt: float64 [n]."""
    if len(prompts) != len(solutions):
        raise UserError(f"got {len(prompts)} prompts but {len(solutions)} solutions")
    if len(prompts) == 0:
        raise UserError("no prompts to score")
    if max_solution_tokens is not None and max_solution_tokens < 1:
        raise UserError(f"max_solution_tokens must be >= 1, got {max_solution_tokens}")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    solution_ids = [ids[:max_solution_tokens] for ids in tokenizer(list(solutions), add_special_tokens=False)["input_ids"]]
    for i, (p, s) in enumerate(zip(prompt_ids, solution_ids)):
        if not p or not s:
            raise UserError(f"example {i}: the {'prompt' if not p else 'solution'} has no tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(p) + len(s) for p, s in zip(prompt_ids, solution_ids)]
    out = torch.empty(len(prompts), dtype=torch.float64)
    for chunk in length_sorted_chunks(lengths, batch_size):
        logprobs, mask = completion_logprobs(model, [prompt_ids[i] for i in chunk], [solution_ids[i] for i in chunk],
                                             pad_id)  # fmt: skip
        for row, i in enumerate(chunk):
            out[i] = logprobs[row][mask[row]].to(torch.float64).mean()
    return out


def gold_solution_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    solutions: Sequence[str],
    batch_size: int = 8,
    max_solution_tokens: int | None = 256,
) -> torch.Tensor:
    """Teacher-forced mean negative log-likelihood per token of each gold solution given its prompt.

    Only the first `max_solution_tokens` solution tokens are scored (None: all); prompt tokens and padding
    are masked out. Higher = the model finds the gold reasoning less likely.

    Returns:
        float64 [n_prompts] (per-token log-probs from float32 logits, averaged in float64).
    Memory: the logits of the last max_solution_tokens + 1 positions only (`logits_to_keep`), about
    3 * batch_size * (max_solution_tokens + 1) * vocab * 4 bytes at peak (1.5 GB for 8 x 257 x 152064).
    """
    return -_solution_logprobs(model, tokenizer, prompts, solutions, batch_size, max_solution_tokens)


def first_tokens_logprob(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    solutions: Sequence[str],
    k: int = 8,
    batch_size: int = 8,
) -> torch.Tensor:
    """The cheap score: mean log-prob of the first k gold-solution tokens (= -gold_solution_nll truncated to
    k tokens). Higher = the model is more likely to start the gold solution. float64 [n_prompts]."""
    return _solution_logprobs(model, tokenizer, prompts, solutions, batch_size, k)


@torch.no_grad()
def next_token_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 8
) -> torch.Tensor:
    """Logits for the token after each prompt's last token: float32 [n_prompts, vocab] on the CPU."""
    if len(prompts) == 0:
        raise UserError("no prompts to score")
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    out: torch.Tensor | None = None
    for chunk in length_sorted_chunks(lengths, batch_size):
        batch = tokenize_prompts(tokenizer, [prompts[i] for i in chunk])
        logits = last_position_logits(model, batch["input_ids"], batch["attention_mask"], 1)[:, -1]  # [batch, vocab]
        if out is None:
            out = torch.empty((len(prompts), logits.shape[-1]), dtype=torch.float32)
        out[chunk] = logits.float().cpu()
    return out


def last_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) of next-token distributions given as logits.

    Args:
        logits_p, logits_q: [batch, vocab] (e.g. baseline and intervened `next_token_logits`).
    Returns:
        float64 [batch], computed in float64 (+inf where q gives zero probability to a token p can emit).
    """
    if logits_p.shape != logits_q.shape or logits_p.ndim != 2:
        raise UserError(f"last_token_kl needs two [batch, vocab] logits, got {tuple(logits_p.shape)} and "
                        f"{tuple(logits_q.shape)}")
    log_p = torch.log_softmax(logits_p.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(logits_q.to(device=logits_p.device, dtype=torch.float64), dim=-1)
    terms = log_p.exp() * (log_p - log_q)  # [batch, vocab]; tokens with p_v = 0 contribute 0 (not NaN)
    return torch.where(log_p > float("-inf"), terms, 0.0).sum(-1)
