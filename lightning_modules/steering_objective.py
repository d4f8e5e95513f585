"""What the steering vectors and their LoRA baseline share: the frozen backbone, the data, the objectives, validation.

A subclass says how it steers (`steered(prompt_lengths, strength)`: a context manager under which the backbone's
forward is steered, strength 0 = the unsteered backbone) and what it trains (`trainable_parameters()`, the
optimizer's parameters). Everything else is here, so the two are trained and measured identically:
    sft    teacher-forced mean NLL per token of the gold solution given the reasoning prompt, over the completion
           tokens only (`interp.metrics.completion_logprobs`; prompt tokens and padding masked)
    bipo   BiPO's bidirectional preference loss (`interp.steering_objectives.bipo_loss`; preferred = the gold
           solution, dispreferred = the bare final answer: `CompletionDataModule(pairs=True)`), multiplier d = +1 or
           -1 per step, drawn from the global step alone, so a resumed run draws what an uninterrupted one would
Metric keys: train/nll or train/bipo_loss (per step); val/nll and val/nll_unsteered (epoch means over the val
problems' completion tokens, steered and not); trainable_parameters (logged once at the start of fit).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from datamodules.completions import CompletionDataModule
from interp.errors import UserError
from interp.metrics import completion_logprobs
from interp.steering_objectives import bipo_loss, sequence_logprob, sft_loss
from lightning_modules.frozen_backbone import ReadsBackbone
from lightning_modules.layout import LayerStudyModule

OBJECTIVES = ("sft", "bipo")


class SteeringObjectiveModule(ReadsBackbone, LayerStudyModule):
    """Base of `SteeringVectorModule` and `LoraSteeringModule` (module docstring). hparams must hold layers,
    objective, beta, lr, weight_decay and gradient_checkpointing."""

    checkpoint_monitor = ("val/nll", "min")
    results_file = "steering_results.json"  # steering_report.RESULTS_FILE (that module imports this one)

    def check_objective(self) -> None:
        """In __init__: the hparams that need no data."""
        hp = self.hparams
        if hp.objective not in OBJECTIVES:
            raise UserError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {hp.objective!r}")
        if list(hp.layers) != sorted(set(int(layer) for layer in hp.layers)) or not hp.layers:
            raise UserError(f"model.layers must be a non-empty sorted list of distinct layers, got {hp.layers}")

    def check_data(self, datamodule) -> None:
        """Completion data (paired for bipo), steered layers inside the backbone: before any model loads."""
        if not isinstance(datamodule, CompletionDataModule):
            raise UserError(f"{type(self).__name__} trains on (prompt, completion) data: use "
                            "datamodules.completions.CompletionDataModule")  # fmt: skip
        if self.hparams.objective == "bipo" and not datamodule.pairs:
            raise UserError("model.objective bipo needs preferred / dispreferred completions: set data.pairs: true")
        n_layers = datamodule.backbone.num_layers()
        bad = [layer for layer in self.hparams.layers if not 0 <= layer < n_layers]
        if bad:
            raise UserError(f"model.layers {bad} out of range: the backbone has {n_layers} layers (0..{n_layers - 1})")

    def freeze_backbone(self, datamodule) -> nn.Module:
        """In `setup`: load the data's backbone on the trainer's device, frozen (+ activation checkpointing)."""
        self.place_backbone(datamodule.backbone, self.trainer.strategy.root_device)
        model = self.backbone_model.requires_grad_(False)
        if self.hparams.gradient_checkpointing:
            model.activation_checkpointing_enable()  # non-reentrant; HF checkpoints only in train mode
            model.train()
        self.pad_id = datamodule.pad_id
        return model

    # ---- what a subclass defines --------------------------------------------------------------------------------
    def steered(self, prompt_lengths: list[int] | None, strength: float = 1.0) -> AbstractContextManager:
        """prompt_lengths: where each row's prompt ends in a teacher-forced forward (None: a forward that declares
        it with `interp.token_roles.prompt_boundary`, or a plain prompt forward)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def learned_vectors(self) -> torch.Tensor | None:
        """[n_steered, d_model] when the module steers by adding vectors (nulls and cosines need them), else None."""
        return None

    # ---- the objectives ------------------------------------------------------------------------------------------
    def logprobs(self, batch: dict, strength: float = 1.0, key: str = "completion_ids") -> tuple:
        """completion_logprobs of batch[key] (completion_ids or dispreferred_ids), steered at `strength` (0: the
        unsteered backbone): (logprobs [batch, n], mask [batch, n])."""
        prompts = batch["prompt_ids"]
        with self.steered([len(p) for p in prompts], strength):
            return completion_logprobs(self.backbone_model, prompts, batch[key], self.pad_id)

    def token_nll(self, batch: dict, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL of the batch's completion tokens, their count)."""
        logprobs, mask = self.logprobs(batch, strength)
        return -(logprobs * mask).sum(), mask.sum()

    def multiplier(self, step: int) -> float:
        """BiPO's d in {-1, +1} for a global step (seeded by the step alone)."""
        return 1.0 if torch.randint(2, (1,), generator=torch.Generator().manual_seed(step)).item() else -1.0

    def bipo_step(self, batch: dict, step: int) -> torch.Tensor:
        d, keys = self.multiplier(step), ("completion_ids", "dispreferred_ids")
        with torch.no_grad():
            reference = [sequence_logprob(*self.logprobs(batch, 0.0, key)) for key in keys]
        steered = [sequence_logprob(*self.logprobs(batch, d, key)) for key in keys]
        return bipo_loss(steered[0], reference[0], steered[1], reference[1], d, self.hparams.beta)

    def on_fit_start(self) -> None:
        if self.logger is not None:
            count = sum(p.numel() for p in self.trainable_parameters())
            self.logger.log_metrics({"trainable_parameters": count}, step=0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.objective == "bipo":
            loss = self.bipo_step(batch, self.global_step)
            self.log("train/bipo_loss", loss, prog_bar=True, batch_size=len(batch["rows"]))
            return loss
        loss = sft_loss(*self.logprobs(batch))
        self.log("train/nll", loss, prog_bar=True, batch_size=len(batch["rows"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, dtype=torch.float64)  # steered NLL sum, unsteered NLL sum, tokens
        if not hasattr(self, "_unsteered_nll"):
            self._unsteered_nll: dict[tuple, float] = {}  # val batch rows -> the frozen backbone's NLL sum

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        steered, count = self.token_nll(batch)
        key = tuple(batch["rows"].tolist())  # the frozen backbone's NLL of a batch never changes: computed once
        if key not in self._unsteered_nll:
            self._unsteered_nll[key] = float(self.token_nll(batch, strength=0.0)[0])
        self._val += torch.tensor([float(steered), self._unsteered_nll[key], float(count)], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        val = self.trainer.strategy.reduce(self._val.to(self.device), reduce_op="sum").cpu()
        self.log("val/nll", val[0] / val[2], prog_bar=True)
        self.log("val/nll_unsteered", val[1] / val[2])

    # ---- the evaluation protocol (lightning_modules/protocol.py) ------------------------------------------------
    def build_report(self, trainer, datamodule, split: str, options, checkpoint: str) -> dict:
        """`lightning_modules.steering_report.steering_report`: the strength sweep (options.strengths, 0 and 1)
        with its nulls on the test split (options.n_prompts problems)."""
        from lightning_modules.steering_report import steering_report

        if split != "test":
            raise UserError(f"the steering report is computed on the test split, not {split!r}")
        self.to("cuda" if torch.cuda.is_available() else "cpu")  # the backbone follows the module's device
        return steering_report(self, datamodule, options, checkpoint)

    @staticmethod
    def write_report(report: dict, output_dir) -> dict:
        """steering_results.json + visualizations/steering_sweep.png (`write_steering_report`)."""
        from lightning_modules.steering_report import write_steering_report

        return write_steering_report(report, output_dir)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
