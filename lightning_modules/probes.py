"""Linear probes for every layer at once, trained on cached (or in-memory) residual-stream activations.

One batched weight [n_layers, d_model, n_classes] gives each layer its own multinomial logistic regression
on standardized inputs (train-split mean/std, float64, stored as buffers so checkpoints are self-contained).
A second, identical probe learns the control task (random per-problem labels, see datamodules/activations.py);
selectivity = task accuracy - control accuracy, per layer.

Metric keys: {split}/acc/L{layer:02d}, {split}/auroc/L.., {split}/control_acc/L.., {split}/selectivity/L..,
plus {split}/acc_best (max over layers) which ModelCheckpoint monitors. Layer numbers are the backbone's.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC
from torchmetrics.wrappers import MultioutputWrapper


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


def _per_layer(metric, n_layers: int) -> MultioutputWrapper:
    return MultioutputWrapper(metric, num_outputs=n_layers, output_dim=1)


class LayerProbeModule(L.LightningModule):
    def __init__(self, lr: float = 1e-2, weight_decay: float = 1e-3, max_epochs_hint: int | None = None):
        """
        Args:
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay (L2 regularisation of the probes).
        """
        super().__init__()
        self.save_hyperparameters()
        self.strict_loading = False
        self.probe: LinearProbe | None = None
        self.control_probe: LinearProbe | None = None
        self.layers: list[int] = []
        self.class_names: list[str] = []
        self.last_metrics: dict[str, dict[str, torch.Tensor]] = {}  # split -> name -> [n_layers], for callbacks

    # ---- building (from the datamodule when fitting, from the checkpoint when loading) -------------------------
    def _build(self, layers: Sequence[int], d_model: int, class_names: Sequence[str]) -> None:
        self.layers, self.class_names = list(layers), list(class_names)
        n_layers, num_classes = len(self.layers), len(self.class_names)
        self.probe = LinearProbe(n_layers, d_model, num_classes)
        self.control_probe = LinearProbe(n_layers, d_model, num_classes)
        self.metrics = nn.ModuleDict()
        for split in ("val", "test"):
            self.metrics[split] = nn.ModuleDict({
                "acc": _per_layer(MulticlassAccuracy(num_classes, average="micro"), n_layers),
                "auroc": _per_layer(MulticlassAUROC(num_classes, average="macro"), n_layers),
                "control_acc": _per_layer(MulticlassAccuracy(num_classes, average="micro"), n_layers),
            })  # fmt: skip
        self.to(self.device)

    def setup(self, stage: str) -> None:
        if self.probe is not None:
            return
        dm = self.trainer.datamodule
        self._build(dm.layers, dm.d_model, dm.class_names)
        if stage == "fit":
            moments = dm.train_moments()
            for probe in (self.probe, self.control_probe):
                probe.set_standardization(moments.mean.float(), moments.var().sqrt().float())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["probe_layout"] = {
            "layers": self.layers, "d_model": self.probe.weight.shape[1], "class_names": self.class_names,
        }  # fmt: skip
        assert not any(key.startswith(("backbone", "_model")) for key in checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.probe is None:
            layout = checkpoint["probe_layout"]
            self._build(layout["layers"], layout["d_model"], layout["class_names"])

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
        loss, control_loss, logits, control_logits = self._losses(batch)
        n_layers = logits.shape[1]
        metrics = self.metrics[split]
        metrics["acc"].update(logits, batch["y"][:, None].expand(-1, n_layers))
        metrics["auroc"].update(logits.softmax(-1), batch["y"][:, None].expand(-1, n_layers))
        metrics["control_acc"].update(control_logits, batch["y_control"][:, None].expand(-1, n_layers))
        self.log(f"{split}/loss", loss, batch_size=len(batch["y"]), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        values = {name: torch.stack(list(metric.compute())).float() for name, metric in self.metrics[split].items()}
        values["selectivity"] = values["acc"] - values["control_acc"]
        for metric in self.metrics[split].values():
            metric.reset()
        for name, per_layer in values.items():
            for layer, value in zip(self.layers, per_layer):
                self.log(f"{split}/{name}/L{layer:02d}", value, sync_dist=True)
        self.log(f"{split}/acc_best", values["acc"].max(), prog_bar=True, sync_dist=True)
        self.last_metrics[split] = {name: v.detach().cpu() for name, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


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
) -> torch.Tensor:
    """Train one probe per layer on in-memory activations [n, n_layers, d_model] and labels [n].

    Runs the same LightningModule as train.py on a seeded random split; returns the held-out accuracy
    per layer, [n_layers] float32.
    """
    from datamodules.tensors import TensorProbeDataModule

    L.seed_everything(seed, verbose=False)
    datamodule = TensorProbeDataModule(
        layer_activations, labels, num_classes, val_fraction=val_fraction, batch_size=batch_size, seed=seed
    )
    module = LayerProbeModule(lr=lr, weight_decay=weight_decay)
    trainer = L.Trainer(
        max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        check_val_every_n_epoch=max_epochs,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return module.last_metrics["val"]["acc"]
