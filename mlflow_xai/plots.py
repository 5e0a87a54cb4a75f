"""Figures from the results of :mod:`mlflow_xai.inspect`.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so
nothing here touches global state, opens a window or leaks figures in a long-running
process; :func:`figure_to_png` turns a figure into PNG bytes for logging. All figures
render when the data holds NaN or Inf: non-finite cells are drawn in :data:`BAD_COLOR`.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Mapping, Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from mlflow_xai.inspect.results import Histogram, LayerActivations, TensorStats

__all__ = [
    "BAD_COLOR",
    "HasHistogram",
    "distribution_grid",
    "figure_to_png",
    "heatmap",
    "mean_activation_map",
]

#: Colour of NaN/Inf cells: magenta appears in neither the diverging nor the
#: sequential colormap, so a broken value cannot pass for a real one.
BAD_COLOR = "#ff00ff"
DIVERGING_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "viridis"
#: Default cap on the cells a heatmap draws: about the pixels a figure has anyway.
MAX_PIXELS = 256 * 256
_GRID_COLUMNS = 4


class HasHistogram(Protocol):
    """What :func:`distribution_grid` draws per layer.

    :class:`~mlflow_xai.inspect.results.LayerWeights`,
    :class:`~mlflow_xai.inspect.results.LayerActivations` and
    :class:`~mlflow_xai.inspect.results.LayerGradients` all satisfy it.
    """

    @property
    def histogram(self) -> Histogram: ...

    @property
    def stats(self) -> TensorStats: ...


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes with the Agg backend.

    Args:
        fig: The figure to render.
        dpi: Resolution in dots per inch.

    Returns:
        The PNG file's bytes.

    Example:
        >>> png = figure_to_png(heatmap("w", np.eye(3)))
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_figure(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def heatmap(
    name: str,
    values: np.ndarray,
    *,
    absolute: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Figure:
    """Draw a tensor as a 2-D heatmap.

    A matrix is drawn as is (a ``Linear`` weight: rows are output units, columns
    inputs); a 1-D vector as one row; anything with more dimensions as
    ``dim0 x (product of the rest)``, so a conv kernel ``(out, in, kh, kw)`` becomes
    ``out x (in*kh*kw)``. A matrix with more than ``max_pixels`` cells is reduced to
    block means over its finite values first, which keeps a 5120x2560 layer fast and
    still faithful to its large-scale structure; the title then names the block size
    and the axes keep the original indices.

    Args:
        name: Layer name shown in the title.
        values: The tensor's values.
        absolute: Draw ``|values|`` with a sequential colormap instead of the
            signed values with a diverging colormap centred on zero.
        max_pixels: Most cells drawn before block averaging kicks in.

    Returns:
        The figure.

    Example:
        >>> fig = heatmap("layers.0", np.array([[-1.0, 2.0], [0.5, 0.0]]))
        >>> fig.axes[0].images[0].get_clim() == (-2.0, 2.0)
        True
    """
    array = np.asarray(values)
    shape = tuple(array.shape)
    if array.size == 0:
        return _message_figure(f"{name}  {shape}", "empty tensor: nothing to show")
    matrix = _as_matrix(array)
    nonfinite = int(matrix.size - np.count_nonzero(np.isfinite(matrix)))
    if absolute:
        # Before averaging, so that +w and -w in one block do not cancel out.
        matrix = np.abs(matrix)
    rows, cols = matrix.shape
    block = _block_shape(rows, cols, max_pixels)
    shown = _block_mean(matrix, block)

    limit = _finite_abs_max(shown)
    if absolute:
        cmap, vmin, vmax = _cmap(SEQUENTIAL_CMAP), 0.0, limit
    else:
        cmap, vmin, vmax = _cmap(DIVERGING_CMAP), -limit, limit

    fig = Figure(figsize=(7.0, _heatmap_height(rows, cols)), layout="constrained")
    ax = fig.add_subplot()
    # The extent maps block cells back to original indices (cell i centred on i),
    # so the ticks read as row/column numbers even after block averaging.
    image = ax.imshow(
        np.ma.masked_invalid(shown),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{name}  shape {shape}"
    notes = []
    if block != (1, 1):
        notes.append(f"block mean over {block[0]}x{block[1]} cells")
    if nonfinite:
        notes.append(f"{nonfinite} NaN/Inf values (magenta)")
    if notes:
        title += "\n" + "; ".join(notes)
    ax.set_title(title, fontsize=10)
    _label_heatmap_axes(ax, shape)
    label = "|value|" if absolute else "value"
    fig.colorbar(image, ax=ax, label=label if block == (1, 1) else f"mean {label}")
    return fig


def distribution_grid(
    title: str,
    layers: Mapping[str, HasHistogram],
    *,
    log_y: bool = False,
) -> Figure:
    """Draw each layer's precomputed histogram in a grid of small panels.

    The histograms are drawn as computed by :mod:`mlflow_xai.inspect` (counts over
    bin edges, finite values only), not re-estimated, so the picture matches
    ``summary.json``. Each panel names the layer and shows the mean and standard
    deviation, plus the NaN/Inf counts when there are any.

    Args:
        title: Figure title, e.g. ``"weights"``.
        layers: Layer name to an object with ``.histogram`` and ``.stats``, e.g.
            ``explanation.weights``; drawn in the mapping's order, up to four panels
            per row.
        log_y: Use a logarithmic count axis, which shows sparse tails next to a
            large peak.

    Returns:
        The figure; one saying "nothing to show" for an empty mapping.

    Example:
        >>> from mlflow_xai.inspect.results import Histogram, LayerWeights, TensorStats
        >>> stats = TensorStats(4, 0.0, 1.0, -1.5, 1.5, 2.0, 0.0, 0, 0)
        >>> hist = Histogram(np.array([1, 2, 1]), np.array([-1.5, -0.5, 0.5, 1.5]))
        >>> w = LayerWeights("fc", "Linear", np.zeros((2, 2)), stats, hist)
        >>> len(distribution_grid("weights", {"fc": w}).axes)
        1
    """
    if not layers:
        return _message_figure(title, "nothing to show")
    ncols = min(_GRID_COLUMNS, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, layer) in zip(axes, layers.items()):
        _draw_histogram(ax, name, layer.histogram, layer.stats, log_y=log_y)
    for ax in axes[len(layers) :]:
        fig.delaxes(ax)
    fig.suptitle(title)
    fig.supxlabel("value", fontsize=9)
    fig.supylabel("count (log)" if log_y else "count", fontsize=9)
    return fig


def mean_activation_map(activations: Mapping[str, LayerActivations]) -> Figure:
    """Draw each layer's mean activation per unit as one strip per layer.

    One row per layer, units along x, each row on its own zero-centred scale with
    its own colour bar: widths (70, 140, 10 units) and magnitudes (a hidden ReLU
    near 1, an output near 100) differ too much between layers for one shared
    image to show every layer's pattern. A white cell is a unit whose mean is zero,
    which for a ReLU layer usually means a dead unit.

    Args:
        activations: Layer name to its activations, e.g. ``explanation.activations``;
            only ``mean_per_unit`` is drawn.

    Returns:
        The figure; one saying "nothing to show" for an empty mapping.

    Example:
        >>> from mlflow_xai.inspect.results import Histogram, LayerActivations, TensorStats
        >>> stats = TensorStats(3, 0.0, 1.0, -1.0, 1.0, 1.4, 0.0, 0, 0)
        >>> hist = Histogram(np.array([1, 1]), np.array([-1.0, 0.0, 1.0]))
        >>> act = LayerActivations("fc", "Linear", np.zeros((1, 3)), stats, hist,
        ...                        mean_per_unit=np.array([-1.0, 0.0, 1.0]))
        >>> len(mean_activation_map({"fc": act}).axes)  # the strip and its colour bar
        2
    """
    title = "mean activation per unit"
    if not activations:
        return _message_figure(title, "nothing to show")
    fig = Figure(figsize=(9.0, 0.95 * len(activations) + 0.8), layout="constrained")
    axes = fig.subplots(len(activations), 1, squeeze=False).ravel()
    cmap = _cmap(DIVERGING_CMAP)
    for ax, (name, layer) in zip(axes, activations.items()):
        means = np.asarray(layer.mean_per_unit, dtype=np.float64).ravel()
        nonfinite = int(means.size - np.count_nonzero(np.isfinite(means)))
        note = f", {nonfinite} NaN/Inf (magenta)" if nonfinite else ""
        ax.set_title(f"{name}  ({means.size} units{note})", loc="left", fontsize=9)
        ax.set_yticks([])
        if means.size == 0:
            _centre_text(ax, "no units")
            continue
        limit = _finite_abs_max(means)
        image = ax.imshow(
            np.ma.masked_invalid(means[np.newaxis, :]),
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, means.size - 0.5, 0.5, -0.5),
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        colorbar = fig.colorbar(image, ax=ax, pad=0.01, aspect=6)
        colorbar.ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("unit", fontsize=9)
    fig.suptitle(title)
    return fig


def _as_matrix(array: np.ndarray) -> np.ndarray:
    """View any tensor as a 2-D matrix: a vector as one row, ``dim0 x rest`` above 2-D."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(1, -1)
    return array.reshape(array.shape[0], -1)


def _block_shape(rows: int, cols: int, max_pixels: int) -> tuple[int, int]:
    """Block size whose block grid has at most ``max_pixels`` cells.

    Roughly square blocks keep the aspect ratio; a block never exceeds the matrix
    height, so a single long row is reduced along its length only.
    """
    if rows * cols <= max_pixels:
        return 1, 1
    side = math.sqrt(rows * cols / max_pixels)
    block_rows = min(rows, math.ceil(side))
    grid_rows = math.ceil(rows / block_rows)
    block_cols = math.ceil(cols / max(1, max_pixels // grid_rows))
    return block_rows, block_cols


def _block_mean(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Mean of the finite values in each block; NaN where a block has none.

    ``np.add.reduceat`` sums uneven edge blocks without padding a copy of a large
    matrix; summing along the contiguous last axis first is several times faster.
    Counting finite values by hand avoids nanmean's warnings on all-NaN blocks.
    """
    finite = np.isfinite(matrix)
    if block == (1, 1):
        return np.where(finite, matrix, np.nan).astype(np.float64)
    row_starts = np.arange(0, matrix.shape[0], block[0])
    col_starts = np.arange(0, matrix.shape[1], block[1])

    def block_sum(a: np.ndarray) -> np.ndarray:
        partial = np.add.reduceat(a, col_starts, axis=1, dtype=np.float64)
        return np.add.reduceat(partial, row_starts, axis=0)

    all_finite = bool(finite.all())
    sums = block_sum(matrix if all_finite else np.where(finite, matrix, 0))
    if all_finite:
        # Block sizes from the starts alone: the common case skips a second pass.
        heights = np.diff(row_starts, append=matrix.shape[0])
        widths = np.diff(col_starts, append=matrix.shape[1])
        counts = np.outer(heights, widths).astype(np.float64)
    else:
        counts = block_sum(finite)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _finite_abs_max(values: np.ndarray) -> float:
    """Largest finite ``|value|``; 1.0 when there is none or it is zero, so a colour
    scale never collapses to a single point."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def _cmap(name: str) -> Colormap:
    # with_extremes returns a copy, so the registered colormap stays untouched.
    return colormaps[name].with_extremes(bad=BAD_COLOR)


def _heatmap_height(rows: int, cols: int) -> float:
    """Figure height in inches: flat for a vector, taller for a tall matrix."""
    return 1.3 + min(5.0, max(1.2, 5.0 * rows / cols))


def _label_heatmap_axes(ax: Axes, shape: tuple[int, ...]) -> None:
    if len(shape) <= 1:
        ax.set_yticks([])
        ax.set_xlabel("index")
        return
    ax.set_ylabel(f"dim 0 ({shape[0]})")
    if len(shape) == 2:
        ax.set_xlabel(f"dim 1 ({shape[1]})")
    else:
        rest = "x".join(str(n) for n in shape[1:])
        ax.set_xlabel(f"dims 1-{len(shape) - 1} flattened ({rest})")


def _draw_histogram(
    ax: Axes, name: str, histogram: Histogram, stats: TensorStats, *, log_y: bool
) -> None:
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    counts = np.asarray(histogram.counts, dtype=np.float64)
    edges = np.asarray(histogram.edges, dtype=np.float64)
    if counts.sum() > 0 and np.isfinite(edges).all():
        ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.85)
        if log_y:
            ax.set_yscale("log")
    else:
        _centre_text(ax, "no finite values")
    lines = [f"mean {stats.mean:.3g}", f"std {stats.std:.3g}"]
    if stats.nan_count or stats.inf_count:
        lines.append(f"NaN {stats.nan_count}, Inf {stats.inf_count}")
    ax.text(
        0.98,
        0.95,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        color="#b00020" if stats.nan_count or stats.inf_count else "black",
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "lw": 0},
    )


def _centre_text(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def _message_figure(title: str, text: str) -> Figure:
    """A small figure that says why there is no plot, so callers need no special case."""
    fig = Figure(figsize=(5.0, 2.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    _centre_text(ax, text)
    return fig
