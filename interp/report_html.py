"""report.html: one self-contained file per result folder that shows a run's artifacts interactively.

    write_report_html(output_dir, provenance)   # evaluate.py calls it after writing a run's result files

It embeds, verbatim, every known result file found in `output_dir` (`ARTIFACTS`) plus the run's provenance, as one
JSON block (<script id="report-data" type="application/json">); the page's script (interp/assets/report.html, plain
JavaScript and SVG: no network, no server, no library) draws everything from that block and computes nothing:
- every artifact with a "layers" list ({"layer": int, <metric>: number, ...}): one chart of its metrics vs layer
  (hover: the values at the nearest layer; click: select that layer), a row's "ci" [low, high] the band of its first
  metric (ablation_results.json: each layer ablated, and the selected direction ablated against its null); with
  "layers" a list of ints (logit_lens.json), every array of numbers as long as it is a metric, a sibling "ci" its band;
- the tuned lens's and logit lens's top next tokens (tuned_lens_results.json "top_tokens") at the selected layer,
  beside the model's own output;
- a patching sweep (patching_results.json, written by callbacks/patching.py into the run's log folder): the fraction
  recovered per (layer, post-instruction token) as a heatmap, hover giving its Fieller CI or why the cell is cut;
- a directions run's candidates (reasoning_directions.json): the selection scores by layer per position, the
  selected candidate and its report on held-out problems;
- one layer control (a slider) for the whole page: a table shows every per-layer metric at the selected layer;
- every artifact with "conditions" (the intervention and steering reports): accuracy per condition with the gold-NLL
  mean and CI, and the generated samples, graded, with the truncation flag, filterable by condition and correctness;
- the provenance: the exact config, the backbone fingerprint, package versions and the command.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

from interp.atomic import write_text
from interp.errors import UserError

ARTIFACTS = ("probe_accuracies.json", "reasoning_directions.json", "tuned_lens_results.json", "intervention_results.json",
             "steering_results.json", "logit_lens.json", "ablation_results.json", "patching_results.json")  # fmt: skip
STUDY_FILES = ("alignment_results.json", "transplant_results.json")
REPORT_FILE = "report.html"
TEMPLATE = Path(__file__).parent / "assets" / "report.html"
PACKAGES = ("torch", "transformers", "lightning", "datasets", "safetensors")


def package_versions() -> dict[str, str | None]:
    """The installed versions of the packages that decide the numbers (None: not installed)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(config_yaml: str | None = None, fingerprint: dict | None = None) -> dict:
    """What produced a report: the run's config (YAML text), backbone fingerprint, package versions, command."""
    return {"config": config_yaml, "backbone": fingerprint, "versions": package_versions(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}  # fmt: skip


def read_artifacts(folder: str | Path) -> dict:
    """{file name: its JSON, verbatim} for every ARTIFACTS file in folder."""
    folder = Path(folder)
    return {name: json.loads((folder / name).read_text()) for name in ARTIFACTS if (folder / name).is_file()}


def write_report_html(output_dir: str | Path, provenance: dict) -> Path:
    """output_dir/report.html (module docstring), written atomically; returns its path."""
    return _write(Path(output_dir) / REPORT_FILE, {"artifacts": read_artifacts(output_dir), "provenance": provenance})


def write_study_report_html(root: str | Path, labels: list[str], provenance: dict) -> Path:
    """root/report.html of a two-model study (study/stages.py layout): besides the layer-wise sections of each
    model's folder (artifacts named "<label>/<file>", so the layer table shows both models at one layer), the pair's
    STUDY_FILES: per token role the CKA matrix as a heatmap (hover: the layer pair and value), the CKA diagonal with
    its bootstrap CI and permutation p95, the direction cosine with its CI and matched-placebo p95, and the
    transplant results."""
    root = Path(root)
    artifacts = {f"{label}/{name}": artifact for label in labels
                 for name, artifact in read_artifacts(root / label).items()}  # fmt: skip
    study = {name.removesuffix("_results.json"): json.loads((root / name).read_text()) for name in STUDY_FILES
             if (root / name).is_file()}  # fmt: skip
    return _write(root / REPORT_FILE, {"artifacts": artifacts, "study": study, "provenance": provenance})


def write_comparison_html(first: str | Path, second: str | Path, output_dir: str | Path, provenance: dict) -> Path:
    """output_dir/report.html overlaying two result folders: their artifacts as "<folder name>/<file>", and for each
    file both hold, one chart per per-layer metric with the two runs as its series."""
    folders = [Path(first), Path(second)]
    names = [folder.name if folder.name != other.name else str(folder) for folder, other in zip(folders, folders[::-1])]
    for folder in folders:
        if not any((folder / name).is_file() for name in ARTIFACTS):
            raise UserError(f"--compare {folder}: no result file ({', '.join(ARTIFACTS)}) in it")
    artifacts = {f"{name}/{file}": artifact for name, folder in zip(names, folders)
                 for file, artifact in read_artifacts(folder).items()}  # fmt: skip
    compare = {"runs": names, "files": [file for file in ARTIFACTS if all((f / file).is_file() for f in folders)]}
    return _write(Path(output_dir) / REPORT_FILE, {"artifacts": artifacts, "compare": compare, "provenance": provenance})


def _write(path: Path, data: dict) -> Path:
    text = json.dumps(data, allow_nan=False)
    # No "<" at all inside the data block: a "</script>" in a generated sample would end it, and "<!--" then
    # "<script" anywhere in the data would make the parser skip its real end (HTML's script data escape states).
    text = text.replace("<", "\\u003c")
    return write_text(path, TEMPLATE.read_text().replace("__REPORT_DATA__", text))


def read_embedded_data(report: str | Path) -> dict:
    """The JSON block of a written report (for checks: it must equal the artifacts)."""
    text = Path(report).read_text()
    start = text.index('<script id="report-data" type="application/json">') + len(
        '<script id="report-data" type="application/json">')
    return json.loads(text[start:text.index("</script>", start)])  # JSON reads "\u003c" as "<"
