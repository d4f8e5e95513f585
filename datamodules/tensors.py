"""In-memory probe data (for `train_layer_probes`) and the control task shared by all probe datamodules.

Control task (Hewitt & Liang 2019). Every row has a control TYPE, a feature that recurs across splits, and its
control label is a fixed, seeded random function of the type alone:
    r     = first 8 bytes of sha256(f"{seed}\\x1f{type}"), big-endian, modulo n_train
    label = the class k with cum[k-1] <= r < cum[k], cum = cumulative per-class label counts of the train rows
so every type's label is one draw from the task's label distribution on the train split, the same in every split,
process and run (hashlib, not Python's salted hash()). A probe beats chance on the held-out control task only by
having learned type -> label on the train rows, i.e. when the representation lets a linear map tell the types
apart; `selectivity = task accuracy - control accuracy` discounts that capacity. A held-out row whose type never
occurs among the train rows is at chance by construction: `control_type_coverage` counts the rows that are not.

Types: the cached pipeline (datamodules/activations.py) uses `question_type(question)`, the problem's first word,
so both prompts of a problem share a type and e.g. "what", "find", "john" recur across problems and splits.
`TensorProbeDataModule` takes `control_types=` ([n] str or int); without it each group is its own type, no type
recurs, and the held-out control accuracy is chance by construction.

Splits of `TensorProbeDataModule`: by `groups=` ([n] int, e.g. the problem id) when given, so a group never
straddles train and val; without groups every row is its own group, i.e. a ROW-wise split, which leaks when
rows are not independent (e.g. the reasoning and control prompts of one problem).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from interp.errors import UserError
from interp.stats import RunningMoments

_WORD = re.compile(r"[^\W_]+")  # a run of Unicode letters/digits
QUESTION_TYPE = "first word of the problem's question, lower-cased, punctuation stripped"  # for reports


def question_type(question: str) -> str:
    """The control type of a problem: the first word of its question, lower-cased, punctuation stripped (the first
    run of Unicode letters/digits, e.g. "$\\frac{1}{2}$ of..." -> "frac"); "" when there is none."""
    match = _WORD.search(question.lower())
    return match.group() if match else ""


def _type_keys(types: Sequence | torch.Tensor, n: int) -> list[str]:
    keys = [str(t) for t in (types.tolist() if isinstance(types, torch.Tensor) else types)]
    if len(keys) != n:
        raise UserError(f"control types have {len(keys)} entries, expected one per row ({n})")
    return keys


def control_task_labels(
    labels: torch.Tensor, types: Sequence | torch.Tensor, train: torch.Tensor, seed: int
) -> torch.Tensor:
    """Control labels [n] int64: a fixed seeded function of each row's type (see the module docstring).

    labels: [n] int64 task labels (only the train rows' are read); types: [n] str or int; train: [n] bool.
    """
    keys = _type_keys(types, len(labels))
    counts = torch.bincount(labels[train], minlength=int(labels.max()) + 1)  # [num_classes]
    n_train = int(counts.sum())
    if n_train == 0:
        raise UserError("the control task needs at least one training row")
    cumulative = counts.cumsum(0).tolist()  # [num_classes]
    per_type = {}
    for key in dict.fromkeys(keys):
        digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
        r = int.from_bytes(digest[:8], "big") % n_train
        per_type[key] = bisect.bisect_right(cumulative, r)
    return torch.tensor([per_type[key] for key in keys], dtype=torch.long)


def epoch_seeded_sampler(dataset, trainer: L.Trainer | None, seed: int) -> DistributedSampler:
    """The shuffled train order of every datamodule: Lightning calls set_epoch on it, so epoch e's permutation is
    seeded by (seed, e) alone, and a run resumed from a checkpoint sees the same batches as one that never stopped
    (DataLoader(shuffle=True) draws from the global RNG, which checkpoints do not hold). Under DDP each rank gets
    its share, as from Lightning's own DistributedSampler."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


def control_type_seen(types: Sequence | torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """[n] bool: whether the row's type occurs among the train rows (the rows the control task can score)."""
    keys = _type_keys(types, len(train))
    train_keys = {key for key, is_train in zip(keys, train.tolist()) if is_train}
    return torch.tensor([key in train_keys for key in keys], dtype=torch.bool)


def group_split(groups: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """[n] bool, True = val: a seeded random round(n_groups * val_fraction) groups (at least 1, at most
    n_groups - 1) go to val, all rows of a group together."""
    unique, inverse = torch.unique(groups, return_inverse=True)
    if len(unique) < 2:
        raise UserError(f"splitting needs at least 2 groups, got {len(unique)}")
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(len(unique) * val_fraction)), len(unique) - 1)
    val_group = torch.zeros(len(unique), dtype=torch.bool)
    val_group[perm[:n_val]] = True
    return val_group[inverse]


class TensorProbeDataModule(L.LightningDataModule):
    """In-memory twin for `train_layer_probes`: activations [n, n_layers, d_model], labels [n].

    groups: [n] int (e.g. the problem id); rows of one group stay in one split. None = row-wise split.
    control_types: [n] str or int, the control-task type of each row; None = each group is its own type.
    After construction: `splits` ({"train", "val"} -> [n] bool), `train_class_counts` ([num_classes] int64) and
    `control_type_coverage` (split -> (rows whose type occurs in train, rows)).
    """

    def __init__(self, activations: torch.Tensor, labels: torch.Tensor, num_classes: int, val_fraction: float = 0.2,
                 batch_size: int = 64, seed: int = 0, groups: torch.Tensor | None = None,
                 control_types: Sequence | torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if activations.ndim != 3 or activations.shape[0] != labels.shape[0]:
            raise UserError(f"activations {tuple(activations.shape)} must be [n, n_layers, d_model] with n = {labels.shape[0]}")
        if not 0 < val_fraction < 1:
            raise UserError(f"val_fraction {val_fraction} must be in (0, 1)")
        n = labels.shape[0]
        groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
        if groups.shape != (n,):
            raise UserError(f"groups {tuple(groups.shape)} must be [n] with n = {n}")
        is_val = group_split(groups, val_fraction, seed)
        labels = labels.long()
        types = groups if control_types is None else control_types
        y_control = control_task_labels(labels, types, ~is_val, seed)
        seen = control_type_seen(types, ~is_val)
        x = activations.float()
        self.splits = {"train": ~is_val, "val": is_val}
        self.datasets = {
            split: TensorDataset(x[mask], labels[mask], y_control[mask]) for split, mask in self.splits.items()
        }
        self.train_class_counts = torch.bincount(labels[~is_val], minlength=num_classes)
        self.control_type_coverage = {
            split: (int(seen[mask].sum()), int(mask.sum())) for split, mask in self.splits.items()
        }
        self.n_layers, self.d_model = activations.shape[1], activations.shape[2]
        self.num_classes, self.batch_size, self.seed = num_classes, batch_size, seed
        self.class_names = [str(c) for c in range(num_classes)]
        self.layers = list(range(self.n_layers))

    def train_moments(self) -> RunningMoments:
        return RunningMoments().update(self.datasets["train"].tensors[0])

    @staticmethod
    def _collate(rows):
        x, y, yc = zip(*rows)
        return {"x": torch.stack(x), "y": torch.stack(y), "y_control": torch.stack(yc)}

    def train_dataloader(self):
        sampler = epoch_seeded_sampler(self.datasets["train"], self.trainer, self.seed)
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate)

    def val_dataloader(self):
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, collate_fn=self._collate)
