"""Study presets: which two backbones, which problems, which run configs and settings every stage uses.

A preset is a YAML file (configs/presets/<name>.yaml; `--preset NAME` or a path):

    models:          {label: backbone}   exactly two; label names the model's subfolder of logs/<run>/ (e.g. qwq,
                                         r1_distill); backbone = hub id, local directory or built-in
    sources:         [source, ...]       the problems of EVERY stage of both models (datamodules.problems
                                         DatasetSource fields), replacing the run configs' own
    layers:          [int] | null        model layers cached and studied (null: the run configs' own)
    probes:          config path         the probe run config each model starts from (backbone, sources and layers
                                         replaced); its other settings stay
    directions:      config path         the directions run config (positions must be post_instruction: the
                                         pair stages match positions by role)
    tuned_lens:      config path | null  the tuned-lens run config (backbone and sources replaced; its own layers,
                                         which must hold the last one; the directions config's split settings,
                                         so the lens never trains on the problems it is read on); null: the
                                         tuned_lens stage is skipped and logit_lens.json has the logit lens only
    interventions:   {greedy, max_new_tokens, n_prompts, n_random, strengths, seed}   evaluate.py's flags
    logit_lens:      {n_bootstrap}
    alignment:       {n_null, n_bootstrap, debiased}
    transplant:      {maps: [identity, ridge], ridge, n_prompts, n_null, n_bootstrap, generate}   generate: also
                                         grade generations with each transplanted direction ablated / added at
                                         the target's selected layer (the interventions settings and problems)

Unknown keys, a missing file, a stage config that does not exist: UserError before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from interp.errors import UserError
from interp.transplant import MAPS

PRESET_DIR = Path("configs/presets")
STAGES = ("probes", "directions", "tuned_lens", "interventions", "logit_lens", "alignment", "transplant", "summary")
PER_MODEL_STAGES = ("probes", "directions", "tuned_lens", "interventions", "logit_lens")
_SECTIONS = {
    "interventions": {"greedy": False, "max_new_tokens": 512, "n_prompts": None, "n_random": 4,
                      "strengths": [1.0, 4.0], "seed": 0},
    "logit_lens": {"n_bootstrap": 1000},
    "alignment": {"n_null": 99, "n_bootstrap": 1000, "debiased": False},
    "transplant": {"maps": ["identity", "ridge"], "ridge": 0.01, "n_prompts": 32, "n_null": 8, "n_bootstrap": 1000,
                   "generate": False},
}  # fmt: skip


@dataclasses.dataclass
class Preset:
    name: str
    models: dict[str, str]
    sources: list[dict]
    probes: str
    directions: str
    layers: list[int] | None = None
    tuned_lens: str | None = None
    interventions: dict = dataclasses.field(default_factory=dict)
    logit_lens: dict = dataclasses.field(default_factory=dict)
    alignment: dict = dataclasses.field(default_factory=dict)
    transplant: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_path(name: str) -> Path:
    """configs/presets/<name>.yaml for a bare name, else the path as given."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise UserError(f"unknown preset {name!r}: no {path} (presets: {', '.join(known)})")
    return path


def load_preset(name: str, model1: str | None = None, model2: str | None = None,
                n_problems: int | None = None) -> Preset:  # fmt: skip
    """The preset with the command line's overrides: model1 / model2 replace the first / second backbone,
    n_problems the `limit` of every source."""
    path = preset_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UserError(f"{path}: unknown preset keys {unknown} (known: {', '.join(sorted(fields))})")
    missing = [key for key in ("models", "sources", "probes", "directions") if not raw.get(key)]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}")
    models = dict(raw["models"])
    if len(models) != 2 or any(not str(label).isidentifier() for label in models):
        raise UserError(f"{path}: models must name exactly two backbones under identifier labels, got {list(models)}")
    labels = list(models)
    for label, override in zip(labels, (model1, model2)):
        if override:
            models[label] = override
    sources = [dict(source) for source in raw["sources"]]
    if n_problems is not None:
        if n_problems < 4:
            raise UserError(f"--n_problems must be >= 4 (train, val and test splits need problems), got {n_problems}")
        sources = [{**source, "limit": n_problems} for source in sources]
    for key in ("probes", "directions", "tuned_lens"):
        if raw.get(key) is not None and not Path(raw[key]).is_file():
            raise UserError(f"{path}: {key} config {raw[key]!r} does not exist")
    sections = {}
    for section, defaults in _SECTIONS.items():
        given = raw.get(section) or {}
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise UserError(f"{path}: unknown {section} settings {bad} (known: {', '.join(defaults)})")
        sections[section] = {**defaults, **given}
    bad_maps = sorted(set(sections["transplant"]["maps"]) - set(MAPS))
    if bad_maps:
        raise UserError(f"{path}: unknown transplant maps {bad_maps} (known: {', '.join(MAPS)})")
    return Preset(name=path.stem, models=models, sources=sources, probes=raw["probes"], directions=raw["directions"],
                  layers=raw.get("layers"), tuned_lens=raw.get("tuned_lens"), **sections)  # fmt: skip


def parse_stages(text: str | None) -> list[str]:
    """'a,b' -> the named stages in STAGES order (None: all); unknown names: UserError."""
    if not text:
        return list(STAGES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise UserError(f"unknown stages {unknown or [text]}; stages: {', '.join(STAGES)}")
    return [stage for stage in STAGES if stage in names]
