"""Figures (matplotlib, Agg backend): per-layer curves. Return Figures; callers save or log them."""

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
