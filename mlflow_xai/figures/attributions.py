"""Figures of attributions and conductance.

Each function takes numbers from :mod:`mlflow_xai.inspect.attributions` and returns
a :class:`matplotlib.figure.Figure` built without pyplot: no global figure registry,
no backend selection, nothing shown or saved -- the caller renders it (e.g. with
``FigureCanvasAgg``) or hands it to ``mlflow.log_figure``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlflow_xai.errors import XAIError
from mlflow_xai.figures.style import inches_rect, message_figure

__all__ = ["attribution_bar", "conductance_figure", "weights_vs_conductance"]

_POS, _NEG = "tab:blue", "tab:red"
#: Layers with more units than this are drawn as one line per unit in a single
#: ``LineCollection`` on a figure of bounded width, instead of one bar artist per unit
#: (thousands of patches, and a figure inches wide per hundred units).
WIDE_UNITS = 256
#: The widest figure, in inches, of a per-unit plot.
MAX_WIDTH = 16.0


def _per_unit(values: np.ndarray, what: str) -> np.ndarray:
    """Mean over the batch (and spatial positions) -> one value per unit/channel."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        return v
    if v.ndim >= 2 and v.shape[0] > 0:
        # (batch, units, *spatial): average everything but the unit axis.
        return v.reshape(v.shape[0], v.shape[1], -1).mean(axis=(0, 2))
    raise XAIError(f"{what} must be (units,) or (batch, units, ...), got shape {v.shape}")


def attribution_bar(method: str, ranked: Sequence[tuple[str, float]], top: int = 10) -> Figure:
    """Horizontal bars of the ``top`` features by mean |attribution|, the largest on top.

    Args:
        method: The attribution method, for the title.
        ranked: ``[(feature, mean_abs), ...]`` sorted descending, as from
            :func:`mlflow_xai.inspect.attributions.rank_features`.
        top: How many features to show.

    Example:
        >>> fig = attribution_bar("integrated_gradients", [("bmi", 2.0), ("age", 1.0)])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['bmi', 'age']
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise XAIError(f"top must be a positive integer, got {top!r}")
    shown = list(ranked)[:top]
    title = f"{method}: mean |attribution| per feature"
    if not shown:
        return message_figure(title, "no features to rank")
    names = [str(n) for n, _ in shown]
    values = np.array([float(v) for _, v in shown])
    # Fixed margins (a layout engine would measure every label and draw twice): the
    # left one fits the longest feature name at the tick labels' size.
    left = min(0.3 + 0.075 * max(len(n) for n in names), 3.5)
    fig = Figure(figsize=(max(6.4, 5.3 + left), 1.1 + 0.3 * len(shown)))  # the title fits above the bars
    ax = fig.add_axes(inches_rect(fig, left=left, right=0.3, bottom=0.6, top=0.4))
    y = np.arange(len(shown))
    ax.barh(y, values, color=_POS)
    ax.set_yticks(y, names)
    # Row 0 is the top feature; inverting puts it on top, where people read first.
    ax.invert_yaxis()
    ax.set_xlabel("mean |attribution| over the batch")
    suffix = f" (top {len(shown)} of {len(ranked)})" if len(ranked) > len(shown) else ""
    ax.set_title(title + suffix, fontsize=10, y=1.0)
    ax.grid(axis="x", alpha=0.3)
    return fig


def conductance_figure(layer: str, values: np.ndarray) -> Figure:
    """Bars of the mean conductance of each unit of ``layer``.

    Args:
        layer: Qualified layer name, for the title.
        values: Conductance, ``(batch, units)`` (averaged here over the batch) or
            already one value per unit.

    A layer of more than :data:`WIDE_UNITS` units is drawn as one vertical line per
    unit (a single ``LineCollection``) on a figure at most :data:`MAX_WIDTH` inches wide.

    Example:
        >>> fig = conductance_figure("layers.0", np.array([[0.5, -0.2], [0.3, 0.0]]))
        >>> len(fig.axes[0].patches)
        2
    """
    per_unit = _per_unit(values, "conductance")
    title = f"conductance of {layer}: mean per unit"
    if per_unit.size == 0:
        return message_figure(title, "the layer has no units")
    fig = Figure(figsize=(_width(per_unit.size), 3.6))
    ax = fig.add_axes(inches_rect(fig, left=0.95, right=0.3, bottom=0.6, top=0.4))
    ax.yaxis.get_major_formatter().set_powerlimits((-3, 4))  # short tick labels fit the margin
    units = np.arange(per_unit.size)
    # Sign matters: a negative unit pushes the output down along the path.
    _unit_bars(ax, units, per_unit, np.where(per_unit >= 0, _POS, _NEG))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("unit")
    ax.set_ylabel("mean conductance")
    ax.set_title(title, fontsize=10, y=1.0)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _width(units: int) -> float:
    return min(MAX_WIDTH, max(6.4, 0.12 * units))


def _unit_bars(ax: Axes, units: np.ndarray, values: np.ndarray, colors: np.ndarray) -> None:
    """One bar per unit; beyond :data:`WIDE_UNITS` units one line per unit in a single artist."""
    if values.size > WIDE_UNITS:
        ax.vlines(units, 0.0, values, colors=colors, linewidth=0.6)
        ax.set_xlim(-0.5, values.size - 0.5)
    else:
        ax.bar(units, values, color=colors)


def _scaled(v: np.ndarray) -> np.ndarray:
    # Divide by the largest magnitude, not the maximum (the cookbook's choice): the
    # maximum can be negative or zero, which flips signs or divides by zero.
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    return v / peak if peak > 0 else v


def weights_vs_conductance(
    layer: str, weights_per_unit: np.ndarray, conductance_per_unit: np.ndarray
) -> Figure:
    """The spotpython cookbook's comparison: a hidden layer's outgoing weights vs. its conductance.

    Left: each unit's weight into the output and its mean conductance side by side,
    each scaled to [-1, 1] by its largest magnitude so the two can share an axis.
    Right: raw weight against raw conductance, one point per unit, with Pearson's r:
    a unit with a large weight but little conductance is rarely active on this data.

    Args:
        layer: Qualified name of the (last hidden) layer whose units are compared.
        weights_per_unit: The output layer's weight per unit of ``layer``, shape
            ``(units,)`` (a ``(1, units)`` weight matrix is accepted).
        conductance_per_unit: Conductance per unit ``(units,)``, or ``(batch, units)``
            averaged here over the batch.

    Example:
        >>> fig = weights_vs_conductance("layers.12", np.array([0.5, -1.0]), np.array([0.2, -0.4]))
        >>> len(fig.axes)
        2
    """
    w = np.asarray(weights_per_unit, dtype=float)
    if w.ndim == 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 1:
        raise XAIError(
            f"weights_per_unit must have one value per unit, got shape {w.shape}; for a "
            "multi-output layer pass the row of the explained output"
        )
    c = _per_unit(conductance_per_unit, "conductance_per_unit")
    if c.shape != w.shape:
        raise XAIError(
            f"{w.size} weights but {c.size} conductance values; pass the weights of the layer "
            f"that reads {layer!r} (its units are the weights' columns)"
        )
    fig = Figure(figsize=(11.0, 4.0))
    fig.suptitle(f"{layer}: outgoing weights vs. conductance per unit", y=0.97)
    # Fixed margins in inches: bars 0.8-7.1, scatter 8.05-10.75 (room for its y labels).
    bars = fig.add_axes(inches_rect(fig, left=0.8, right=3.9, bottom=0.6, top=0.6))
    scatter = fig.add_axes(inches_rect(fig, left=8.05, right=0.25, bottom=0.6, top=0.6))
    for ax in (bars, scatter):
        ax.yaxis.get_major_formatter().set_powerlimits((-3, 4))
    scatter.xaxis.get_major_formatter().set_powerlimits((-3, 4))
    scatter.xaxis.set_major_locator(MaxNLocator(nbins=4))
    units = np.arange(w.size)
    width = 0.4
    if w.size > WIDE_UNITS:  # one LineCollection per series, as in conductance_figure
        bars.vlines(units - width / 2, 0.0, _scaled(w), colors="tab:gray", linewidth=0.5, label="weight (scaled)")
        bars.vlines(units + width / 2, 0.0, _scaled(c), colors=_POS, linewidth=0.5, label="conductance (scaled)")
        bars.set_xlim(-0.5, w.size - 0.5)
    else:
        bars.bar(units - width / 2, _scaled(w), width, label="weight (scaled)", color="tab:gray")
        bars.bar(units + width / 2, _scaled(c), width, label="conductance (scaled)", color=_POS)
    bars.axhline(0.0, color="black", linewidth=0.8)
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_xlabel("unit")
    bars.set_ylabel("value / max |value|")
    bars.legend(loc="best")
    scatter.scatter(w, c, color=_POS)
    scatter.axhline(0.0, color="black", linewidth=0.5)
    scatter.axvline(0.0, color="black", linewidth=0.5)
    scatter.set_xlabel("weight into the output")
    scatter.set_ylabel("mean conductance")
    r = _pearson(w, c)
    scatter.set_title("Pearson r = n/a" if r is None else f"Pearson r = {r:.2f}", fontsize=10, y=1.0)
    return fig


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    # Undefined for fewer than two units or a constant vector; say so instead of NaN.
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
