"""In-memory probe data (for `train_layer_probes`) and the control task shared by all probe datamodules.

The control task (Hewitt & Liang 2019) gives every problem one random label drawn from the task's own label
distribution on the training split; both prompts of a problem share it. A probe can only score above chance
on it by memorising problems, so `selectivity = task accuracy - control accuracy` measures how much of a
probe's accuracy reflects the representation rather than the probe's capacity.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from interp.errors import UserError
from interp.stats import RunningMoments


def control_task_labels(labels: torch.Tensor, groups: torch.Tensor, train: torch.Tensor, seed: int) -> torch.Tensor:
    """One random label per group (problem), drawn from the empirical label distribution of the train rows.

    labels, groups: [n] int64; train: [n] bool. Returns [n] int64, constant within each group.
    """
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(labels.max()) + 1
    distribution = torch.bincount(labels[train], minlength=num_classes).double()
    unique, inverse = torch.unique(groups, return_inverse=True)
    per_group = torch.multinomial(distribution, len(unique), replacement=True, generator=generator)
    return per_group[inverse]


class TensorProbeDataModule(L.LightningDataModule):
    """In-memory twin for `train_layer_probes`: activations [n, n_layers, d_model], labels [n]."""

    def __init__(self, activations: torch.Tensor, labels: torch.Tensor, num_classes: int, val_fraction: float = 0.2,
                 batch_size: int = 64, seed: int = 0, groups: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if activations.ndim != 3 or activations.shape[0] != labels.shape[0]:
            raise UserError(f"activations {tuple(activations.shape)} must be [n, n_layers, d_model] with n = {labels.shape[0]}")
        if not 0 < val_fraction < 1:
            raise UserError(f"val_fraction {val_fraction} must be in (0, 1)")
        n = labels.shape[0]
        groups = torch.arange(n) if groups is None else groups
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(n * val_fraction))
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[perm[:n_val]] = True
        labels = labels.long()
        y_control = control_task_labels(labels, groups, ~is_val, seed)
        x = activations.float()
        self.splits = {"train": ~is_val, "val": is_val}
        self.datasets = {
            split: TensorDataset(x[mask], labels[mask], y_control[mask]) for split, mask in self.splits.items()
        }
        self.n_layers, self.d_model = activations.shape[1], activations.shape[2]
        self.num_classes, self.batch_size = num_classes, batch_size
        self.class_names = [str(c) for c in range(num_classes)]
        self.layers = list(range(self.n_layers))

    def train_moments(self) -> RunningMoments:
        return RunningMoments().update(self.datasets["train"].tensors[0])

    @staticmethod
    def _collate(rows):
        x, y, yc = zip(*rows)
        return {"x": torch.stack(x), "y": torch.stack(y), "y_control": torch.stack(yc)}

    def train_dataloader(self):
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True, collate_fn=self._collate)

    def val_dataloader(self):
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, collate_fn=self._collate)
