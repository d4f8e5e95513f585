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
) -> Figure:
    """One line per named curve against the layer index (e.g. probe accuracy vs layer)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in curves.items():
        ax.plot(list(layers), [float(v) for v in values], marker="o", markersize=3, label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("layer")
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
