"""The study's stages. Each model's stages are the project's own runs (train.py / evaluate.py on the preset's run
configs, with the backbone, problems and layers replaced); the pair stages read what those runs cached and saved.

Layout of one study, logs/<run>/ (checkpoints under checkpoints/<run>/<label>/<stage>/):
    study.json                         the resolved preset, the stages finished, package versions
    <label>/probes/, <label>/directions/   the runs' TensorBoard events and config.yaml
    <label>/probe_accuracies.json      probes: evaluate.py on the probe run
    <label>/reasoning_directions.safetensors (+ .json)   directions: the directions run's file
    <label>/tuned_lens/, <label>/tuned_lens_results.json   tuned_lens (when the preset names a config): the run
                                       and evaluate.py on it (tuned- vs logit-lens KL per layer, its test split)
    <label>/intervention_results.json  interventions: evaluate.py on the directions run
    <label>/logit_lens.json            logit_lens (`interp.lens_depth`, the directions run's test rows; the
                                       tuned lens too when the tuned_lens stage ran)
    <label>/visualizations/*.png       every per-model figure
    alignment_results.json, transplant_results.json, visualizations/summary.png, study/ (TensorBoard)
A stage whose output exists is skipped, so an interrupted study resumes where it stopped (a train run that was
interrupted resumes from its last.ckpt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cli import CHECKPOINT_ROOT, LOG_ROOT, datamodule_from_run_config
from interp import atomic
from interp.errors import UserError
from study.preset import Preset

OUTPUTS = {  # stage -> the file whose presence marks it finished (per model: under logs/<run>/<label>/)
    "probes": "probe_accuracies.json",
    "directions": "reasoning_directions.safetensors",
    "tuned_lens": "tuned_lens_results.json",
    "interventions": "intervention_results.json",
    "logit_lens": "logit_lens.json",
    "alignment": "alignment_results.json",
    "transplant": "transplant_results.json",
    "summary": "visualizations/summary.png",
}


@dataclass
class Study:
    run: str
    preset: Preset

    @property
    def labels(self) -> list[str]:
        return list(self.preset.models)

    @property
    def root(self) -> Path:
        return LOG_ROOT / self.run

    def model_dir(self, label: str) -> Path:
        return self.root / label

    def output(self, stage: str, label: str | None = None) -> Path:
        return (self.model_dir(label) if label else self.root) / OUTPUTS[stage]

    def checkpoint_dir(self, label: str, stage: str) -> Path:
        return CHECKPOINT_ROOT / self.run / label / stage

    def run_datamodule(self, label: str, stage: str = "directions"):
        """The directions (or another) run's datamodule, rebuilt from the config.yaml LightningCLI saved beside
        its events."""
        config = self.model_dir(label) / stage / "config.yaml"
        if not config.is_file():
            raise UserError(f"{config} does not exist: run the {stage} stage of {label} first")
        return datamodule_from_run_config(config.read_text())

    def directions_config(self, label: str) -> dict:
        import yaml

        return yaml.safe_load((self.model_dir(label) / "directions" / "config.yaml").read_text())


def train_args(study: Study, label: str, stage: str) -> list[str]:
    """train.py's arguments for one model's probes / directions run."""
    preset = study.preset
    args = ["--config", getattr(preset, stage), "--backbone", preset.models[label],
            "--run_name", f"{study.run}/{label}/{stage}",
            "--data.init_args.prompts.init_args.sources", json.dumps(preset.sources)]  # fmt: skip
    if stage == "tuned_lens":  # its own layers (the last is its target) and the directions run's splits
        import yaml

        prompts = yaml.safe_load(Path(preset.directions).read_text())["data"]["init_args"]["prompts"]["init_args"]
        for key in ("val_fraction", "test_fraction", "seed"):
            if key in prompts:
                args += [f"--data.init_args.prompts.init_args.{key}", json.dumps(prompts[key])]
    elif preset.layers is not None:
        args += ["--data.init_args.layers", json.dumps(preset.layers)]
    if (study.checkpoint_dir(label, stage) / "last.ckpt").is_file():
        args += ["--ckpt_path", "last"]  # an interrupted fit resumes; a finished one returns at once
    return args


def run_probes(study: Study, label: str) -> None:
    import evaluate
    import train

    train.main(train_args(study, label, "probes"))
    evaluate.main(["--ckpt", str(study.checkpoint_dir(label, "probes") / "best.ckpt"),
                   "--output_dir", str(study.model_dir(label))])  # fmt: skip


def run_directions(study: Study, label: str) -> None:
    import train

    train.main(train_args(study, label, "directions"))
    written = study.model_dir(label) / "directions" / OUTPUTS["directions"]
    for path in (written.with_suffix(".json"), written):  # the tensor file last: it marks the stage finished
        atomic.copy_file(path, study.model_dir(label) / path.name)


def run_tuned_lens(study: Study, label: str) -> None:
    import evaluate
    import train

    train.main(train_args(study, label, "tuned_lens"))
    evaluate.main(["--ckpt", str(study.checkpoint_dir(label, "tuned_lens") / "best.ckpt"),
                   "--output_dir", str(study.model_dir(label))])  # fmt: skip


def run_interventions(study: Study, label: str) -> None:
    import evaluate

    opts = study.preset.interventions
    args = ["--ckpt", str(study.checkpoint_dir(label, "directions") / "best.ckpt"),
            "--output_dir", str(study.model_dir(label)), "--max_new_tokens", str(opts["max_new_tokens"]),
            "--n_random", str(opts["n_random"]), "--seed", str(opts["seed"]),
            "--strengths", *[str(s) for s in opts["strengths"]]]  # fmt: skip
    if opts["n_prompts"] is not None:
        args += ["--n_prompts", str(opts["n_prompts"])]
    if opts["greedy"]:
        args += ["--greedy"]
    evaluate.main(args)


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically (`interp.atomic`): a stage's output appears whole or not at all."""
    return atomic.write_json(path, payload, indent=1, allow_nan=False)
