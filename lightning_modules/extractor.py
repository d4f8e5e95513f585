"""Runs prompts through the frozen backbone under `Trainer.predict` and returns residual-stream activations.

The backbone is a `FrozenBackbone`, not a submodule (see frozen_backbone.py): loaded in `setup` on the trainer's
device (where accelerate put it when sharded), freed in `teardown`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from interp.activations import capture_residuals
from interp.backbone import BackboneSpec
from interp.positions import PositionSpec
from interp.prompts import post_instruction_ids
from lightning_modules.frozen_backbone import FrozenBackbone


class ActivationExtractor(L.LightningModule):
    """`Trainer.predict` module: residual-stream activations at `layers` / `positions` of each prompt batch
    (module docstring); `lightning_modules.cache_writer.ActivationCacheWriter` writes them into the cache."""

    def __init__(self, backbone: BackboneSpec, layers: Sequence[int], positions: str = "last"):
        super().__init__()
        self.backbone = FrozenBackbone(backbone)
        self.layers = list(layers)
        self.positions = PositionSpec.parse(positions)
        self._post_ids: list[int] | None = None

    def setup(self, stage: str) -> None:
        self.backbone.model(self.trainer.strategy.root_device)
        if self.positions.kind == "post_instruction":
            self._post_ids = post_instruction_ids(self.backbone.tokenizer)

    def teardown(self, stage: str) -> None:
        self.backbone.release()  # free the backbone (GPU memory) before probes train on the cache

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """batch: input_ids / attention_mask [b, s] (left padded), row_index [b], split [b], labels {name: [b]}."""
        activations = capture_residuals(
            self.backbone.model(self.device), batch["input_ids"], batch["attention_mask"], self.layers,
            self.positions, self._post_ids,
        )  # [b, n_pos, n_layers, d_model] float32 on the CPU
        return {
            "activations": activations,
            "row_index": batch["row_index"].cpu(),
            "split": batch["split"].cpu(),
            "labels": {name: value.cpu() for name, value in batch["labels"].items()},
        }

    def configure_optimizers(self):  # never trained
        return None

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        raise NotImplementedError("ActivationExtractor only runs under Trainer.predict")
