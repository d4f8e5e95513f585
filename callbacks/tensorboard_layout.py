"""TensorBoard opens on the per-layer story: a custom-scalars layout with one chart per metric and the layers as its
series, and the run's headline number in the HParams tab.

Layout (the CUSTOM SCALARS tab), built from the scalar tags the run has logged, per category = the tag's first part:
    {split}/{metric}/L{layer:02d}   -> chart "{split}/{metric} by layer", series = the layers (regex
                                       ^{split}/{metric}/L\\d+$)
    {prefix}@{value}                -> chart "{prefix} by value", e.g. sweep/gold_nll@{strength}
Every regex matches at least one logged tag (the layout is rewritten when new groups appear).
HParams: at the end of fitting, the module's hyperparameters (plus `monitor`, the checkpoint's metric) with the
headline metric `hp/best` = the best value of that metric (ModelCheckpoint's best_model_score), so runs compare
in the HPARAMS tab.
"""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

PER_LAYER = re.compile(r"^(?P<group>.+)/L\d+$")
SWEEP = re.compile(r"^(?P<group>[^@]+)@[^@]+$")


def layout_for(tags: list[str]) -> dict:
    """{category: {chart title: ["Multiline", [regex]]}} for the grouped tags (module docstring)."""
    layout: dict[str, dict] = {}
    for tag in sorted(tags):
        for pattern, suffix, title in ((PER_LAYER, r"/L\d+", "by layer"), (SWEEP, r"@.+", "by value")):
            match = pattern.match(tag)
            if match:
                group = match["group"]
                category = group.split("/", 1)[0]
                layout.setdefault(category, {})[f"{group} {title}"] = ["Multiline", [f"^{re.escape(group)}{suffix}$"]]
                break
    return layout


class PerLayerLayout(L.Callback):
    """Writes `layout_for` the run's logged scalar tags after each validation when it changed (rank zero, TensorBoard
    loggers only), and at the end of fitting logs the hyperparameters with the headline metric `hp/best`: the best
    score of the checkpoint callback that has a monitor (its name in the hparams as `monitor`)."""

    def __init__(self):
        self._written: dict | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        layout = layout_for(list(trainer.logged_metrics))
        if layout and layout != self._written:
            for logger in self._tensorboards(trainer):
                logger.experiment.add_custom_scalars(layout)
            self._written = layout

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitored = [c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_score is not None]
        if not monitored or not trainer.is_global_zero:
            return
        best = monitored[0]
        for logger in self._tensorboards(trainer):
            logger.log_hyperparams({**dict(pl_module.hparams), "monitor": best.monitor},
                                   {"hp/best": float(best.best_model_score)})  # fmt: skip

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
