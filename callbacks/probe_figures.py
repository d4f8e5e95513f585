"""Logs the per-layer probe curves (task and balanced accuracy, control accuracy, selectivity) as a TensorBoard
figure, with the majority-class baseline (the train split's most frequent class) as a flat line."""

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
        curves = {name: metrics[name] for name in ("acc", "balanced_acc", "control_acc", "selectivity")}
        if "majority_baseline" in metrics:
            curves["majority baseline"] = [float(metrics["majority_baseline"])] * len(pl_module.layers)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig = plot_layer_curves(pl_module.layers, curves, ylabel="validation accuracy")
                logger.experiment.add_figure("val/accuracy_vs_layer", fig, global_step=trainer.global_step)
                plt.close(fig)
