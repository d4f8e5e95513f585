"""Learnable steering vectors trained through the frozen backbone.

One vector per steered layer l, added to the residual stream at `blocks.{l}.resid_post`
(`interp.interventions.AddTrainableVectors`, the same addition as `AddDirection`) on the tokens `apply_to` selects:
"all", "prompt" (the prompt's tokens) or "response" (the completion's). The backbone stays frozen: its parameters
get no gradients and no optimizer state, and checkpoints hold only `vectors` (+ the layout and the run config).

Objectives, validation and the trainable-parameter count: `lightning_modules.steering_objective` (shared with the
LoRA baseline, `lightning_modules.steering_lora`).
Optional `max_norm` caps each vector's norm after every optimizer step (a projection, not a penalty).
Initialisation: "zeros", "random" (N(0, 1/d_model) per coordinate, i.e. norm ~1, times init_scale) or a
directions run's `reasoning_directions.safetensors` (its selected position's direction at each steered layer,
times init_scale; the file's backbone fingerprint and d_model must match the data's backbone).

Metric keys: those of the objective module, and val/vector_norm/L{layer:02d}; ModelCheckpoint monitors val/nll.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from interp.errors import UserError
from interp.interventions import AddTrainableVectors
from lightning_modules.steering_objective import SteeringObjectiveModule

APPLY_TO = {"all": "all", "prompt": "prompt", "response": "generated"}  # config name -> AddTrainableVectors'
INITS = ("zeros", "random", "directions")


def selected_directions(path, layers: list[int], backbone, d_model: int, what: str) -> tuple[torch.Tensor, int]:
    """A directions run's reasoning_directions.safetensors read for steering: ([len(layers), d_model] its selected
    position's direction at each of `layers`, that position). UserError (naming `what`, the option that gave
    the path) when the file comes from another backbone than `backbone` (a BackboneSpec: fingerprint of the
    weights) or another d_model, has no selection, or lacks a layer."""
    from interp.directions import load_directions

    directions, meta = load_directions(path)  # [n_pos, n_cached_layers, d_model]
    ours = backbone.fingerprint()
    if meta.get("backbone", {}).get("weights") != ours["weights"] or meta.get("d_model") != d_model:
        raise UserError(f"{what} {path} come from backbone {meta.get('backbone', {}).get('name_or_path')!r} "
                        f"(d_model {meta.get('d_model')}), not the data's {ours['name_or_path']!r} (d_model {d_model})")
    missing = [layer for layer in layers if layer not in meta["layers"]]
    if missing or meta.get("selected") is None:
        raise UserError(f"{what} has no selected direction at layers {missing or layers} "
                        f"(it holds layers {meta['layers']})")  # fmt: skip
    position = meta["selected"]["position"]
    return torch.stack([directions[position, meta["layers"].index(layer)] for layer in layers]), position


class SteeringVectorModule(SteeringObjectiveModule):
    """Steering vectors for `layers` of a frozen backbone, trained on a `CompletionDataModule` (module docstring)."""

    layout_key = "steering_layout"
    trained_keys = ("vectors",)

    def __init__(
        self,
        layers: list[int],
        apply_to: str = "all",
        objective: str = "sft",
        beta: float = 0.1,
        init: str = "zeros",
        init_scale: float = 1.0,
        directions: str | None = None,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        max_norm: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        """
        Args:
            layers: model layers to steer (sorted, unique), one vector each.
            apply_to: all | prompt | response: the tokens the vectors are added to.
            objective: sft (teacher-forced NLL of the gold solution) | bipo (needs data.pairs: true).
            beta: BiPO's temperature on the log-likelihood-ratio margin.
            init: zeros | random | directions (needs `directions`).
            init_scale: multiplies the initial vectors (random: their norm is ~init_scale).
            directions: a directions run's reasoning_directions.safetensors (init: directions).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay (pulls the vectors towards zero).
            max_norm: cap on each vector's norm, applied after every step; null: none.
            gradient_checkpointing: recompute each decoder layer in the backward pass instead of keeping its
                activations (HF's activation_checkpointing_enable, non-reentrant; it needs the backbone in train
                mode, which Qwen2's zero dropout leaves deterministic).
        """
        super().__init__()
        self.save_hyperparameters()
        self.check_objective()
        if apply_to not in APPLY_TO:
            raise UserError(f"model.apply_to must be one of {', '.join(APPLY_TO)}, got {apply_to!r}")
        if init not in INITS:
            raise UserError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
        if (init == "directions") != (directions is not None):
            raise UserError("model.init: directions needs model.directions (a reasoning_directions.safetensors), "
                            "and model.directions is only read with init: directions")  # fmt: skip
        if max_norm is not None and max_norm <= 0:
            raise UserError(f"model.max_norm must be > 0 or null, got {max_norm}")
        self.vectors: nn.Parameter | None = None
        self.backbone = None  # FrozenBackbone (`ReadsBackbone`); never a submodule, never checkpointed

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) ---------------------
    def layout(self) -> dict:
        return {"layers": self.layers, "d_model": self.vectors.shape[1],
                "backbone": self.backbone.layout_entry() if self.backbone else None}  # fmt: skip

    def _build(self, layout: dict) -> None:
        self.layers = list(layout["layers"])
        self.vectors = nn.Parameter(torch.zeros(len(self.layers), layout["d_model"], device=self.device))
        self.backbone_from_layout(layout.get("backbone"))

    def check_data(self, datamodule) -> None:
        """The objective's checks; a directions file from the same backbone (before any model loads)."""
        super().check_data(datamodule)
        if self.hparams.directions is not None:
            self._initial_directions(datamodule)

    def _initial_directions(self, datamodule) -> torch.Tensor:
        """[n_steered, d_model]: the directions file's selected position at each steered layer."""
        return selected_directions(self.hparams.directions, self.hparams.layers, datamodule.backbone,
                                   datamodule.d_model, "model.directions")[0]  # fmt: skip

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.check_data(dm)
        dm.setup(stage)
        fresh = not self.layers
        self.build_or_check({"layers": list(self.hparams.layers), "d_model": dm.d_model}, "model.layers")
        if fresh:  # a resumed fit then loads the checkpoint's vectors over these
            self._initialize(dm)
        self.freeze_backbone(dm)

    @torch.no_grad()
    def _initialize(self, datamodule) -> None:
        hp, d_model = self.hparams, self.vectors.shape[1]
        if hp.init == "random":
            generator = torch.Generator().manual_seed(0)
            self.vectors.copy_(torch.randn(self.vectors.shape, generator=generator) / math.sqrt(d_model))
        elif hp.init == "directions":
            self.vectors.copy_(self._initial_directions(datamodule))
        self.vectors.mul_(hp.init_scale)

    # ---- steering -----------------------------------------------------------------------------------------------
    def steered(self, prompt_lengths: list[int] | None, strength: float = 1.0, vectors: torch.Tensor | None = None):
        """The vectors times `strength` added to the backbone (`with module.steered(...): forward`); `vectors`
        ([n_steered, d_model], e.g. a null) are added instead of the learned ones, at the same layers and tokens."""
        if strength == 0:
            return contextlib.nullcontext()
        apply_to = APPLY_TO[self.hparams.apply_to]
        return AddTrainableVectors(self.backbone_model, self.vectors if vectors is None else vectors, self.layers,
                                   strength, apply_to, prompt_lengths if apply_to != "all" else None)  # fmt: skip

    def learned_vectors(self) -> torch.Tensor:
        """[n_steered, d_model], detached: what the steering report compares with nulls and directions."""
        return self.vectors.detach()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.vectors]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.hparams.max_norm is not None:
            with torch.no_grad():
                norms = self.vectors.norm(dim=-1, keepdim=True).clamp_min(self.hparams.max_norm)
                self.vectors.mul_(self.hparams.max_norm / norms)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_per_layer("val", {"vector_norm": self.vectors.detach().norm(dim=-1)})
