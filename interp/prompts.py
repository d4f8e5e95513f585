"""Chat-template formatting and the template's post-instruction tokens (for "post_instruction" positions)."""

from __future__ import annotations

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


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device=None) -> dict:
    """Left-padded batch {"input_ids", "attention_mask"} ([batch, seq] each); no tokens added."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    if tokenizer.padding_side != "left":
        raise UserError("tokenizer must pad on the left (load it with interp.load_tokenizer)")
    return {k: v.to(device) if device is not None else v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
