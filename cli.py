"""The command-line layer shared by train.py and evaluate.py (LightningCLI without subcommands).

Run names: `--run_name` (default: the config file's stem). A run writes
    checkpoints/<run_name>/best.ckpt, last.ckpt      ModelCheckpoint (probe/steering weights only)
    logs/<run_name>/                                 TensorBoard events, config.yaml, run artifacts
Every checkpoint also carries the run's full config (`run_config`), so `evaluate.py --ckpt` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import yaml
from jsonargparse import ArgumentParser, set_parsing_settings
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.probe_figures import ProbeAccuracyFigure
from callbacks.tensorboard_layout import PerLayerLayout
from interp.errors import UserError

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docstrings become --help


class _DropAdvertising(logging.Filter):
    """Lightning 2.6 advertises its cloud logger on every run; a researcher reads the rest of its lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertising())
# A deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py), printed on every fit.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

CHECKPOINT_ROOT = Path("checkpoints")
LOG_ROOT = Path("logs")
_RUN_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_run_name(name: str, flag: str = "--run_name") -> None:
    """A run name names folders under checkpoints/ and logs/: '/'-separated parts of letters, digits, '.', '_'
    and '-', each starting with a letter or digit (so no '..', no absolute path: it cannot escape those roots)."""
    if not all(_RUN_NAME_PART.match(part) for part in str(name).split("/")):
        raise UserError(f"{flag} {name!r}: use letters, digits, '.', '_' and '-' (optionally nested with '/', each "
                        "part starting with a letter or digit): it names folders under checkpoints/ and logs/")  # fmt: skip


def check_trainer(trainer) -> None:
    """Trainer settings Lightning would reject only with a traceback, or accept and fail on later: GPUs asked for
    than are not visible, and non-positive epoch or step limits (-1 = unlimited, as in Lightning)."""
    accelerator = str(trainer.get("accelerator") or "auto")
    devices = trainer.get("devices")
    if accelerator in ("gpu", "cuda"):
        import torch

        visible = torch.cuda.device_count()
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        elif isinstance(devices, str) and "," in devices:
            devices = [int(d) for d in devices.split(",") if d.strip()]
        wanted = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
        highest = max(devices) + 1 if isinstance(devices, list) and devices else wanted
        if visible == 0 or max(wanted, highest) > visible:
            raise UserError(f"trainer.accelerator {accelerator} with trainer.devices {trainer.get('devices')}: "
                            f"{visible} GPU(s) visible on this machine (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")  # fmt: skip
    for name in ("max_epochs", "max_steps"):
        value = trainer.get(name)
        if value is not None and value != -1 and value < 1:
            raise UserError(f"trainer.{name} {value}: use a positive number (or -1 for no limit)")


def check_run_is_new(run_name: str, ckpt_path: str | None, overwrite: bool) -> None:
    """A run that already has checkpoints is never replaced by accident: without --ckpt_path it is one clear error,
    unless --overwrite, which removes its checkpoints/ and logs/ folders first (so two experiments never mix in one
    TensorBoard run). Rank 0 only: DDP's other ranks rerun the command while rank 0 writes."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    previous = sorted(path.name for path in (CHECKPOINT_ROOT / run_name).glob("*.ckpt"))
    if not previous or ckpt_path is not None or rank_zero_only.rank != 0:
        return
    if not overwrite:
        raise UserError(f"run {run_name!r} already exists ({CHECKPOINT_ROOT / run_name}: {', '.join(previous)}): "
                        "resume it with --ckpt_path last, pick another --run_name, or pass --overwrite true to replace it")
    for root in (CHECKPOINT_ROOT, LOG_ROOT):
        shutil.rmtree(root / run_name, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint read as data only (torch.load weights_only=True: tensors, containers, numbers, strings), so a
    checkpoint from anyone cannot run code; UserError (one line, naming the file) when it holds anything else or
    cannot be read, and when train.py did not write it (no run_config)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise UserError(f"checkpoint {path} cannot be read (not a checkpoint): {_first_line(error)}") from error
        found = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "a Python object")
        raise UserError(f"checkpoint {path} holds more than tensors and plain data ({found}); refusing to unpickle "
                        "it, which could run code") from error  # fmt: skip
    except Exception as error:  # torch.load of a truncated or foreign file: OSError, KeyError, RuntimeError, ...
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                        f"{type(error).__name__}: {_first_line(error)}") from error  # fmt: skip
    if not isinstance(checkpoint, dict) or "run_config" not in checkpoint:
        raise UserError(f"checkpoint {path} was not written by train.py (no run_config)")
    return checkpoint


class RunConfigInCheckpoint(L.Callback):
    """Stores the run's resolved config (YAML) in every checkpoint."""

    def __init__(self, config_yaml: str):
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.config_yaml


def _nested_nulls_as_json(args: list[str]) -> list[str]:
    """jsonargparse 4.53 rejects `null` for an option of a subclass nested in a subclass when it comes from the
    command line (`--data.init_args.prompts.init_args.max_prompt_tokens null`; the same value parses from YAML), so
    such an option is passed as the JSON of its parent, which jsonargparse merges into the config:
    `--data.init_args.prompts '{"init_args": {"max_prompt_tokens": null}}'`."""
    out, i = [], 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        if key.startswith("--") and key.count(".init_args.") >= 2 and value in ("null", "None"):
            parent, _, leaf = key.rpartition(".init_args.")
            out += [parent, json.dumps({"init_args": {leaf: None}})]
            i += 1 if eq else 2
        else:
            out.append(args[i])
            i += 1
    return out


class ProjectCLI(LightningCLI):
    def __init__(self, args=None):
        if args is None:  # LightningCLI reads sys.argv (and warns when given both it and args)
            sys.argv[1:] = _nested_nulls_as_json(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = _nested_nulls_as_json(list(args))
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="Run name (default: config stem).")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Resume from this checkpoint ('last' = checkpoints/<run_name>/last.ckpt).",
        )  # fmt: skip
        parser.add_argument(
            "--backbone", type=str | None, default=None,
            help="Override data.init_args.backbone.name_or_path (e.g. tiny, Qwen/QwQ-32B, a local directory).",
        )  # fmt: skip
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Replace a run that already has checkpoints (default: refused; resume it with "
                            "--ckpt_path last or pick another --run_name).")  # fmt: skip

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.backbone:
            backbone = config.data.init_args.get("backbone")
            if backbone is None:
                raise UserError("--backbone needs a data module with a `backbone` argument")
            backbone.name_or_path = config.backbone
        if not config.run_name:
            sources = [str(c) for c in (config.get("config") or [])]
            config.run_name = Path(sources[-1]).stem if sources else "run"
        check_run_name(config.run_name)
        check_trainer(config.trainer)
        check_run_is_new(config.run_name, config.ckpt_path, config.overwrite)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_data = getattr(self.model, "check_data", None)  # a model / data mismatch fails before any model loads
        if check_data is not None:
            check_data(self.datamodule)
        spec = getattr(self.datamodule, "backbone", None)
        if isinstance(self.trainer.accelerator, CUDAAccelerator) and hasattr(spec, "replica_gpus"):
            import torch

            from interp.backbone import check_replica_placement

            check_replica_placement(spec, self.trainer.device_ids, self.trainer.world_size, torch.cuda.device_count())

    @property
    def run_name(self) -> str:
        return self.config.run_name

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        run = self.config.run_name
        monitor, mode = getattr(self.model, "checkpoint_monitor", ("val/acc_max_over_layers", "max"))
        # Lightning 2.6 refreshes `save_last` only when a top-k checkpoint was saved in the same step, so
        # last.ckpt comes from its own unmonitored callback that overwrites it after every validation.
        best = ModelCheckpoint(
            dirpath=CHECKPOINT_ROOT / run, filename="best", monitor=monitor, mode=mode, save_top_k=1,
            auto_insert_metric_name=False, enable_version_counter=False,
        )  # fmt: skip
        last = ModelCheckpoint(
            dirpath=CHECKPOINT_ROOT / run, filename="last", monitor=None, save_top_k=1,
            auto_insert_metric_name=False, enable_version_counter=False,
        )  # fmt: skip
        config_yaml = self.parser.dump(self.config, skip_none=False, skip_validation=True)
        self.trainer_defaults["callbacks"] = [
            best, last, RichProgressBar(leave=True), ProbeAccuracyFigure(), PerLayerLayout(),
            RunConfigInCheckpoint(config_yaml),
        ]
        if self.config.trainer.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=str(LOG_ROOT), name=run, version="", default_hp_metric=False)
        return super().instantiate_trainer(**kwargs)

    def where_results_are(self) -> str:
        """What a finished fit leaves and what to run next (train.py prints it last)."""
        run = self.config.run_name
        lines = []
        for callback in self.trainer.checkpoint_callbacks:
            if callback.best_model_path:
                score = f" ({callback.monitor} {float(callback.best_model_score):.4g})" if callback.monitor else ""
                lines.append(f"Checkpoint:  {callback.best_model_path}{score}")
        lines.append(f"TensorBoard: tensorboard --logdir {LOG_ROOT / run}")
        best = CHECKPOINT_ROOT / run / "best.ckpt"
        if best.is_file():
            lines.append(f"Next:        python evaluate.py --ckpt {best}")
        return "\n".join(lines)

    def resolved_ckpt_path(self) -> str | None:
        path = self.config.ckpt_path
        if path in (None, "last"):
            last = CHECKPOINT_ROOT / self.config.run_name / "last.ckpt"
            if path == "last" and not last.is_file():
                raise UserError(f"--ckpt_path last: {last} does not exist")
            return str(last) if path == "last" else None
        if not Path(path).is_file():
            raise UserError(f"--ckpt_path {path} does not exist")
        return path

    def checked_ckpt_path(self) -> str | None:
        """`resolved_ckpt_path`, read as data (`read_checkpoint`) and checked to hold this run's kind of module,
        before anything is loaded or written."""
        path = self.resolved_ckpt_path()
        if path is not None:
            stored = yaml.safe_load(read_checkpoint(path)["run_config"])["model"]["class_path"]
            ours = f"{type(self.model).__module__}.{type(self.model).__name__}"
            if stored != ours:
                raise UserError(f"--ckpt_path {path} holds a {stored.rpartition('.')[2]}, not this config's "
                                f"{ours.rpartition('.')[2]}")  # fmt: skip
        return path


def datamodule_from_run_config(config_yaml: str) -> L.LightningDataModule:
    """Rebuild a run's datamodule from the config stored in its checkpoint."""
    config = yaml.safe_load(config_yaml)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    namespace = parser.parse_object({"data": config["data"]})
    return parser.instantiate_classes(namespace).data


def _user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, if any (jsonargparse re-raises errors from __init__ as ValueErrors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value",
          "Problem with given class_path")


def _one_line(message: str) -> str:
    """jsonargparse explains a bad value over many indented lines; keep the ones that name the problem."""
    lines = [line.strip().lstrip("- ") for line in message.strip().splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    return " ".join(kept) or lines[0]


def run_main(main: Callable[[], None]) -> None:
    """Run an entry point; user errors become one line on stderr and exit status 2 (no traceback); a Ctrl-C, once
    Lightning has stopped cleanly, becomes "interrupted; rerun the same command to resume" and exit status 130."""
    from jsonargparse import ArgumentError

    interrupted = []

    def on_ctrl_c(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if in_main_thread else None
    try:
        main()
    except (KeyboardInterrupt, SystemExit):
        if not interrupted:  # Lightning turns a Ctrl-C inside its loops into exit(1) after a clean shutdown
            raise
        print("interrupted; rerun the same command to resume (train.py: add --ckpt_path last)", file=sys.stderr)
        sys.exit(130)
    except (ArgumentError, ValueError) as error:
        cause = _user_error_in(error)
        if cause is None and not isinstance(error, ArgumentError):
            raise
        message = str(cause).strip().splitlines()[0] if cause else _one_line(str(error))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
