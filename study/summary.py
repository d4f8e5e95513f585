"""The summary stage: logs/<run>/visualizations/ (summary.png, logit_lens.png, cka_<role>.png and a copy of every
per-model figure as <label>_<name>.png), the same figures plus per-layer scalars in TensorBoard (logs/<run>/study), and
logs/<run>/report.html (both models and the pair in one interactive page, `interp.report_html`)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
from lightning.pytorch.loggers import TensorBoardLogger

from cli import LOG_ROOT
from interp.atomic import copy_file, save_figure
from interp.plots import create_summary_figure, plot_heatmap, plot_layer_curves
from interp.report_html import provenance, write_study_report_html
from study.stages import OUTPUTS, Study

SUMMARY_ROLE = "last"  # the role the summary figure shows (alignment_results.json holds every role)


def _read(path) -> dict:
    return json.loads(path.read_text())


def run_summary(study: Study) -> None:
    out = study.root / "visualizations"
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    alignment = _read(study.output("alignment"))
    transplant = _read(study.output("transplant"))["transfers"] if study.output("transplant").is_file() else None
    probes = {label: _read(study.output("probes", label)) for label in study.labels
              if study.output("probes", label).is_file()}  # fmt: skip
    role = alignment["roles"][SUMMARY_ROLE]
    figures["summary"] = create_summary_figure(probes, role["direction_cosine"], role["cka"], transplant=transplant,
                                               layers=alignment["layers"])  # fmt: skip
    for name, block in alignment["roles"].items():
        figures[f"cka_{name}"] = plot_heatmap(block["cka"]["matrix"], alignment["layers"], alignment["layers"],
                                              f"{study.labels[1]} layer", f"{study.labels[0]} layer",
                                              title=f"linear CKA at the {name} token", colorbar_label="CKA")  # fmt: skip
    lens = {label: _read(study.output("logit_lens", label)) for label in study.labels
            if study.output("logit_lens", label).is_file()}  # fmt: skip
    if lens:
        readouts = {f"{label} {name}": block for label, report in lens.items()
                    for name, block in (("logit lens", report), ("tuned lens", report.get("tuned_lens"))) if block}  # fmt: skip
        curves = {f"{name}: KL(final || lens)": block["kl"]["mean"] for name, block in readouts.items()}
        lens_layers = next(iter(lens.values()))["layers"]
        figures["logit_lens"] = plot_layer_curves(lens_layers, curves, "nats",
                                                  title="lenses at the last prompt token")  # fmt: skip
        curves = {f"{name}: {target}": block[target]["prob"]["mean"] for name, block in readouts.items()
                  for target in ("answer", "solution")}  # fmt: skip
        figures["logit_lens_targets"] = plot_layer_curves(lens_layers, curves, "probability of the first token",
                                                          title="lenses: gold answer / solution first token")  # fmt: skip
    logger = TensorBoardLogger(save_dir=str(LOG_ROOT), name=study.run, version="study")
    for name, figure in figures.items():
        logger.experiment.add_figure(f"study/{name}", figure)
    for i, layer in enumerate(alignment["layers"]):
        logger.log_metrics({f"study/cka_{SUMMARY_ROLE}": role["cka"]["diagonal"][i],
                            f"study/direction_cosine_{SUMMARY_ROLE}": role["direction_cosine"]["value"][i]}, step=layer)  # fmt: skip
    logger.finalize("success")
    for label in study.labels:  # every per-model figure beside the summary
        for png in sorted((study.model_dir(label) / "visualizations").glob("*.png")):
            copy_file(png, out / f"{label}_{png.name}")
    summary = figures.pop("summary")
    for name, figure in figures.items():
        save_figure(figure, out / f"{name}.png")
        plt.close(figure)
    write_study_report_html(study.root, study.labels, provenance())
    save_figure(summary, study.root / OUTPUTS["summary"])  # last: it marks the stage finished
    plt.close(summary)
