"""ProbeAccuracyFigure: which validations get a TensorBoard figure (every n-th epoch, and the final curves)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.probe_figures import ProbeAccuracyFigure
from datamodules.tensors import TensorProbeDataModule
from interp.errors import UserError
from lightning_modules.probes import LayerProbeModule

STEPS_PER_EPOCH = 2  # 24 train rows, batch 12


def _figure_steps(tmp_path, max_epochs: int, figure: ProbeAccuracyFigure) -> list[int]:
    """Fit a probe on planted data with a TensorBoard logger; global steps of the logged figures."""
    L.seed_everything(0, verbose=False)
    y = torch.arange(30) % 2
    x = torch.randn(30, 3, 4) + y[:, None, None].float()  # [n, n_layers, d_model]
    dm = TensorProbeDataModule(x, y, num_classes=2, val_fraction=0.2, batch_size=12)
    assert len(dm.datasets["train"]) == 24
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(tmp_path, name="run", version=""),
        callbacks=[figure], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(LayerProbeModule(), datamodule=dm)
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    return [event.step for event in events.Images("val/accuracy_vs_layer")]


def test_one_figure_for_a_short_run(tmp_path):
    """Default: every 10th epoch; a 3-epoch run gets only the final curves (one figure per validation before)."""
    assert _figure_steps(tmp_path, 3, ProbeAccuracyFigure()) == [3 * STEPS_PER_EPOCH]


def test_every_n_epochs_and_the_final_curves_once(tmp_path):
    steps = _figure_steps(tmp_path / "a", 5, ProbeAccuracyFigure(every_n_epochs=2))
    assert steps == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH]
    # the last epoch already drawn: no second figure of the same validation
    steps = _figure_steps(tmp_path / "b", 4, ProbeAccuracyFigure(every_n_epochs=2))
    assert steps == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]


def test_bad_interval():
    with pytest.raises(UserError, match="every_n_epochs"):
        ProbeAccuracyFigure(every_n_epochs=0)
