"""Text generation from a frozen backbone, plain or under a direction intervention.

`generate` runs HF `model.generate` on left-padded batches with a KV cache (sampling with the models'
recommended temperature 0.6 / top_p 0.95 by default, greedy with `do_sample=False`). Other decoding settings
(top_k, repetition penalty, ...) come from the model's own `generation_config`.
`apply_direction_intervention` is the same generation inside an `InterventionHandler`.
Prompts are used as given: format chat prompts with `interp.format_chat_prompt` first.

`DEFAULT_MAX_NEW_TOKENS` (8192) is the generation budget for answer-graded evaluation; see `generate` for why
and what it costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from interp.backbone import input_device
from interp.errors import UserError
from interp.interventions import InterventionHandler
from interp.prompts import length_sorted_chunks, tokenize_prompts

# Reasoning traces of QwQ-32B / R1-Distill-Qwen-32B run to thousands of tokens (see `generate`).
DEFAULT_MAX_NEW_TOKENS = 8192


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.6,
    top_p: float = 0.95,
    do_sample: bool = True,
    seed: int | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids of every prompt, up to (not including) the first EOS, in the input order.

    Prompts are batched by similar length and left padded; `seed` makes sampling reproducible without
    touching the global RNG state; `use_cache=False` re-runs the whole sequence at every step (slow: for
    checks).
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise UserError("generate takes a non-empty list of prompts")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise UserError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    eos = _eos_ids(model, tokenizer)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    chunks = length_sorted_chunks(lengths, batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    devices = list(range(torch.cuda.device_count())) if seed is not None else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for chunk in chunks:
            batch = tokenize_prompts(tokenizer, [prompts[i] for i in chunk], device=input_device(model))
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_cache=use_cache,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            for row, index in enumerate(chunk):
                new = ids[row, batch["input_ids"].shape[1] :].tolist()
                ends = [k for k, token in enumerate(new) if token in eos]
                out[index] = new[: ends[0]] if ends else new
    return out


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.6,
    top_p: float = 0.95,
    do_sample: bool = True,
    seed: int | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
) -> list[str]:
    """Generated text of every prompt (new tokens only, up to the first EOS; special tokens such as
    `</think>` are kept), in the input order. Arguments as in `generate_token_ids`.

    max_new_tokens (default DEFAULT_MAX_NEW_TOKENS = 8192): a generation that reaches it without a final
    answer is truncated (`interp.grading.has_final_answer` is False) and graded incorrect, so the budget must
    let most traces finish, or accuracy measures truncation. Published lengths of these models' traces:
    averaged over MATH500, AIME 2024, GSM8K and GPQA-Diamond with standard thinking, QwQ-32B writes 6472
    tokens and R1-Distill-Qwen-32B 4995 (Soft Thinking, Zhang et al. 2025, arXiv:2505.15778, Fig. 1); GSM8K
    alone is far shorter (QwQ-32B-Preview: 741 tokens, CoT-Valve, arXiv:2502.09601), AIME far longer. The
    old default of 512 cut off nearly every trace. Report the truncation rate next to accuracy, per
    condition: interventions change trace lengths.
    Cost (both models: 64 layers, 8 KV heads of dim 128, bf16): the KV cache holds 2 * 64 * 8 * 128 * 2 B =
    256 KiB per token, i.e. batch_size * (prompt + max_new_tokens) * 256 KiB at the end of a batch that runs
    to the limit: ~2.0 GiB per sequence at 8192 new tokens (+ a 200-token prompt), ~16 GiB for batch_size 8,
    on top of ~61 GiB of bf16 weights. Time: each decoding step reads every weight once (~65 GB), so a step
    takes at least weights / memory bandwidth (~20 ms at 3.3 TB/s) and 8192 steps at least ~3 min per batch;
    a batch runs until its LONGEST member stops, so one looping generation holds the whole batch to the
    limit. Halving max_new_tokens halves both costs, at the price of more truncation on hard (MATH) problems.
    """
    ids = generate_token_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        do_sample=do_sample, seed=seed, batch_size=batch_size, use_cache=use_cache,
    )  # fmt: skip
    return [tokenizer.decode(row, skip_special_tokens=False) for row in ids]


def apply_direction_intervention(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[str],
    directions,
    intervention_strength: float = 1.0,
    layers: Sequence[int] | None = None,
    mode: str = "add",
    apply_to: str = "all",
    ablation_layer: int | None = None,
    **generation_kwargs,
) -> str | list[str]:
    """Generate under an `InterventionHandler` (see it for directions / strength / layers / mode / apply_to).

    `prompt`: one prompt (returns one string) or a list (returns a list). `generation_kwargs` go to
    `generate` (max_new_tokens, temperature, top_p, do_sample, seed, batch_size, use_cache).
    """
    single = isinstance(prompt, str)
    handler = InterventionHandler(
        model, directions, intervention_strength, layers=layers, mode=mode, apply_to=apply_to,
        ablation_layer=ablation_layer,
    )  # fmt: skip
    with handler:
        texts = generate(model, tokenizer, [prompt] if single else list(prompt), **generation_kwargs)
    return texts[0] if single else texts
