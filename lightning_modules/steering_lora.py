"""The steering vectors' LoRA baseline: a peft LoRA adapter on the frozen backbone, trained on the same data with the
same objective and validation (`lightning_modules.steering_objective`), so the two compare per trained parameter.

The adapter (peft `inject_adapter_in_model`, rank r, alpha) sits on the attention and MLP projections
(`target_modules`) of the steered `layers` only. It lives inside the backbone's modules, so the LightningModule
registers no parameters: checkpoints hold the adapter's weights under "lora_adapter" (peft's
`get_peft_model_state_dict`: lora_A / lora_B only, never a backbone weight) + the layout + the run config, and
`on_load_checkpoint` puts them back (in place, so a resumed fit's optimizer state still points at them).
Steering at strength s scales every adapter's output by s (peft `scale_layer`): 1 = as trained, 0 = the
unsteered backbone, -1 = the negated adapter (BiPO's d = -1).
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from interp.errors import UserError
from lightning_modules.steering_objective import SteeringObjectiveModule

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen2 / Llama names


class LoraSteeringModule(SteeringObjectiveModule):
    """A LoRA adapter on `layers` of a frozen backbone, trained on a `CompletionDataModule` (module docstring)."""

    layout_key = "lora_layout"
    trained_keys = ()  # the module's own state dict is empty: the adapter's weights travel as "lora_adapter"

    def __init__(
        self,
        layers: list[int],
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: list[str] | None = None,
        objective: str = "sft",
        beta: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        """
        Args:
            layers: model layers whose projections get an adapter (sorted, unique).
            rank: LoRA rank r.
            alpha: LoRA alpha (the adapter's output is scaled by alpha / r).
            target_modules: projection names inside those layers (default: every attention and MLP projection).
            objective: sft | bipo (needs data.pairs: true).
            beta: BiPO's temperature on the log-likelihood-ratio margin.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            gradient_checkpointing: as for the steering vectors.
        """
        super().__init__()
        self.save_hyperparameters()
        self.check_objective()
        if rank < 1:
            raise UserError(f"model.rank must be >= 1, got {rank}")
        self.backbone = None
        self._adapter_state: dict | None = None  # a checkpoint's adapter weights, until the backbone is loaded

    # ---- building ----------------------------------------------------------------------------------------------
    def layout(self) -> dict:
        return {"layers": self.layers, "backbone": self.backbone.layout_entry() if self.backbone else None}

    def _build(self, layout: dict) -> None:
        self.layers = list(layout["layers"])
        self.backbone_from_layout(layout.get("backbone"))

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.check_data(dm)
        dm.setup(stage)
        self.build_or_check({"layers": list(self.hparams.layers)}, "model.layers")
        self.freeze_backbone(dm)
        self.adapted_backbone()

    def adapted_backbone(self) -> nn.Module:
        """The backbone with the adapter injected (once; seeded from the global RNG like any fresh LoRA) and a
        checkpoint's adapter weights, if one was loaded, put in place."""
        model = self.backbone_model
        if not any(isinstance(module, LoraLayer) for module in model.modules()):
            names = "|".join(self.hparams.target_modules or PROJECTIONS)
            layers = "|".join(str(layer) for layer in self.layers)
            config = LoraConfig(r=self.hparams.rank, lora_alpha=self.hparams.alpha,
                                target_modules=rf".*\.layers\.({layers})\..*\.({names})")  # fmt: skip
            inject_adapter_in_model(config, model)
        if self._adapter_state is not None:
            set_peft_model_state_dict(model, self._adapter_state)
            self._adapter_state = None
        return model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = get_peft_model_state_dict(self.backbone_model)
        checkpoint["lora_adapter"] = {name: tensor.detach().cpu() for name, tensor in state.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._adapter_state = checkpoint["lora_adapter"]
        if self.backbone is not None and self.backbone.loaded:  # resuming a fit: the adapter is already there
            self.adapted_backbone()

    # ---- steering -----------------------------------------------------------------------------------------------
    def _lora_layers(self) -> list[LoraLayer]:
        model = self.adapted_backbone()
        if getattr(self, "_lora_cache", (None,))[0] is not model:  # found once per backbone, not every forward
            self._lora_cache = (model, [module for module in model.modules() if isinstance(module, LoraLayer)])
        return self._lora_cache[1]

    @contextlib.contextmanager
    def steered(self, prompt_lengths: list[int], strength: float = 1.0):
        """Every adapter's output times `strength` for the `with` block (prompt_lengths: unused, LoRA acts on every
        token)."""
        lora = self._lora_layers()
        for module in lora:
            module.scale_layer(strength)
        try:
            yield
        finally:
            for module in lora:
                module.unscale_layer()  # back to alpha / r (a scale of 0 cannot be divided out)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.adapted_backbone().named_parameters() if "lora_" in name]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        with torch.no_grad():
            norms = [float(p.norm()) for p in self.trainable_parameters()]
        self.log("val/adapter_norm", torch.tensor(norms).norm())
