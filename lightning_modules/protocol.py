"""The one evaluation protocol every study module implements (probes, directions, tuned lens, steering vectors
and their LoRA baseline). `evaluate.py` calls it and never names a module class.

A study module (a LightningModule named by a run config's `model.class_path`) provides
    build_report(self, trainer, datamodule, split, options, checkpoint) -> dict
        the module's results on `split` (a JSON-ready dict). `self` was loaded with `load_from_checkpoint`;
        `trainer` is a plain evaluation Trainer (logger and checkpointing off) for modules that evaluate through
        `trainer.test`; `datamodule` is the run's own, rebuilt from the config stored in the checkpoint
        (`cli.datamodule_from_run_config`, not set up yet); `options` are evaluate.py's flags
        (`EvaluateOptions`); `checkpoint` is the checkpoint's path, recorded in the report.
        Unsupported split or options: raise interp.errors.UserError with one line.
    write_report(report, output_dir) -> dict[str, Path]     (a staticmethod)
        writes the report's files under output_dir (JSON, visualizations/*.png), returns them by kind
        ("json", "figure", ...) in the order evaluate.py prints them.
The report code itself lives in lightning_modules/*_report.py; the module's methods only call it.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L

from interp.atomic import save_figure, write_json
from interp.errors import UserError
from interp.generation import DEFAULT_MAX_NEW_TOKENS
from lightning_modules.cache_writer import extract_activations

DIRECTION_STRENGTHS = (-1.0, 1.0, 2.0, 4.0)  # multiples of the direction added by the directions report
STEERING_STRENGTHS = (-1.0, 0.5, 1.0, 2.0)  # multiples of the learned steering (0 is always added)


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """evaluate.py's flags, for the modules that use them (probes and the tuned lens use none)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """[directions, steering] tokens generated per prompt (a generation with no final answer by then counts as
    truncated)"""
    greedy: bool = False
    """[directions, steering] greedy decoding (default: sampling, temperature 0.6, top_p 0.95)"""
    n_prompts: int | None = None
    """[directions, steering] test problems (None = all)"""
    strengths: tuple[float, ...] | None = None
    """[directions, steering] multipliers of the added direction / the learned steering (None: the module's
    default, DIRECTION_STRENGTHS or STEERING_STRENGTHS)"""
    n_random: int = 1
    """[directions, steering] null directions / null vector sets (directions: the run's saved ones, isotropic of
    the same norm if it saved none; steering vectors: placebo contrasts)"""
    seed: int = 0
    """[directions, steering] sampling, problem sample, null directions"""
    directions: str | None = None
    """[steering] a directions run's reasoning_directions.safetensors: cosine of each learned vector with its
    direction at the same layer"""


@runtime_checkable
class StudyModule(Protocol):
    def build_report(self, trainer: L.Trainer, datamodule: L.LightningDataModule, split: str,
                     options: EvaluateOptions, checkpoint: str) -> dict: ...  # fmt: skip

    @staticmethod
    def write_report(report: dict, output_dir: Path) -> dict[str, Path]: ...


def study_module_class(class_path: str) -> type[L.LightningModule]:
    """The LightningModule class named by a run config's model.class_path, checked to implement `StudyModule`."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise UserError(f"cannot import the run's model class {class_path!r}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule) and issubclass(cls, StudyModule)):
        raise UserError(f"{class_path} has no evaluation report: a study module needs build_report() and "
                        f"write_report() (lightning_modules/protocol.py)")  # fmt: skip
    return cls


def write_report_files(report: dict, output_dir, json_name: str, figure, figure_name: str) -> dict[str, Path]:
    """What every write_report writes: `report` as output_dir/json_name (NaN -> null: standard JSON) and `figure`
    (a matplotlib Figure, closed here) as output_dir/visualizations/figure_name. Returns {"json", "figure"}."""
    from interp.plots import plt

    output_dir = Path(output_dir)
    json_path = write_json(output_dir / json_name, report)
    png_path = save_figure(figure, output_dir / "visualizations" / figure_name)
    plt.close(figure)
    return {"json": json_path, "figure": png_path}


def cached_test_report(report_fn, module, trainer: L.Trainer, datamodule, split: str, checkpoint: str, what: str):
    """`report_fn(trainer, module, datamodule, checkpoint)` of a module read from the activation cache: test split
    only (UserError otherwise), the cache extracted first where it is incomplete."""
    if split != "test":
        raise UserError(f"the {what} report is computed on the test split, not {split!r}")
    extract_activations(trainer, datamodule)
    return report_fn(trainer, module, datamodule, checkpoint)
