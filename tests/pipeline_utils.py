"""Helpers for end-to-end tests: shrink a shipped config to the tiny backbone and a few embedded problems."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(config_name: str, tmp_path: Path, limit: int = 12, **data_overrides) -> Path:
    """Copy configs/<config_name> with the tiny stand-in backbone, embedded data and a tmp cache dir."""
    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    data = config["data"]["init_args"]
    real = data["backbone"]["name_or_path"]
    data["backbone"] = {"name_or_path": "tiny-r1-distill" if "R1-Distill" in real else "tiny", "dtype": "float32"}
    prompts = data["prompts"]["init_args"]
    prompts["sources"] = [
        {"name": "gsm8k", "path": "embedded", "split": "test", "limit": limit},
        {"name": "math", "path": "embedded", "split": "test", "limit": limit},
    ]
    if "cache_dir" in data:  # the modules that train on cached activations
        data["cache_dir"] = str(tmp_path / "cache")
    data.update(data_overrides)
    config["trainer"]["accelerator"] = "cpu"
    path = tmp_path / f"tiny_{config_name}"
    path.write_text(yaml.safe_dump(config))
    return path


def build_datamodule(cache_dir, limit: int = 10, layers=None, positions: str = "last_2", batch_size: int = 4, **kwargs):
    """A small CachedActivationDataModule on the tiny backbone and embedded data."""
    from datamodules.activations import CachedActivationDataModule
    from datamodules.problems import DatasetSource
    from datamodules.prompts import ReasoningPromptsDataModule
    from interp.backbone import BackboneSpec

    prompts = ReasoningPromptsDataModule(
        sources=[DatasetSource("gsm8k", limit=limit), DatasetSource("math", limit=limit)], batch_size=batch_size
    )
    return CachedActivationDataModule(
        prompts=prompts, backbone=BackboneSpec("tiny"), layers=layers, positions=positions, cache_dir=str(cache_dir),
        **kwargs,
    )


def cache_contents(cache) -> tuple[dict, torch.Tensor]:
    """Everything in an activation cache, in row order: (metadata columns but the shard locations,
    activations [rows, n_pos, n_layers, d_model])."""
    meta = cache.metadata()
    acts = torch.cat([shard["activations"] for shard in cache.iter_shards()])
    rows = torch.cat([shard["row_index"] for shard in cache.iter_shards()])
    return {k: v for k, v in meta.items() if not k.startswith("shard")}, acts[rows.argsort()]


def open_in_browser(browser, report: Path) -> None:
    """Load a report.html from disk in the `browser` fixture's chromium; no console error may occur."""
    browser.get(Path(report).resolve().as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
