"""The toy pair's training text, as padded token batches for `lightning_modules.toy_lm.ToyLMModule`.

Prompts come from the project's own prompt builder (the templates of datamodules/prompt_rows.py inside the
model's chat template), so the toy models are trained on exactly the prompts the study later feeds them.
Completions are what the model writes after the template's generation prompt (`...assistant\\n<think>\\n`):
- reasoning: the worked solution, `</think>`, then "The answer is \\boxed{n}." (`reasoning_completion`);
- control (copy / restate / topic): `</think>` at once, then the control task's answer (`control_completion`).
Each completion ends with the tokenizer's EOS. Only completion tokens are trained on (prompt labels are -100).
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from datamodules.prompt_rows import CONTROL_TEMPLATES, REASONING_TEMPLATE, fill_template
from interp.prompts import format_chat_prompt
from interp.restricted_vocab import RestrictedVocab
from interp.toy_arithmetic import ToyProblem, control_output, question_text, worked_solution

IGNORE = -100


def reasoning_completion(problem: ToyProblem) -> str:
    return f"{worked_solution(problem)}\n</think>\n\nThe answer is \\boxed{{{problem.answer}}}."


def control_completion(problem: ToyProblem, control: str) -> str:
    return f"</think>\n\n{control_output(problem, control)}"


def reasoning_prompt(tokenizer, problem: ToyProblem) -> str:
    return format_chat_prompt(tokenizer, fill_template(REASONING_TEMPLATE, question_text(problem)))


def control_prompt(tokenizer, problem: ToyProblem, control: str) -> str:
    return format_chat_prompt(tokenizer, fill_template(CONTROL_TEMPLATES[control], question_text(problem)))


def solver_texts(
    tokenizer, problems: list[ToyProblem], control_fraction: float, seed: int
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs written from the generator's own solutions: every problem's reasoning pair,
    and for a seeded `control_fraction` of the total a control pair (control task drawn uniformly)."""
    rng = random.Random(seed)
    out = []
    for problem in problems:
        out.append((reasoning_prompt(tokenizer, problem), reasoning_completion(problem)))
        if rng.random() < control_fraction / (1 - control_fraction):
            control = rng.choice(sorted(CONTROL_TEMPLATES))
            out.append((control_prompt(tokenizer, problem, control), control_completion(problem, control)))
    return out


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS ids, prompt length) per pair; full-vocabulary ids."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    return [(p + c + [tokenizer.eos_token_id], len(p)) for p, c in zip(prompts, completions)]


class ToyCorpusDataModule(L.LightningDataModule):
    """Seeded draws with replacement from tokenized (ids, prompt length) examples, `num_samples` in all.

    Batches: {"input_ids", "attention_mask", "labels"}, each [batch, longest] LongTensor, right padded, in the
    restricted vocabulary's ids; labels are the input ids on completion tokens and -100 elsewhere (the model
    shifts them)."""

    def __init__(self, examples: list[tuple[list[int], int]], vocab: RestrictedVocab, batch_size: int,
                 num_samples: int, seed: int = 0):  # fmt: skip
        super().__init__()
        self.examples, self.vocab = examples, vocab
        self.batch_size, self.num_samples, self.seed = batch_size, num_samples, seed

    def train_dataloader(self) -> DataLoader:
        sampler = RandomSampler(self.examples, replacement=True, num_samples=self.num_samples,
                                generator=torch.Generator().manual_seed(self.seed))  # fmt: skip
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.zeros(len(items), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(items), longest, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(items):
            encoded = self.vocab.encode(torch.tensor(ids))
            input_ids[row, : len(ids)] = encoded
            attention_mask[row, : len(ids)] = 1
            labels[row, prompt_length : len(ids)] = encoded[prompt_length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
