"""Logs the per-layer probe curves (task accuracy, control accuracy, selectivity) as a TensorBoard figure."""

from __future__ import annotations

import lightning as L
import matplotlib.pyplot as plt
from lightning.pytorch.loggers import TensorBoardLogger

from interp.plots import plot_layer_curves


class ProbeAccuracyFigure(L.Callback):
    """After each validation (rank zero, TensorBoard only): figure `val/accuracy_vs_layer`."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = getattr(pl_module, "last_metrics", {}).get("val")
        if trainer.sanity_checking or not metrics or "acc" not in metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig = plot_layer_curves(
                    pl_module.layers,
                    {name: metrics[name] for name in ("acc", "control_acc", "selectivity")},
                    ylabel="validation accuracy",
                    chance=1.0 / len(pl_module.class_names),
                )
                logger.experiment.add_figure("val/accuracy_vs_layer", fig, global_step=trainer.global_step)
                plt.close(fig)
