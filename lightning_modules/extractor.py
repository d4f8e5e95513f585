"""Runs prompts through the frozen backbone under `Trainer.predict` and returns residual-stream activations.

The backbone is deliberately NOT a registered submodule: Lightning must neither move a `device_map`-sharded
model nor put its weights into a checkpoint. Without a device_map it is moved to the trainer's device here.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from interp.activations import capture_residuals
from interp.backbone import BackboneSpec
from interp.positions import PositionSpec
from interp.prompts import post_instruction_ids


class ActivationExtractor(L.LightningModule):
    def __init__(self, backbone: BackboneSpec, layers: Sequence[int], positions: str = "last"):
        super().__init__()
        self.backbone_spec = backbone
        self.layers = list(layers)
        self.positions = PositionSpec.parse(positions)
        self._model = None  # the frozen backbone, loaded in setup
        self._post_ids: list[int] | None = None

    @property
    def backbone(self):
        return self._model

    def setup(self, stage: str) -> None:
        if self._model is not None:
            return
        model, tokenizer = self.backbone_spec.load()
        if self.backbone_spec.device_map is None:
            model.to(self.trainer.strategy.root_device)
        self._model = model
        if self.positions.kind == "post_instruction":
            self._post_ids = post_instruction_ids(tokenizer)

    def teardown(self, stage: str) -> None:
        self._model = None  # free the backbone (GPU memory) before probes train on the cache

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """batch: input_ids / attention_mask [b, s] (left padded), row_index [b], split [b], labels {name: [b]}."""
        activations = capture_residuals(
            self._model, batch["input_ids"], batch["attention_mask"], self.layers, self.positions, self._post_ids
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
