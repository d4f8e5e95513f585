"""Figures (matplotlib, Agg backend): per-layer curves and heatmaps. Return Figures; callers save or log them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_layer_curves(
    layers: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str = "",
    chance: float | None = None,
    xlabel: str = "layer",
) -> Figure:
    """One line per named curve against the layer index (e.g. probe accuracy vs layer; `xlabel` for another axis)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in curves.items():
        ax.plot(list(layers), [float(v) for v in values], marker="o", markersize=3, label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence,
    column_labels: Sequence,
    xlabel: str,
    ylabel: str,
    title: str = "",
    colorbar_label: str = "",
    center: float | None = None,
) -> Figure:
    """A [n_rows, n_columns] grid of values (e.g. patching: layer x position); NaN cells stay blank.

    `center`: a diverging colour map symmetric around this value (e.g. 0); otherwise viridis.
    """
    import numpy as np

    grid = np.asarray([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    width = min(max(4.0, 0.9 * grid.shape[1] + 2.5), 14.0)
    height = min(max(3.0, 0.22 * grid.shape[0] + 1.5), 14.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    kwargs: dict = {"cmap": "viridis"}
    if center is not None:
        finite = grid[np.isfinite(grid)]
        spread = float(np.abs(finite - center).max()) if finite.size else 1.0
        spread = spread if spread > 0 else 1.0
        kwargs = {"cmap": "RdBu_r", "vmin": center - spread, "vmax": center + spread}
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", **kwargs)
    ax.set_xticks(range(grid.shape[1]), [str(label) for label in column_labels], rotation=45, ha="right", fontsize=8)
    step = max(1, grid.shape[0] // 16)
    ax.set_yticks(range(0, grid.shape[0], step), [str(row_labels[i]) for i in range(0, grid.shape[0], step)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    return fig


def _band(ax, layers, values, low=None, high=None, label="", **kwargs) -> None:
    ax.plot(list(layers), [float("nan") if v is None else float(v) for v in values], marker="o", markersize=3,
            label=label, **kwargs)  # fmt: skip
    if low is not None and high is not None:
        ax.fill_between(list(layers), [float("nan") if v is None else float(v) for v in low],
                        [float("nan") if v is None else float(v) for v in high], alpha=0.2, **kwargs)  # fmt: skip


def create_summary_figure(
    probe_results: Mapping[str, dict],
    direction_similarities: dict,
    cka_diagonal: dict,
    save_path=None,
    transplant: Mapping[str, dict] | None = None,
    layers: Sequence[int] | None = None,
) -> Figure:
    """The study on one page, four panels against the layer index:

    probe_results: {model label: probe_accuracies.json} -> test accuracy and selectivity of each model's probes;
    direction_similarities: alignment_results' "direction_cosine" -> cosine of the two reasoning directions with
        its bootstrap CI and the matched / independent placebo p95;
    cka_diagonal: alignment_results' "cka" -> CKA diagonal with its CI and the permutation null's p95;
    transplant: {"A->B": transplant entry} -> ratio of ablation effects (transplanted / own) per map, with CIs;
    layers: the model layers of the alignment lists (default 0..L-1). Saved to save_path when given (PNG).
    """
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    ax = axes[0, 0]
    for label, report in probe_results.items():
        rows = report["layers"]
        _band(ax, [r["layer"] for r in rows], [r["accuracy"] for r in rows], label=f"{label} accuracy")
        _band(ax, [r["layer"] for r in rows], [r["selectivity"] for r in rows], label=f"{label} selectivity",
              linestyle="--")  # fmt: skip
    ax.set_title("linear probes (test): reasoning vs control")
    cosine = direction_similarities
    layers = list(layers if layers is not None else range(len(cosine["value"])))
    ax = axes[0, 1]
    ci = cosine.get("ci") or [[None, None]] * len(layers)
    _band(ax, layers, cosine["value"], [c[0] for c in ci], [c[1] for c in ci], label="cos(r1, r2)")
    _band(ax, layers, cosine["matched_placebo"]["p95"], label="matched placebo p95", color="grey", linestyle="--")
    _band(ax, layers, cosine["independent_placebo"]["p95"], label="independent placebo p95", color="grey",
          linestyle=":")  # fmt: skip
    ax.set_title("reasoning-direction cosine (identity basis)")
    ax = axes[1, 0]
    _band(ax, layers, cka_diagonal["diagonal"], [c[0] for c in cka_diagonal["ci"]], [c[1] for c in cka_diagonal["ci"]],
          label="CKA(layer l, layer l)")  # fmt: skip
    _band(ax, layers, cka_diagonal["null_p95"], label="permutation p95", color="grey", linestyle="--")
    ax.set_title("linear CKA, same layer")
    ax = axes[1, 1]
    for name, entry in (transplant or {}).items():
        for method, scores in entry.get("transplanted", {}).items():
            score = scores["ablation_score"]
            ci = [c or [None, None] for c in score["ci"]]
            _band(ax, entry["layers"], score["ratio"], [c[0] for c in ci], [c[1] for c in ci], label=f"{name} {method}")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.axhline(0.0, color="grey", linewidth=1, linestyle=":")
    ax.set_title("transplant: ablation effect / own direction's")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    if save_path is not None:
        from interp.atomic import save_figure

        save_figure(fig, save_path)
    return fig
