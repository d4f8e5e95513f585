"""Contrastive prompt pairs (reasoning vs control) from GSM8K/MATH problems, as a LightningDataModule.

Every problem gives two prompts that differ only in the instruction around the same question:
    reasoning: "{question}\\n\\nPlease reason step by step, and put your final answer within \\boxed{}."
    control:   restate | copy | topic   (read the same question, but do not solve it)
Both are wrapped in the backbone's own chat template (`interp.prompts.format_chat_prompt`), so a pair shares
the post-instruction template tokens (e.g. `<|im_end|>\\n<|im_start|>assistant\\n<think>\\n` for QwQ).

Rows are ordered problem by problem (reasoning row, then control row); both rows of a problem share its
`pair_index` and its split. Splits are drawn BY PROBLEM (seeded, stratified by dataset, subject and level),
so no question is seen in two splits (rows, splits and labels are built in datamodules/prompt_rows.py).
Integer labels per row (`LABELS`) feed the probes:
    reasoning  1 = reasoning prompt, 0 = control prompt
    dataset    index into DATASETS = ("gsm8k", "math", "toy_arithmetic")
    subject    index into the sorted MATH subjects present; -1 for GSM8K
    level      MATH level 1..5 -> 0..4; -1 when unknown (and for GSM8K)
    problem    problem_index
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import torch
from lightning import LightningDataModule
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.problems import DatasetSource, Problem, load_sources
from datamodules.prompt_rows import (
    REASONING_TEMPLATE,
    PromptRow,
    build_prompt_rows,
    check_template,
    encode_labels,
    label_names,
    resolve_control_template,
)
from interp.atomic import file_sha256
from interp.backbone import BackboneSpec, load_tokenizer
from interp.cache import SPLITS  # the "split" tensor encoding in batches
from interp.errors import UserError
from interp.prompts import tokenize_prompts

DATA_SPEC_VERSION = 1  # bump when the way rows or token ids are built changes


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What determines the token ids: the full tokenizer definition (vocab, merges, normalizer, pre-tokenizer,
    added tokens), the special tokens, the padding side and the chat template, as hashes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the tokenizer.json it would save, minus call-time state: a padded call sets padding
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.no_truncation()
        definition = copy.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {
        "class": type(tokenizer).__name__,
        "definition_sha256": sha(definition),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": tokenizer.padding_side,
        "chat_template_sha256": sha(tokenizer.chat_template or ""),
    }


class PromptCollator:
    """Row indices -> a left-padded batch (see ReasoningPromptsDataModule.predict_dataloader)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rows: list[PromptRow], labels: dict[str, torch.Tensor]):
        self.tokenizer, self.rows, self.labels = tokenizer, rows, labels

    def __call__(self, row_indices: list[int]) -> dict:
        index = torch.tensor(row_indices, dtype=torch.long)  # [b]
        batch = tokenize_prompts(self.tokenizer, [self.rows[i].prompt for i in row_indices])
        return {
            "input_ids": batch["input_ids"].long(),  # [b, s], left padded
            "attention_mask": batch["attention_mask"].long(),  # [b, s]
            "row_index": index,
            "labels": {name: values[index] for name, values in self.labels.items()},  # [b] each
            "split": torch.tensor([SPLITS.index(self.rows[i].split) for i in row_indices], dtype=torch.long),
        }


class ReasoningPromptsDataModule(LightningDataModule):
    """GSM8K/MATH problems -> chat-formatted reasoning/control prompt pairs, batched for activation extraction.

    After `setup()`: `tokenizer`, `problems` (all loaded problems), `rows` (list[PromptRow]) and `label_names`.
    Set `exclude_rows` (row indices) to skip rows in `predict_dataloader`, e.g. to resume an extraction.
    """

    def __init__(
        self,
        backbone: str | None = None,
        sources: list[DatasetSource] | None = None,
        control: str = "restate",
        reasoning_template: str | None = None,
        control_template: str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_prompt_tokens: int | None = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            backbone: Whose tokenizer and chat template format the prompts: hub id, local directory or
                built-in (tiny, tiny-qwq, tiny-r1-distill). None: the backbone of the datamodule that reads
                these prompts (`CachedActivationDataModule` fills it in), or "tiny" when used alone.
            sources: Problem sets; default: 64 GSM8K test + 64 MATH-500 problems from the embedded copies.
            control: Built-in control instruction: restate | copy | topic (any name if control_template is set).
            reasoning_template: Reasoning instruction with the placeholder {question}; default: step by step,
                final answer in \\boxed{}.
            control_template: Control instruction with {question}; overrides the built-in named by `control`.
            val_fraction: Fraction of problems (pairs) in the val split.
            test_fraction: Fraction of problems (pairs) in the test split.
            seed: Seeds the problem sample (source limits) and the split.
            max_prompt_tokens: Drop problems whose longer prompt exceeds this many tokens (never truncated).
            batch_size: Prompts per predict batch.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if sources is None:
            sources = [DatasetSource("gsm8k", limit=64), DatasetSource("math", limit=64)]
        sources = [s if isinstance(s, DatasetSource) else DatasetSource(**s) for s in sources]
        if not sources:
            raise UserError("sources is empty; give at least one DatasetSource")
        resolve_control_template(control, control_template)
        if reasoning_template is not None:
            check_template(reasoning_template, "reasoning_template")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1:
            raise UserError(f"val_fraction + test_fraction must be < 1 (train needs problems), "
                            f"got {val_fraction} + {test_fraction}")  # fmt: skip
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise UserError(f"max_prompt_tokens must be >= 1 or null, got {max_prompt_tokens}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.backbone = backbone
        self.sources = sources
        self.control = control
        self.reasoning_template = reasoning_template if reasoning_template is not None else REASONING_TEMPLATE
        self.control_template = resolve_control_template(control, control_template)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size, self.num_workers = batch_size, num_workers
        self.exclude_rows: set[int] = set()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.problems: list[Problem] | None = None
        self.rows: list[PromptRow] | None = None
        self.label_names: dict[str, list[str]] | None = None
        self._labels: dict[str, torch.Tensor] | None = None
        self._spec: dict | None = None
        self._revision, self._trust_remote_code = None, False  # the reading datamodule's (bind_backbone)

    def bind_backbone(self, spec: BackboneSpec) -> None:
        """Format with the reading datamodule's backbone: fill in an unset `backbone`, never overwrite it (one
        model decides the tokenizer and what is read); a different one already set is a UserError. The tokenizer
        and config then come from the spec's revision (a pinned model's own chat template, not the hub's newest)."""
        name_or_path = spec.name_or_path
        self._revision, self._trust_remote_code = spec.revision, spec.trust_remote_code
        if self.backbone is None:
            self.backbone = name_or_path
        elif self.backbone != name_or_path:
            raise UserError(f"data.prompts.backbone {self.backbone!r} differs from data.backbone "
                            f"{name_or_path!r}: leave data.prompts.backbone unset")  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, the problems and the rows (once; later calls do nothing)."""
        if self.rows is not None:
            return
        if self.backbone is None:
            self.backbone = "tiny"
        self.tokenizer = load_tokenizer(self.backbone, self._revision, self._trust_remote_code)
        self.problems = load_sources(self.sources, self.seed)
        self.rows = build_prompt_rows(
            self.problems, self.tokenizer, control=self.control, reasoning_template=self.reasoning_template,
            control_template=self.control_template, val_fraction=self.val_fraction,
            test_fraction=self.test_fraction, seed=self.seed, max_prompt_tokens=self.max_prompt_tokens,
        )  # fmt: skip
        self.label_names = label_names(self.rows)
        self._labels = encode_labels(self.rows, self.label_names)
        prompts = [r.prompt for r in self.rows]
        self.prompt_lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        spec = BackboneSpec(self.backbone, revision=self._revision, trust_remote_code=self._trust_remote_code)
        context = getattr(spec.config().get_text_config(), "max_position_embeddings", None)
        if context is not None and max(self.prompt_lengths) > context:  # the model would read positions it never saw
            raise UserError(f"the longest prompt has {max(self.prompt_lengths)} tokens, more than the context of "
                            f"{self.backbone} ({context} tokens): set data.prompts.max_prompt_tokens <= {context}")

    def predict_dataloader(self) -> DataLoader:
        """Every row not in `exclude_rows`, longest prompts first (batches of similar length waste little
        compute on padding, and an out-of-memory error shows up in the first batch). Batches:
        {"input_ids": [b, s] left padded, "attention_mask": [b, s], "row_index": [b],
         "labels": {name: [b] for name in LABELS}, "split": [b] (0 train, 1 val, 2 test)}, all LongTensor."""
        self.setup()
        keep = [r.row_index for r in self.rows if r.row_index not in self.exclude_rows]
        keep.sort(key=lambda i: (-self.prompt_lengths[i], i))
        return DataLoader(
            keep, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=PromptCollator(self.tokenizer, self.rows, self._labels),
        )  # fmt: skip

    def data_spec(self) -> dict:
        """JSON-able description of everything that determines the rows and their token ids (for cache keys).

        Identical across processes for the same config, data files and tokenizer; changes when any of them
        does. Includes a digest of the rows themselves, so a change in how rows are built changes it too.
        """
        if self._spec is not None:
            return self._spec
        self.setup()
        sources = []
        for source in self.sources:
            entry = dataclasses.asdict(source)
            if source.is_local and not source.generated:  # generated rows: the rows digest below covers them
                entry["sha256"] = file_sha256(source.local_file())
            sources.append(entry)
        rows_json = json.dumps([dataclasses.astuple(r) for r in self.rows], ensure_ascii=False)
        self._spec = {
            "version": DATA_SPEC_VERSION,
            "sources": sources,
            "control": self.control,
            "reasoning_template": self.reasoning_template,
            "control_template": self.control_template,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "max_prompt_tokens": self.max_prompt_tokens,
            "tokenizer": {"backbone": self.backbone, **tokenizer_identity(self.tokenizer)},
            "label_names": self.label_names,
            "num_rows": len(self.rows),
            "rows_sha256": hashlib.sha256(rows_json.encode()).hexdigest(),
        }
        return self._spec


def problem_pairs(
    datamodule,
    split: str,
    n: int | None = None,
    seed: int = 0,
    exclude: Sequence[int] = (),
    rows: Sequence[int] | None = None,
) -> list[tuple[PromptRow, PromptRow]]:
    """Up to n (reasoning PromptRow, control PromptRow) pairs of `split`, a seeded sample of its problems in
    pair order (n None: all), leaving out the problems whose pair_index is in `exclude` (e.g. those that chose
    a direction). `rows` (row indices, e.g. the rows an activation cache holds): only pairs with both rows in it.
    `datamodule`: a ReasoningPromptsDataModule or one holding it as `.prompts`. No pair left: UserError."""
    prompts = getattr(datamodule, "prompts", datamodule)
    prompts.setup()
    by_pair: dict[int, dict[str, PromptRow]] = {}
    for row in prompts.rows if rows is None else [prompts.rows[i] for i in rows]:
        if row.split == split:
            by_pair.setdefault(row.pair_index, {})[row.kind] = row
    pairs = sorted(p for p, kinds in by_pair.items() if {"reasoning", "control"} <= set(kinds))
    if pairs and not set(pairs) - set(exclude):
        raise UserError(f"no {split} problems left once the {len(set(exclude))} used to select the direction are "
                        f"excluded: raise the prompts' {split}_fraction")  # fmt: skip
    pairs = [p for p in pairs if p not in set(exclude)]
    if not pairs:
        raise UserError(f"no {split} problems: set the prompts' {split}_fraction > 0")
    if n is not None:
        if n < 1:
            raise UserError(f"the number of prompts must be >= 1, got {n}")
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n]
        pairs = [pairs[i] for i in sorted(chosen.tolist())]
    return [(by_pair[p]["reasoning"], by_pair[p]["control"]) for p in pairs]
