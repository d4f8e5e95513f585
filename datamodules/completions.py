"""(prompt, completion) token sequences for training through the frozen backbone (the steering vectors' sft
objective, `lightning_modules.steering`).

The problems, splits and chat templates are the prompt datamodule's (`ReasoningPromptsDataModule`): each problem's
reasoning prompt, with its gold solution as the completion, in that problem's split, so a problem never straddles
splits. Prompt and completion are tokenized separately (no BPE merge across the boundary) and items stay token id
lists: `interp.metrics.completion_logprobs` pads a batch (left) and scores the completion tokens only.
Batches: {"prompt_ids": list of [int], "completion_ids": list of [int], "rows": LongTensor [batch] (row indices
into `prompts.rows`)}, plus "dispreferred_ids" (list of [int]) with `pairs=True`: the same problem's bare final
answer, `The answer is \\boxed{<gold answer>}.` (BiPO's dispreferred completion: the answer with no reasoning).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.prompts import ReasoningPromptsDataModule
from datamodules.tensors import epoch_seeded_sampler
from interp.backbone import BackboneSpec
from interp.errors import UserError

SPLITS = ("train", "val", "test")


class CompletionDataModule(L.LightningDataModule):
    """Reasoning prompts + gold solutions of the prompt datamodule's problems, per split, as token ids."""

    def __init__(
        self,
        prompts: ReasoningPromptsDataModule,
        backbone: BackboneSpec | None = None,
        max_completion_tokens: int | None = 256,
        batch_size: int = 8,
        seed: int = 0,
        pairs: bool = False,
    ):
        """
        Args:
            prompts: the prompt datamodule (problems, splits, chat template); only its reasoning prompts are used.
            backbone: the frozen model trained through (its name also selects the prompts' tokenizer).
            max_completion_tokens: gold-solution tokens kept per problem (null: all); the loss covers these.
            batch_size: problems per training step.
            seed: the training order: a permutation per epoch drawn from (seed, epoch), so a resumed run sees
                the epochs an uninterrupted one would.
            pairs: also each problem's dispreferred completion, its bare final answer (the bipo objective).
        """
        super().__init__()
        self.backbone = backbone or BackboneSpec()
        prompts.bind_backbone(self.backbone)
        if max_completion_tokens is not None and max_completion_tokens < 1:
            raise UserError(f"max_completion_tokens must be >= 1 or null, got {max_completion_tokens}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts, self.max_completion_tokens = prompts, max_completion_tokens
        self.batch_size, self.seed, self.pairs = batch_size, seed, pairs
        self.items: dict[str, list[tuple]] | None = None  # split -> (prompt, completion, row[, dispreferred])

    @property
    def d_model(self) -> int:
        return self.backbone.hidden_size()

    @property
    def pad_id(self) -> int:
        tokenizer = self.prompts.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def setup(self, stage: str | None = None) -> None:
        """Tokenize every split's (reasoning prompt, gold solution) pairs (once)."""
        if self.items is not None:
            return
        self.prompts.setup(stage)
        rows = [row for row in self.prompts.rows if row.kind == "reasoning"]
        tokenizer = self.prompts.tokenizer
        prompt_ids = tokenizer([row.prompt for row in rows], add_special_tokens=False)["input_ids"]
        solution_ids = tokenizer([row.gold_solution for row in rows], add_special_tokens=False)["input_ids"]
        answers = tokenizer([f"The answer is \\boxed{{{row.gold_answer}}}." for row in rows],
                            add_special_tokens=False)["input_ids"]  # fmt: skip
        self.items = {split: [] for split in SPLITS}
        for row, prompt, solution, answer in zip(rows, prompt_ids, solution_ids, answers):
            if solution:
                item = (prompt, solution[: self.max_completion_tokens], row.row_index)
                self.items[row.split].append(item + (answer,) if self.pairs else item)
        if not self.items["train"]:
            raise UserError("no training problems with a gold solution: check data.prompts.sources")

    @staticmethod
    def collate(items: list[tuple]) -> dict:
        batch = {"prompt_ids": [item[0] for item in items], "completion_ids": [item[1] for item in items],
                 "rows": torch.tensor([item[2] for item in items], dtype=torch.long)}  # fmt: skip
        if len(items[0]) > 3:
            batch["dispreferred_ids"] = [item[3] for item in items]
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        items = self.items[split]
        if not items:
            raise UserError(f"no {split} problems: set data.prompts' {split}_fraction > 0")
        sampler = epoch_seeded_sampler(items, self.trainer, self.seed) if shuffle else None
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
