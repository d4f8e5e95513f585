"""Reasoning / control prompt rows from problems: the templates, the split by problem, the integer labels.

Plain functions under `ReasoningPromptsDataModule` (datamodules/prompts.py, whose docstring describes the rows
and labels); `DATA_SPEC_VERSION` there must be bumped when the way rows are built here changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from datamodules.problems import DATASETS, Problem
from interp.cache import SPLITS
from interp.errors import UserError
from interp.prompts import check_ends_with_template, format_chat_prompt, post_instruction_ids

# Templates: the literal "{question}" is replaced by the question; every other character (braces included) is
# kept as written, so "\boxed{}" needs no escaping in a YAML config.
REASONING_TEMPLATE = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
CONTROL_TEMPLATES = {
    "restate": "{question}\n\nRestate the problem above in your own words. Do not solve it and do not give an answer.",
    "copy": "{question}\n\nCopy the text above exactly, word for word. Do not solve it.",
    "topic": "{question}\n\nName the topic of the problem above in a few words. Do not solve it.",
}
LABELS = ("reasoning", "dataset", "subject", "level", "problem")
KINDS = ("control", "reasoning")  # the "reasoning" label encoding


def fill_template(template: str, question: str) -> str:
    return template.replace("{question}", question)


def check_template(template: str, what: str) -> None:
    if not isinstance(template, str) or "{question}" not in template:
        raise UserError(f"{what} must contain the placeholder {{question}}, got {template!r:.80}")


def resolve_control_template(control: str, control_template: str | None = None) -> str:
    """The control instruction: the user's template if given, else the built-in one named `control`."""
    if control_template is not None:
        check_template(control_template, "control_template")
        return control_template
    if control not in CONTROL_TEMPLATES:
        raise UserError(f"unknown control {control!r}; expected one of {sorted(CONTROL_TEMPLATES)} "
                        "(or give control_template)")  # fmt: skip
    return CONTROL_TEMPLATES[control]


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a reasoning/control pair, with its problem's fields."""

    row_index: int  # 0..N-1, position in the row list
    problem_index: int  # index into the problem list given to build_prompt_rows
    pair_index: int  # == problem_index: the reasoning and control rows of one problem share it
    kind: str  # "reasoning" | "control"
    prompt: str  # chat-formatted text; tokenize with add_special_tokens=False
    split: str  # "train" | "val" | "test" (the same for both rows of a pair)
    problem_id: str
    dataset: str
    question: str
    gold_answer: str
    gold_solution: str
    subject: str | None
    level: int | None


def split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Problems per split: rounded fractions; with n >= 3 every split with a fraction > 0 gets >= 1 and train >= 1."""
    n_val, n_test = int(val_fraction * n + 0.5), int(test_fraction * n + 0.5)
    if n >= 3:
        n_val, n_test = max(n_val, int(val_fraction > 0)), max(n_test, int(test_fraction > 0))
    while n - n_val - n_test < 1 and n_val + n_test > 0:  # keep train non-empty
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def split_problems(problems: list[Problem], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """The split of each problem (same order), seeded and stratified by (dataset, subject, level).

    Problems are sorted by stratum with a seeded random order inside each stratum, then the splits are dealt
    along that order by smooth weighted round robin: the totals are exactly `split_counts`, and every stratum
    gets close to its proportional share of each split.
    """
    n = len(problems)
    counts = split_counts(n, val_fraction, test_fraction)
    shuffle = np.random.default_rng(seed).permutation(n).tolist()
    order = sorted(range(n), key=lambda i: (problems[i].dataset, problems[i].subject or "",
                                            problems[i].level or 0, shuffle[i]))  # fmt: skip
    credit = dict.fromkeys(SPLITS, 0)
    splits = [""] * n
    for i in order:
        for name in SPLITS:
            credit[name] += counts[name]
        pick = max(SPLITS, key=credit.__getitem__)
        credit[pick] -= n
        splits[i] = pick
    return splits


def build_prompt_rows(
    problems: list[Problem],
    tokenizer: PreTrainedTokenizerBase,
    control: str = "restate",
    reasoning_template: str = REASONING_TEMPLATE,
    control_template: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
) -> list[PromptRow]:
    """Two rows per problem (reasoning, then control), split by problem.

    A problem whose longer prompt has more than `max_prompt_tokens` tokens is dropped whole (prompts are never
    truncated: that would cut off the template). Raises UserError when nothing is left, when a prompt holds
    the BOS token twice, or when a prompt does not end with the template's post-instruction tokens.
    """
    check_template(reasoning_template, "reasoning_template")
    control_text = resolve_control_template(control, control_template)
    pairs = [(format_chat_prompt(tokenizer, fill_template(reasoning_template, p.question)),
              format_chat_prompt(tokenizer, fill_template(control_text, p.question))) for p in problems]  # fmt: skip
    texts = [text for pair in pairs for text in pair]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    for text, token_ids in zip(texts, ids):
        if bos is not None and token_ids.count(bos) > 1:
            raise UserError(f"a prompt holds the BOS token {tokenizer.bos_token!r} twice: {text[:80]!r}")
    check_ends_with_template(ids, post_instruction_ids(tokenizer), texts=texts)
    lengths = [max(len(ids[2 * i]), len(ids[2 * i + 1])) for i in range(len(problems))]
    kept = [i for i, n in enumerate(lengths) if max_prompt_tokens is None or n <= max_prompt_tokens]
    if not kept:
        raise UserError(f"no problem fits max_prompt_tokens={max_prompt_tokens} "
                        f"(the shortest pair needs {min(lengths, default=0)} tokens)")  # fmt: skip
    if len(kept) < len(problems):
        warnings.warn(f"dropped {len(problems) - len(kept)} of {len(problems)} problems whose longer prompt has more "
                      f"than max_prompt_tokens={max_prompt_tokens} tokens (the longest has {max(lengths)})",
                      stacklevel=2)  # fmt: skip
    splits = split_problems([problems[i] for i in kept], val_fraction, test_fraction, seed)
    rows: list[PromptRow] = []
    for i, split in zip(kept, splits):
        p = problems[i]
        for kind, prompt in zip(("reasoning", "control"), pairs[i]):
            rows.append(PromptRow(
                row_index=len(rows), problem_index=i, pair_index=i, kind=kind, prompt=prompt, split=split,
                problem_id=p.problem_id, dataset=p.dataset, question=p.question, gold_answer=p.gold_answer,
                gold_solution=p.gold_solution, subject=p.subject, level=p.level,
            ))  # fmt: skip
    return rows


def label_names(rows: list[PromptRow]) -> dict[str, list[str]]:
    """Class names per label ("problem" omitted: its classes are the problem indices)."""
    subjects = sorted({r.subject for r in rows if r.dataset == "math" and r.subject is not None})
    return {
        "reasoning": list(KINDS),
        "dataset": list(DATASETS),
        "subject": subjects,
        "level": [f"Level {k}" for k in range(1, 6)],
    }


def encode_labels(rows: list[PromptRow], names: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """Integer labels, one LongTensor [n_rows] per name in LABELS, in row order (see the module docstring)."""
    names = label_names(rows) if names is None else names
    subject_index = {s: k for k, s in enumerate(names["subject"])}
    columns = {
        "reasoning": [KINDS.index(r.kind) for r in rows],
        "dataset": [DATASETS.index(r.dataset) for r in rows],
        "subject": [subject_index.get(r.subject, -1) if r.dataset == "math" else -1 for r in rows],
        "level": [r.level - 1 if r.level is not None else -1 for r in rows],
        "problem": [r.problem_index for r in rows],
    }
    return {name: torch.tensor(columns[name], dtype=torch.long) for name in LABELS}
