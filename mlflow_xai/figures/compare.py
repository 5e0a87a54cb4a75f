"""Figures of a comparison of two networks (:mod:`mlflow_xai.inspect.compare`).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot; the
difference heatmaps are :func:`mlflow_xai.figures.layers.heatmap` of ``W_b - W_a``, and the grids
use the layout helpers of :mod:`mlflow_xai.figures.style`, so both kinds of figure look alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from matplotlib.ticker import FuncFormatter

from mlflow_xai.figures.style import (
    GRID_COLUMNS,
    HIST_CELL,
    HIST_GAP,
    HIST_MARGIN,
    NICE_STEPS,
    InViewLocator,
    compact_count,
    fixed_grid,
    inches_rect,
    message_figure,
    style_panel,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from mlflow_xai.inspect.compare import PredictionShift
    from mlflow_xai.inspect.results import Histogram

__all__ = ["drift_bars", "overlaid_distributions", "prediction_figure"]

COLOR_A = "#4c72b0"
COLOR_B = "#dd8452"


def drift_bars(title: str, values: Mapping[str, float], *, threshold: float | None = None,
               xlabel: str = "relative L2 change") -> Figure:
    """One horizontal bar per layer (in the mapping's order, top to bottom).

    Args:
        title: Figure title.
        values: Layer name to its drift; NaN/Inf bars are drawn at the axis end in red.
        threshold: Draws a dashed line there (``--fail-above``); bars above it are red.
        xlabel: Label of the value axis.

    Returns:
        The figure.

    Example:
        >>> len(drift_bars("weight drift", {"layers.0": 0.1, "layers.3": 0.5}).axes)
        1
    """
    if not values:
        return message_figure(title, "no layer in common")
    names = list(values)
    raw = np.array([values[n] for n in names], dtype=np.float64)
    finite = raw[np.isfinite(raw)]
    top = max([float(finite.max()) if finite.size else 0.0, threshold or 0.0, 1e-12]) * 1.15
    shown = np.where(np.isfinite(raw), raw, top)
    over = ~np.isfinite(raw) | ((raw > threshold) if threshold is not None else np.zeros_like(raw, dtype=bool))
    fig = Figure(figsize=(7.0, 1.0 + 0.28 * len(names)))
    ax = fig.add_axes(inches_rect(fig, left=1.6, right=0.3, bottom=0.5, top=0.4))
    y = np.arange(len(names))
    ax.barh(y, shown, color=np.where(over, "#c44e52", COLOR_A), height=0.7)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, top)
    ax.xaxis.set_major_locator(InViewLocator(nbins=6, steps=NICE_STEPS))
    ax.tick_params(axis="x", labelsize=8)
    for yi, v in zip(y, raw, strict=True):
        label = f"{v:.3g}" if math.isfinite(v) else ("NaN" if math.isnan(v) else "Inf")
        ax.text(min(shown[yi], top), yi, f" {label}", va="center", ha="left" if shown[yi] < 0.8 * top else "right",
                fontsize=7)
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10, y=1.0)
    return fig


def overlaid_distributions(title: str, pairs: Mapping[str, tuple[Histogram, Histogram]],
                           labels: tuple[str, str] = ("A", "B")) -> Figure:
    """Per layer, A's and B's histograms (shared bin edges) drawn over each other.

    Args:
        title: Figure title.
        pairs: Layer name to ``(histogram_a, histogram_b)`` with the same edges.
        labels: Legend names of the two sides.

    Returns:
        The figure; one saying "no layer in common" for an empty mapping.
    """
    if not pairs:
        return message_figure(title, "no layer in common")
    ncols = min(GRID_COLUMNS, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig, grid = fixed_grid(nrows, ncols, HIST_CELL, HIST_GAP, HIST_MARGIN)
    for i, (name, (ha, hb)) in enumerate(pairs.items()):
        ax = fig.add_subplot(grid[divmod(i, ncols)])
        _draw_pair(ax, name, ha, hb)
    fig.legend(handles=[StepPatch([1], [0, 1], color=COLOR_A, alpha=0.55, fill=True),
                        StepPatch([1], [0, 1], color=COLOR_B, alpha=0.55, fill=True)],
               labels=list(labels), loc="upper right", fontsize=8, frameon=False, ncols=2)
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top")
    fig.supxlabel("value", fontsize=9, y=0.06 / fig.get_figheight(), va="bottom")
    fig.supylabel("count", fontsize=9, x=0.08 / fig.get_figwidth())
    return fig


def _draw_pair(ax: Axes, name: str, ha: Histogram, hb: Histogram) -> None:
    style_panel(ax, name)
    edges = np.asarray(ha.edges, dtype=np.float64)
    peak = 0.0
    for hist, color in ((ha, COLOR_A), (hb, COLOR_B)):
        counts = np.asarray(hist.counts, dtype=np.float64)
        if counts.sum() > 0:
            ax.add_artist(StepPatch(counts, edges, baseline=0, fill=True, facecolor=color, alpha=0.55, linewidth=0))
            peak = max(peak, float(counts.max()))
    if peak > 0 and np.isfinite(edges).all():
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(0, peak * 1.05)
    ax.yaxis.set_major_locator(InViewLocator(nbins=4, steps=NICE_STEPS, integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(compact_count))


def prediction_figure(shift: PredictionShift, labels: tuple[str, str] = ("A", "B"), unit: str = "") -> Figure:
    """B's predictions against A's on the same rows.

    Regression: a scatter of B over A with the diagonal, and a histogram of ``B - A``.
    Classification: counts of (A's class, B's class) as a matrix; off-diagonal cells
    are rows where the two disagree.

    Args:
        shift: The result of :func:`mlflow_xai.inspect.compare.prediction_shift`.
        labels: Names of the two sides.
        unit: Unit of a regression prediction, for the axis labels.

    Returns:
        The figure.
    """
    la, lb = labels
    suffix = f" ({unit})" if unit else ""
    if shift.task == "classification":
        ca, cb = shift.pred_a.argmax(axis=1), shift.pred_b.argmax(axis=1)
        k = int(shift.pred_a.shape[1])
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (ca, cb), 1)
        fig = Figure(figsize=(5.0, 4.4))
        ax = fig.add_axes(inches_rect(fig, left=0.9, right=0.3, bottom=0.7, top=0.6))
        ax.imshow(matrix, cmap="Blues", interpolation="nearest")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xlabel(f"class predicted by {lb}", fontsize=9)
        ax.set_ylabel(f"class predicted by {la}", fontsize=9)
        ax.set_title(f"predictions on {shift.rows} rows: {shift.agreement:.1%} agree", fontsize=10, y=1.0)
        return fig
    fig = Figure(figsize=(10.0, 4.2))
    left = fig.add_axes((0.08, 0.14, 0.38, 0.74))
    right = fig.add_axes((0.58, 0.14, 0.38, 0.74))
    a, b = shift.pred_a, shift.pred_b
    ok = np.isfinite(a) & np.isfinite(b)
    left.scatter(a[ok], b[ok], s=10, color=COLOR_A, alpha=0.7, linewidths=0)
    if ok.any():
        lo, hi = float(min(a[ok].min(), b[ok].min())), float(max(a[ok].max(), b[ok].max()))
        left.plot([lo, hi], [lo, hi], color="gray", linewidth=1, linestyle="--")
    left.set_xlabel(f"{la}{suffix}", fontsize=9)
    left.set_ylabel(f"{lb}{suffix}", fontsize=9)
    left.set_title(f"{lb} vs {la} on {shift.rows} rows (diagonal: equal)", fontsize=10)
    left.tick_params(labelsize=8)
    d = (b - a)[ok]
    if d.size:
        right.hist(d, bins=min(40, max(5, d.size // 4)), color=COLOR_B, alpha=0.8)
    right.axvline(0.0, color="gray", linewidth=1, linestyle="--")
    right.set_xlabel(f"{lb} \u2212 {la}{suffix}", fontsize=9)
    right.set_ylabel("rows", fontsize=9)
    right.set_title(f"difference: RMS {shift.rmse_diff:.3g}, max |d| {shift.max_abs_diff:.3g}", fontsize=10)
    right.tick_params(labelsize=8)
    return fig
