"""Trains the tuned lens (`interp.lens.TunedLens`, definitions and memory costs there) for every cached layer at
once, on the activation cache.

The module owns the affine translators (`translators.*`, all that checkpoints hold: `strict_loading = False`).
The frozen readout, the backbone's final norm and LM head, is a `FrozenBackbone` that keeps only those two
modules: loaded in `setup` from the datamodule's BackboneSpec, or on first use from the spec stored in the
checkpoint (the host holds the whole backbone once while loading: about 64 GB in bfloat16 for a 32B model).
The data must cache the backbone's last layer, whose resid_post gives the training target, and another layer;
`check_data` says so before any model loads.

Training minimises the mean over the lensed layers (every cached layer but the last) of KL(p_final || q_l); the
last layer's translator is left out of the loss and stays the identity (with AdamW even float32 rounding noise
in a zero gradient would otherwise move it). Epoch means are accumulated in float64. At the last layer p_final
and the logit lens are the same computation, so its logit-lens KL is 0.

Metric keys: {split}/kl_tuned/L{layer:02d}, {split}/kl_logit/L{layer:02d} (the logit lens, untrained) and
{split}/kl_tuned_mean, {split}/kl_logit_mean (means over the lensed layers, i.e. every cached layer but the last,
whose KL is 0 by construction); ModelCheckpoint monitors val/kl_tuned_mean.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from interp.errors import UserError
from interp.lens import AffineTranslators, LensReadout, TunedLens, final_layer_slot
from lightning_modules.frozen_backbone import ReadsBackbone
from lightning_modules.layout import LayerStudyModule
from lightning_modules.protocol import cached_test_report
from lightning_modules.tuned_lens_report import RESULTS_FILE, tuned_lens_report, write_tuned_lens_report


class LayerMean(Metric):
    """Mean over samples of a per-layer value: update([batch, n_layers]); compute() -> [n_layers], float64."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.add_state("total", default=torch.zeros(n_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total = self.total + values.detach().to(torch.float64).sum(0)
        self.count = self.count + values.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class TunedLensModule(ReadsBackbone, LayerStudyModule):
    """Trains an `interp.lens.TunedLens` (one affine translator per cached layer) on cached residuals against
    the backbone's own final distribution; the frozen readout is held, never trained (module docstring)."""

    checkpoint_monitor = ("val/kl_tuned_mean", "min")
    layout_key = "tuned_lens_layout"
    results_file = RESULTS_FILE  # what evaluate.py writes
    trained_keys = ("translators.",)
    backbone_keep = LensReadout  # of the backbone, hold only the final norm and the LM head

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, rank: int | None = None):
        """
        Args:
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay; it pulls the translators towards the identity (the logit lens).
            rank: None = full-rank translators (d_model^2 parameters per layer); r: A_l = U_l V_l^T, rank r.
        """
        super().__init__()
        if rank is not None and rank < 1:
            raise UserError(f"model.rank must be a positive integer or null, got {rank}")
        self.save_hyperparameters()
        self.translators: AffineTranslators | None = None
        self.final_slot: int = -1  # index of the backbone's last layer in `layers`
        self.trained_slots: list[int] = []  # all other slots (the last layer's translator stays the identity)
        self.backbone = None  # the FrozenBackbone of the final norm + LM head (`ReadsBackbone`); never a submodule
        self.last_metrics: dict[str, dict[str, torch.Tensor]] = {}  # split -> name -> [n_layers] (callbacks)

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) ---------------------
    def layout(self) -> dict:
        return {
            "layers": self.layers, "d_model": self.translators.bias.shape[1],
            "n_backbone_layers": self.layers[self.final_slot] + 1,
            "backbone": self.backbone.layout_entry() if self.backbone else None,
        }  # fmt: skip

    def _build(self, layout: dict) -> None:
        self.final_slot = final_layer_slot(layout["layers"], layout["n_backbone_layers"])
        self.layers = list(layout["layers"])
        self.trained_slots = [slot for slot in range(len(self.layers)) if slot != self.final_slot]
        self.translators = AffineTranslators(len(self.layers), layout["d_model"], self.hparams.rank)
        self.metrics = nn.ModuleDict({
            split: nn.ModuleDict({name: LayerMean(len(self.layers)) for name in ("kl_tuned", "kl_logit")})
            for split in ("val", "test")
        })  # fmt: skip
        self.to(self.device)
        self.backbone_from_layout(layout.get("backbone"))  # loaded on first use (see `lens`)

    def check_data(self, datamodule) -> None:
        """The cached layers must hold the backbone's last layer and another (its depth comes from its config)."""
        final_layer_slot(datamodule.layers, datamodule.backbone.num_layers())

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        layout = {"layers": dm.layers, "d_model": dm.d_model, "n_backbone_layers": dm.backbone.num_layers()}
        self.build_or_check(layout, "data.layers")
        self.place_backbone(dm.backbone, self.trainer.strategy.root_device)

    @property
    def lens(self) -> TunedLens:
        """The tuned lens of these translators; its readout on this module's device unless sharded."""
        return TunedLens(self.translators, self.backbone_model, self.final_slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tuned-lens logits [batch, n_layers, vocab] float32 of cached residuals [batch, n_layers, d_model]."""
        return self.lens.logits(x)

    # ---- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.lens.kl_per_layer(batch["x"], slots=self.trained_slots).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        lens = self.lens
        kl_tuned = lens.kl_per_layer(batch["x"], tuned=True)
        self.metrics[split]["kl_tuned"].update(kl_tuned)
        self.metrics[split]["kl_logit"].update(lens.kl_per_layer(batch["x"], tuned=False))
        self.log(f"{split}/loss", kl_tuned.mean(), batch_size=len(batch["x"]), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        values = {name: metric.compute().float() for name, metric in self.metrics[split].items()}
        for metric in self.metrics[split].values():
            metric.reset()
        self.log_per_layer(split, values)
        for name, per_layer in values.items():
            lensed = per_layer[self.trained_slots]  # the last layer's KL is 0 by construction: not averaged in
            self.log(f"{split}/{name}_mean", lensed.mean(), prog_bar=name == "kl_tuned", sync_dist=True)
        self.last_metrics[split] = {name: v.detach().cpu() for name, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    # ---- the evaluation protocol (lightning_modules/protocol.py) ------------------------------------------------
    def build_report(self, trainer: L.Trainer, datamodule, split: str, options, checkpoint: str) -> dict:
        """`lightning_modules.tuned_lens_report.tuned_lens_report`: per-layer tuned / logit-lens KL on the test
        split (the activation cache is extracted first if it is incomplete)."""
        return cached_test_report(tuned_lens_report, self, trainer, datamodule, split, checkpoint, "tuned-lens")

    @staticmethod
    def write_report(report: dict, output_dir: Path) -> dict[str, Path]:
        """tuned_lens_results.json + visualizations/tuned_lens_kl.png (`write_tuned_lens_report`)."""
        return write_tuned_lens_report(report, output_dir)
