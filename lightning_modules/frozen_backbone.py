"""The frozen backbone a study module reads through but never owns.

`FrozenBackbone` is a plain object, not an `nn.Module`: assigned to a LightningModule it is not a submodule, so
its weights never enter the module's parameters, state dict or checkpoints, and Lightning never moves it (a
`device_map`-sharded model must stay where accelerate put it). The module places it with `model(device)`:
load it in `setup` (outside the inference mode of validation, whose tensors could not be trained through later)
at the trainer's root device; later calls with the same device are free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp.backbone import BackboneSpec
from interp.errors import UserError


class FrozenBackbone:
    """A backbone from a `BackboneSpec` (loaded on first use) or an already loaded causal LM (+ its tokenizer).

    keep: what to hold on to of the loaded model (default: all of it), e.g. `interp.lens.LensReadout` keeps only
    the final norm and the LM head, so the rest of the backbone is freed right after loading.
    Sharded (the spec has a device_map, or the loaded model an hf_device_map): `model(device)` never moves it.
    """

    def __init__(
        self,
        source: BackboneSpec | nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        keep: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.spec = source if isinstance(source, BackboneSpec) else None
        self._keep = keep
        self._model: nn.Module | None = None
        self._tokenizer = tokenizer
        self._device: torch.device | None = None  # where `model` last put it
        if self.spec is None:
            self.sharded = bool(getattr(source, "hf_device_map", None))
            self._model = keep(source) if keep else source
        else:
            self.sharded = self.spec.device_map is not None

    @classmethod
    def from_layout(cls, entry: dict | None, keep: Callable[[nn.Module], nn.Module] | None = None):
        """The backbone a checkpoint layout names (`layout_entry`), loaded on first use; None for None."""
        return None if entry is None else cls(BackboneSpec(**entry), keep=keep)

    def layout_entry(self) -> dict | None:
        """The spec as a checkpoint stores it (None for a backbone given as a loaded model)."""
        return dataclasses.asdict(self.spec) if self.spec else None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self, device: torch.device | None = None) -> None:
        if self.spec is None:
            raise UserError("the backbone was released and has no spec to load it again from")
        spec = self.spec
        if spec.replica_gpus is not None and device is not None and device.type == "cuda":
            # this process's copy goes on its own GPU and the next replica_gpus - 1 (a model-parallel group)
            spec = spec.for_replica(device.index or 0, lambda gpu: torch.cuda.mem_get_info(gpu)[0])
        model, self._tokenizer = spec.load()
        self._model = self._keep(model) if self._keep else model
        self._device = None

    def model(self, device: torch.device | str) -> nn.Module:
        """The (kept part of the) frozen model, loaded if needed and moved to `device` unless sharded."""
        device = torch.device(device)
        if self._model is None:
            self._load(device)
        if not self.sharded and self._device != device:
            self._model.to(device)
            self._device = device
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        if self._model is None:
            self._load()
        return self._tokenizer

    def release(self) -> None:
        """Drop the weights (e.g. to free GPU memory once extraction is done); a spec loads them again on use."""
        self._model = None
        self._device = None


class ReadsBackbone:
    """Mixin of the study modules that read through a frozen backbone (directions: all of it; tuned lens: its
    readout, `backbone_keep = LensReadout`). `backbone` is a `FrozenBackbone` or None (not yet attached)."""

    backbone: FrozenBackbone | None = None
    backbone_keep: Callable[[nn.Module], nn.Module] | None = None  # what of the loaded model to keep (None: all)

    def attach_backbone(self, backbone: BackboneSpec | nn.Module, tokenizer: PreTrainedTokenizerBase | None = None):
        """Read through `backbone`: a BackboneSpec (loaded on first use) or a loaded causal LM (+ its tokenizer),
        moved to this module's device unless it has an hf_device_map."""
        self.backbone = FrozenBackbone(backbone, tokenizer, keep=self.backbone_keep)

    def backbone_from_layout(self, entry: dict | None) -> None:
        """After loading a checkpoint: the backbone its layout names (loaded on first use), unless attached."""
        if self.backbone is None:
            self.backbone = FrozenBackbone.from_layout(entry, keep=self.backbone_keep)

    def place_backbone(self, spec: BackboneSpec, device: torch.device) -> None:
        """In `setup`: attach the data's backbone unless one is loaded, and load and place it on `device` now
        (not later inside a no-grad validation step)."""
        if self.backbone is None or not self.backbone.loaded:
            self.attach_backbone(spec)
        self.backbone.model(device)

    @property
    def backbone_spec(self) -> BackboneSpec | None:
        return self.backbone.spec if self.backbone else None

    @property
    def backbone_model(self) -> nn.Module:
        """The (kept part of the) frozen backbone on this module's device unless sharded, loaded on first use."""
        if self.backbone is None:
            raise UserError(f"the {type(self).__name__} has no backbone: call attach_backbone() or fit it first")
        return self.backbone.model(self.device)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        self.backbone_model  # noqa: B018 (loads it if needed)
        return self.backbone.tokenizer
