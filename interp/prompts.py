"""Chat-template formatting, the template's post-instruction tokens (for "post_instruction" positions), and
tokenizing prompts into left-padded batches of similar length."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from interp.errors import UserError

_SENTINEL = "\x00USER-TEXT\x00"


def format_chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system: str | None = None) -> str:
    """The model's own chat template around one user turn, ending with the generation prompt
    (e.g. `<|im_start|>assistant\\n<think>\\n` for QwQ). Tokenize the result with add_special_tokens=False:
    the template already holds any BOS token."""
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def post_instruction_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the template puts after the user's text (the "end-of-instruction" span)."""
    rendered = format_chat_prompt(tokenizer, _SENTINEL)
    suffix = rendered[rendered.index(_SENTINEL) + len(_SENTINEL) :]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"]


POSITION_ROLES = ("assistant", "think", "last")  # roles of post-instruction tokens, the same in every template


def role_positions(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Where each of POSITION_ROLES sits in the template's post-instruction tokens (`post_instruction_ids`): an
    index into a "post_instruction" position axis. Two chat templates put different tokens there (QwQ:
    `<|im_end|> \\n <|im_start|> assistant \\n <think> \\n`, R1-Distill: `<｜Assistant｜> <think> \\n`), so positions
    of two models are matched by role, never by offset:
        "assistant"  the last token before `<think>` whose text names the assistant turn ("assistant" in any case)
        "think"      the `<think>` token
        "last"       the last prompt token
    A template without `<think>` or an assistant token raises UserError."""
    texts = [tokenizer.decode([token]) for token in post_instruction_ids(tokenizer)]
    if "<think>" not in [text.strip() for text in texts]:
        raise UserError(f"{tokenizer.name_or_path!r}: the chat template puts no <think> token after the user's text")
    think = [text.strip() for text in texts].index("<think>")
    assistant = [i for i in range(think) if "assistant" in texts[i].lower()]
    if not assistant:
        raise UserError(f"{tokenizer.name_or_path!r}: no assistant token before <think> in the template ({texts})")
    return {"assistant": assistant[-1], "think": think, "last": len(texts) - 1}


def check_ends_with_template(
    token_ids: Sequence[Sequence[int]], post: Sequence[int], what: str = "prompt", texts: Sequence[str] | None = None
) -> None:
    """UserError unless every row of `token_ids` (one prompt's tokens, no padding) ends with `post`, the
    template's post-instruction ids (`post_instruction_ids`). `what` names the prompts in the message;
    `texts` (the prompts, when at hand) lets it quote the end of the offending one."""
    post = list(post)
    for i, row in enumerate(token_ids):
        if len(row) < len(post) or list(row[len(row) - len(post) :]) != post:
            shown = f": {texts[i][-80:]!r}" if texts is not None else f" ({what} {i} does not)"
            raise UserError(
                f"every {what} must end with the chat template's post-instruction tokens "
                f"(format it with interp.format_chat_prompt){shown}"
            )


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device=None) -> dict:
    """Left-padded batch {"input_ids", "attention_mask"} ([batch, seq] each); no tokens added."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    if tokenizer.padding_side != "left":
        raise UserError("tokenizer must pad on the left (load it with interp.load_tokenizer)")
    return {k: v.to(device) if device is not None else v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def length_sorted_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 sorted by length (ties keep input order), cut into chunks of `batch_size`.

    Batching prompts of similar length wastes little on padding; write each chunk's results back at its
    indices (`out[chunk] = ...`) and the output keeps the input order.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
