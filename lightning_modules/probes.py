"""Linear probes for every layer at once, trained on cached (or in-memory) residual-stream activations.

One batched weight [n_layers, d_model, n_classes] gives each layer its own multinomial logistic regression
on standardized inputs (train-split mean/std, float64, stored as buffers so checkpoints are self-contained).
A second, identical probe learns the control task (labels a fixed seeded function of a type that recurs across
splits, see datamodules/tensors.py). Scores of an evaluated split, per layer, from all of its rows (float64):
    acc            share of rows whose argmax class is the label
    balanced_acc   mean over the classes present in the split of their recall (scikit-learn's definition)
    auroc          macro one-vs-rest AUROC over the classes present in the split (>= 1 positive and >= 1
                   negative row), scores = softmax over those classes' logits; absent classes are not averaged
                   in (they are listed in last_metrics[split]["absent_classes"]); NaN with < 2 present classes
    control_acc    acc of the control probe on the control labels
    selectivity    acc - control_acc (both on the same split)
    majority_baseline  (one number) share of the split's rows in the TRAIN split's most frequent class (ties:
                   lowest index), i.e. the accuracy of a constant predictor fitted on train

Metric keys: {split}/acc/L{layer:02d}, {split}/balanced_acc/L.., {split}/auroc/L.., {split}/control_acc/L..,
{split}/selectivity/L.., {split}/majority_baseline, plus {split}/acc_max_over_layers (this epoch's best layer) which
ModelCheckpoint monitors. Layer numbers are the backbone's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from interp.errors import UserError
from interp.probe_metrics import layer_accuracy, layer_balanced_accuracy, layer_macro_auroc, present_classes
from lightning_modules.layout import LayerStudyModule
from lightning_modules.probe_report import RESULTS_FILE, probe_report, write_probe_report
from lightning_modules.protocol import cached_test_report


class LinearProbe(nn.Module):
    """x [batch, n_layers, d_model] -> logits [batch, n_layers, n_classes]; one affine map per layer."""

    def __init__(self, n_layers: int, d_model: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, num_classes))
        self.bias = nn.Parameter(torch.zeros(n_layers, num_classes))
        self.register_buffer("feature_mean", torch.zeros(n_layers, d_model))
        self.register_buffer("feature_std", torch.ones(n_layers, d_model))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.feature_mean) / self.feature_std
        return torch.einsum("bld,ldc->blc", z, self.weight) + self.bias


class _EvalOutputs(Metric):
    """Every evaluated row's logits of both probes and both labels, concatenated over batches (and ranks)."""

    full_state_update = False
    _names = ("logits", "control_logits", "y", "y_control")

    def __init__(self):
        super().__init__()
        for name in self._names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, control_logits: torch.Tensor, y: torch.Tensor, y_control: torch.Tensor):
        """logits, control_logits: [batch, n_layers, C]; y, y_control: [batch]."""
        for name, value in zip(self._names, (logits, control_logits, y, y_control)):
            getattr(self, name).append(value.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: dim_zero_cat(getattr(self, name)) for name in self._names}


class LayerProbeModule(LayerStudyModule):
    """All-layer linear probes (one `LinearProbe` per cached layer, trained at once) plus the Hewitt & Liang
    control-task probe; per-layer metrics, report and checkpoint layout as in the module docstring."""

    layout_key = "probe_layout"
    results_file = RESULTS_FILE  # what evaluate.py writes (and refuses to replace with another checkpoint's)
    trained_keys = ("probe.", "control_probe.")

    def __init__(self, lr: float = 1e-2, weight_decay: float = 1e-3):
        """
        Args:
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay (L2 regularisation of the probes).
        """
        super().__init__()
        self.save_hyperparameters()
        self.probe: LinearProbe | None = None
        self.control_probe: LinearProbe | None = None
        self.class_names: list[str] = []
        self.train_class_counts: torch.Tensor | None = None  # [num_classes] from the datamodule: majority baseline
        # split -> name -> [n_layers] float64 per-layer scores, plus "majority_baseline" (0-dim, when the train
        # class counts are known) and "absent_classes" (list[int]); read by callbacks and the report.
        self.last_metrics: dict[str, dict] = {}

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) -------------------------
    def layout(self) -> dict:
        return {"layers": self.layers, "d_model": self.probe.weight.shape[1], "class_names": self.class_names}

    def _build(self, layout: dict) -> None:
        self.layers, self.class_names = list(layout["layers"]), list(layout["class_names"])
        n_layers, num_classes = len(self.layers), len(self.class_names)
        self.probe = LinearProbe(n_layers, layout["d_model"], num_classes)
        self.control_probe = LinearProbe(n_layers, layout["d_model"], num_classes)
        self.outputs = nn.ModuleDict({split: _EvalOutputs() for split in ("val", "test")})
        self.to(self.device)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.train_class_counts = getattr(dm, "train_class_counts", None)
        if self.probe is not None:
            return
        self._build({"layers": dm.layers, "d_model": dm.d_model, "class_names": dm.class_names})
        if stage == "fit":
            moments = dm.train_moments()
            bad = ~(torch.isfinite(moments.mean) & torch.isfinite(moments.var())).all(-1)  # [n_layers]
            if bool(bad.any()):  # one NaN / inf feature would silently turn a layer's scores into constants
                layers = [self.layers[i] for i in bad.nonzero().flatten().tolist()]
                raise UserError(f"the training activations of layer(s) {layers} hold NaN or inf values")
            for probe in (self.probe, self.control_probe):
                probe.set_standardization(moments.mean.float(), moments.var().sqrt().float())

    # ---- steps -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(x)

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean over layers of each layer's cross-entropy, for the task and the control probe."""
        logits, control_logits = self.probe(batch["x"]), self.control_probe(batch["x"])  # [b, L, C]
        n_layers = logits.shape[1]
        y = batch["y"][:, None].expand(-1, n_layers)
        yc = batch["y_control"][:, None].expand(-1, n_layers)
        loss = F.cross_entropy(logits.transpose(1, 2), y)
        control_loss = F.cross_entropy(control_logits.transpose(1, 2), yc)
        return loss, control_loss, logits, control_logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, control_loss, _, _ = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["y"]))
        self.log("train/control_loss", control_loss, batch_size=len(batch["y"]))
        return loss + control_loss

    def _eval_step(self, batch: dict, split: str) -> None:
        loss, _, logits, control_logits = self._losses(batch)
        self.outputs[split].update(logits, control_logits, batch["y"], batch["y_control"])
        self.log(f"{split}/loss", loss, batch_size=len(batch["y"]), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        if self.outputs[split].update_count == 0:  # no batch ran (e.g. limit_val_batches=0)
            return
        out = self.outputs[split].compute()  # every row of the split (all ranks)
        self.outputs[split].reset()
        y, y_control = out["y"].long(), out["y_control"].long()
        present = present_classes(y, len(self.class_names))
        values = {
            "acc": layer_accuracy(out["logits"], y),
            "balanced_acc": layer_balanced_accuracy(out["logits"], y),
            "auroc": layer_macro_auroc(out["logits"], y, present),
            "control_acc": layer_accuracy(out["control_logits"], y_control),
        }
        values["selectivity"] = values["acc"] - values["control_acc"]
        self.log_per_layer(split, values)
        self.log(f"{split}/acc_max_over_layers", values["acc"].max(), prog_bar=True, sync_dist=True)
        values = {name: v.detach().cpu() for name, v in values.items()}
        if self.train_class_counts is not None:
            majority = int(self.train_class_counts.argmax())  # ties: the lowest class index
            values["majority_baseline"] = (y == majority).double().mean().cpu()
            self.log(f"{split}/majority_baseline", values["majority_baseline"], sync_dist=True)
        values["absent_classes"] = [k for k in range(len(self.class_names)) if k not in present]
        self.last_metrics[split] = values

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ---- the evaluation protocol (lightning_modules/protocol.py) ------------------------------------------------
    def build_report(self, trainer: L.Trainer, datamodule, split: str, options, checkpoint: str) -> dict:
        """`lightning_modules.probe_report.probe_report` on the test split (the activation cache is extracted first
        if it is incomplete)."""
        return cached_test_report(probe_report, self, trainer, datamodule, split, checkpoint, "probe")

    @staticmethod
    def write_report(report: dict, output_dir: Path) -> dict[str, Path]:
        """probe_accuracies.json + visualizations/probe_accuracy.png (`write_probe_report`)."""
        return write_probe_report(report, output_dir)


def train_layer_probes(
    layer_activations: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    max_epochs: int = 50,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    groups: torch.Tensor | None = None,
    control_types: Sequence | torch.Tensor | None = None,
) -> torch.Tensor:
    """Train one probe per layer on in-memory activations [n, n_layers, d_model] and labels [n].

    Runs the same LightningModule as train.py on a seeded random split and returns the held-out accuracy per
    layer, [n_layers] float64. groups: [n] int (e.g. the problem id): whole groups go to one split, so rows of
    one problem never sit on both sides. Without groups the split is ROW-wise, which overstates held-out
    accuracy when rows are not independent (two prompts of a problem). control_types: see TensorProbeDataModule.
    """
    from datamodules.tensors import TensorProbeDataModule

    L.seed_everything(seed, verbose=False)
    datamodule = TensorProbeDataModule(
        layer_activations, labels, num_classes, val_fraction=val_fraction, batch_size=batch_size, seed=seed,
        groups=groups, control_types=control_types,
    )  # fmt: skip
    module = LayerProbeModule(lr=lr, weight_decay=weight_decay)
    trainer = L.Trainer(
        max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        check_val_every_n_epoch=max_epochs,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return module.last_metrics["val"]["acc"]
