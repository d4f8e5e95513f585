"""HeldOutEvaluation: the base of the evaluation callbacks that score held-out problems (callbacks/ablation.py,
callbacks/patching.py): when such a callback runs, and how it logs and writes its results."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from interp.atomic import write_json
from interp.errors import UserError
from interp.plots import plt  # pyplot with the Agg backend


class HeldOutEvaluation(L.Callback):
    """Base of the evaluation callbacks: run `evaluate` once at the end of fit (every_n_epochs None) or after
    every N-th training epoch (after that epoch's validation), on rank zero only (every rank resolves
    trainer.log_dir, a collective under DDP). Scalars go to every logger, figures to TensorBoard, the results
    dict to <trainer.log_dir>/<results_file> (NaN -> null; not written when the trainer has no log dir, e.g.
    fast_dev_run) and to `self.last_results`. Subclasses define results_file and
    evaluate(trainer, pl_module, fast) -> (results dict, {tag: scalar}, {tag: Figure}); fast (fast_dev_run)
    should only check the wiring."""

    results_file = "results.json"

    def __init__(self, every_n_epochs: int | None = None):
        if every_n_epochs is not None and every_n_epochs < 1:
            raise UserError(f"every_n_epochs must be >= 1 or null (end of fit), got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.last_results: dict | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, fast: bool) -> tuple[dict, dict, dict]:
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module, trainer.current_epoch + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None:
            self.run(trainer, pl_module, trainer.current_epoch)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_completed: int) -> dict | None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return None
        for name in ("backbone_model", "tokenizer"):
            if not hasattr(pl_module, name):
                raise UserError(f"{type(self).__name__} needs a module with a `{name}` (e.g. ReasoningDirectionModule)")
        results, scalars, figures = self.evaluate(trainer, pl_module, bool(trainer.fast_dev_run))
        results = {"epochs_completed": epochs_completed, "global_step": trainer.global_step, **results}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for tag, fig in figures.items():
                    logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        for fig in figures.values():
            plt.close(fig)
        if log_dir is not None:
            write_json(Path(log_dir) / self.results_file, results)
        self.last_results = results
        return results
