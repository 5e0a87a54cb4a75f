"""Figures from the results of :mod:`mlflow_xai.inspect`.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so
nothing here touches global state, opens a window or leaks figures in a long-running
process; :func:`figure_to_png` turns a figure into PNG bytes for logging. All figures
render when the data holds NaN or Inf: non-finite cells are drawn in :data:`BAD_COLOR`.

Rendering time goes to matplotlib's per-artist Python overhead, not to pixels, so the
figures are laid out with fixed margins in inches instead of a layout engine and keep
their artists few (axes, ticks, colour bars): that keeps a 24-layer grid quick.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from matplotlib.ticker import FuncFormatter, ScalarFormatter

from mlflow_xai.figures.style import (
    GRID_COLUMNS,
    HIST_CELL,
    HIST_GAP,
    HIST_MARGIN,
    NICE_STEPS,
    InViewLocator,
    centre_text,
    compact_count,
    figure_to_png,
    fixed_grid,
    inches_rect,
    message_figure,
    style_panel,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

    from mlflow_xai.inspect.results import Histogram, LayerActivations, TensorStats

__all__ = [
    "BAD_COLOR",
    "HasHistogram",
    "block_mean_matrix",
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
# Layout in inches, fixed margins rather than a layout engine (see figures.style).
_STRIP_WIDTH = 8.1
_STRIP_HEIGHT = 0.4
_STRIP_GAP = 0.55  # x tick labels below a strip and the title above the next
_STRIP_MARGIN = (0.2, 0.7, 0.45, 0.55)  # left, right, bottom, top
_COLORBAR_PAD, _COLORBAR_WIDTH = 0.1, 0.15


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
        return message_figure(f"{name}  {shape}", "empty tensor: nothing to show")
    matrix = _as_matrix(array)
    rows, cols = matrix.shape
    block = _block_shape(rows, cols, max_pixels)
    shown, nonfinite = _block_mean(matrix, block, absolute=absolute)

    limit = _finite_abs_max(shown)
    if absolute:
        cmap, vmin, vmax = _cmap(SEQUENTIAL_CMAP), 0.0, limit
    else:
        cmap, vmin, vmax = _cmap(DIVERGING_CMAP), -limit, limit

    title = f"{name}  shape {shape}"
    notes = []
    if block != (1, 1):
        notes.append(f"block mean over {block[0]}x{block[1]} cells")
    if nonfinite:
        notes.append(f"{nonfinite} NaN/Inf values (magenta)")
    if notes:
        title += "\n" + "; ".join(notes)

    # Margins in inches: tick labels of up to five digits and an axis label on the
    # left and bottom, one or two title lines on top, the colour bar on the right.
    top = 0.4 if not notes else 0.6
    width, height = 7.0, _heatmap_height(rows, cols) + top - 0.4
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes(inches_rect(fig, left=0.85, right=1.2, bottom=0.6, top=top))
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
    # At most 6 index ticks a side: each tick is several artists to build and draw.
    ax.xaxis.set_major_locator(InViewLocator(nbins=6, steps=NICE_STEPS, integer=True, min_n_ticks=1))
    ax.yaxis.set_major_locator(InViewLocator(nbins=6, steps=NICE_STEPS, integer=True, min_n_ticks=1))
    ax.set_title(title, fontsize=10, y=1.0)
    _label_heatmap_axes(ax, shape)
    label = "|value|" if absolute else "value"
    _colorbar(fig, ax, image, label=label if block == (1, 1) else f"mean {label}")
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
        return message_figure(title, "nothing to show")
    ncols = min(GRID_COLUMNS, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, grid = fixed_grid(nrows, ncols, HIST_CELL, HIST_GAP, HIST_MARGIN)
    for i, (name, layer) in enumerate(layers.items()):
        # Only the panels in use: an axes made and then deleted still costs its setup.
        ax = fig.add_subplot(grid[divmod(i, ncols)])
        _draw_histogram(ax, name, layer.histogram, layer.stats, log_y=log_y)
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top")
    fig.supxlabel("value", fontsize=9, y=0.06 / fig.get_figheight(), va="bottom")
    fig.supylabel("count (log)" if log_y else "count", fontsize=9, x=0.08 / fig.get_figwidth())
    return fig


def mean_activation_map(activations: Mapping[str, LayerActivations]) -> Figure:
    """Draw each layer's mean activation per unit as one strip per layer.

    One row per layer, units along x, each row on its own zero-centred scale from
    ``-max`` to ``+max`` of its largest ``|mean|``, which the row's title names:
    widths (70, 140, 10 units) and magnitudes (a hidden ReLU near 1, an output near
    100) differ too much between layers for one shared scale to show every layer's
    pattern. One colour bar, in units of that ``max``, serves all rows. A white cell
    is a unit whose mean is zero, which for a ReLU layer usually means a dead unit.

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
        >>> len(mean_activation_map({"fc": act}).axes)  # the strip and the colour bar
        2
    """
    title = "mean activation per unit"
    if not activations:
        return message_figure(title, "nothing to show")
    fig, grid = fixed_grid(
        len(activations), 1, (_STRIP_WIDTH, _STRIP_HEIGHT), (0.0, _STRIP_GAP), _STRIP_MARGIN
    )
    cmap = _cmap(DIVERGING_CMAP)
    strips: list[Axes] = []
    for i, (name, layer) in enumerate(activations.items()):
        ax = fig.add_subplot(grid[i, 0])
        strips.append(ax)
        means = np.asarray(layer.mean_per_unit, dtype=np.float64).ravel()
        finite = np.abs(means[np.isfinite(means)])
        notes = [f"{means.size} unit{'' if means.size == 1 else 's'}"]
        if finite.size:
            notes.append(f"max |mean| {finite.max():.3g}")
        if finite.size < means.size:
            notes.append(f"{means.size - finite.size} NaN/Inf (magenta)")
        ax.set_title(f"{name}  ({', '.join(notes)})", loc="left", fontsize=9, y=1.0)
        ax.set_yticks([])
        # Fixed coordinates for the empty y label: placing it measures the tick labels.
        ax.yaxis.set_label_coords(0.0, 0.5)
        if means.size == 0:
            ax.set_xticks([])
            centre_text(ax, "no units")
            continue
        limit = _finite_abs_max(means)
        ax.imshow(
            np.ma.masked_invalid(means[np.newaxis, :]),
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, means.size - 0.5, 0.5, -0.5),
        )
        ax.xaxis.set_major_locator(
            InViewLocator(nbins=6, steps=NICE_STEPS, integer=True, min_n_ticks=1)
        )
        ax.tick_params(labelsize=8)
    strips[-1].set_xlabel("unit", fontsize=9, labelpad=1)
    for ax in strips[:-1]:
        ax.xaxis.set_label_coords(0.5, 0.0)  # likewise for the empty x labels above
    # One colour bar for all strips rather than one per strip, which doubled the axes
    # to build and draw; as tall as the strips, up to a few inches, from the top one.
    width, height = fig.get_size_inches()
    top = strips[0].get_position()
    bar_height = min(top.y1 - strips[-1].get_position().y0, 2.5 / height)
    cax = fig.add_axes(
        (top.x1 + _COLORBAR_PAD / width, top.y1 - bar_height, _COLORBAR_WIDTH / width, bar_height),
        label="<colorbar>",
    )
    colorbar = fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), cmap), cax=cax)
    colorbar.set_ticks([-1.0, 0.0, 1.0], labels=["\u2212max", "0", "+max"])
    cax.tick_params(labelsize=7)
    fig.suptitle(
        f"{title} (each layer on its own scale, \u2212max to +max)",
        y=1 - 0.08 / fig.get_figheight(),
        va="top",
    )
    return fig


def _colorbar(fig: Figure, ax: Axes, image: AxesImage, *, label: str) -> None:
    """A colour bar in a thin axes just right of ``ax``, as tall as ``ax``.

    Placed by hand instead of by ``fig.colorbar(ax=...)``, which shrinks ``ax`` and
    needs a layout engine to line things up.
    """
    width, _ = fig.get_size_inches()
    box = ax.get_position()
    cax = fig.add_axes(
        (box.x1 + _COLORBAR_PAD / width, box.y0, _COLORBAR_WIDTH / width, box.height),
        label="<colorbar>",  # the label matplotlib gives the colour bars it places
    )
    colorbar = fig.colorbar(image, cax=cax, label=label)
    # Scientific notation outside 1e-3..1e4 (the power goes atop the bar) keeps the
    # tick labels short enough for the fixed right margin.
    formatter = ScalarFormatter()
    formatter.set_powerlimits((-3, 4))
    colorbar.formatter = formatter
    # Right-aligned by default, the power overhangs the bar's left edge over the image.
    cax.yaxis.get_offset_text().set(x=0.0, horizontalalignment="left")


def block_mean_matrix(values: np.ndarray, max_pixels: int = MAX_PIXELS, *,
                      absolute: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """The matrix :func:`heatmap` draws, reduced to at most ``max_pixels`` cells.

    The same view (``dim0 x rest``) and block means over finite values (NaN where a
    block has none) as the figure, so a page can embed numbers that match its picture.

    Returns:
        The reduced matrix and the block shape ``(rows, cols)`` each cell averages.

    Example:
        >>> m, block = block_mean_matrix(np.arange(16.0).reshape(4, 4), max_pixels=4)
        >>> m.tolist(), block
        ([[2.5, 4.5], [10.5, 12.5]], (2, 2))
    """
    matrix = _as_matrix(np.asarray(values))
    if matrix.size == 0:
        return matrix.astype(np.float64), (1, 1)
    block = _block_shape(*matrix.shape, max_pixels)
    return _block_mean(matrix, block, absolute=absolute)[0], block


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


#: Cells of a matrix that :func:`_block_mean` reads at a time: its temporaries (a mask,
#: float64 partial sums) are per strip, so a layer of a billion weights costs a few
#: hundred MB beyond its own bytes, not several times them.
STRIP_CELLS = 1 << 24


def _block_mean(matrix: np.ndarray, block: tuple[int, int], *,
                absolute: bool = False) -> tuple[np.ndarray, int]:
    """Mean of the finite values (of ``|values|`` if ``absolute``) in each block, NaN
    where a block has none; and the number of NaN/Inf cells.

    The matrix is read in strips of whole block rows of about :data:`STRIP_CELLS`
    cells. ``np.add.reduceat`` sums uneven edge blocks without padding; summing along
    the contiguous last axis first keeps the reads sequential. Counting finite values by
    hand avoids nanmean's warnings on all-NaN blocks. Taking ``|values|`` before
    averaging keeps +w and -w in one block from cancelling out.
    """
    rows, cols = matrix.shape
    col_starts = np.arange(0, cols, block[1])
    widths = np.diff(col_starts, append=cols)
    strip = max(1, STRIP_CELLS // max(cols * block[0], 1)) * block[0]
    sums_out, counts_out = [], []
    nonfinite = 0
    for top in range(0, rows, strip):
        part = matrix[top : top + strip]
        if absolute:
            part = np.abs(part)
        finite = np.isfinite(part)
        all_finite = bool(finite.all())
        if not all_finite:
            nonfinite += int(finite.size - np.count_nonzero(finite))
            part = np.where(finite, part, 0)
        row_starts = np.arange(0, part.shape[0], block[0])
        if block == (1, 1):
            sums = part.astype(np.float64)
        else:
            partial = np.add.reduceat(part, col_starts, axis=1, dtype=np.float64)
            sums = np.add.reduceat(partial, row_starts, axis=0)
        if all_finite:
            # Block sizes from the starts alone: the common case skips a second pass.
            heights = np.diff(row_starts, append=part.shape[0])
            counts = np.outer(heights, widths).astype(np.float64)
        elif block == (1, 1):
            counts = finite.astype(np.float64)
        else:
            counts = np.add.reduceat(np.add.reduceat(finite, col_starts, axis=1, dtype=np.float64),
                                     row_starts, axis=0)
        sums_out.append(sums)
        counts_out.append(counts)
    sums, counts = np.concatenate(sums_out), np.concatenate(counts_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), nonfinite


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
    style_panel(ax, name)
    counts = np.asarray(histogram.counts, dtype=np.float64)
    edges = np.asarray(histogram.edges, dtype=np.float64)
    if counts.sum() > 0 and np.isfinite(edges).all():
        _add_stairs(ax, counts, edges)
    else:
        centre_text(ax, "no finite values")
    if log_y:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(InViewLocator(nbins=4, steps=NICE_STEPS, integer=True))
        # "25k" rather than "25000": count labels must fit the gap between panels.
        ax.yaxis.set_major_formatter(FuncFormatter(compact_count))
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


def _add_stairs(ax: Axes, counts: np.ndarray, edges: np.ndarray) -> None:
    """What ``ax.stairs(counts, edges, fill=True)`` draws: one patch for all bins.

    ``stairs`` adds its patch with ``add_patch``, which finds the data limits by
    walking the outline one Bezier segment per bin edge; the limits are known from
    the edges and counts, and skipping that walk saves a few percent of a grid.
    """
    patch = StepPatch(counts, edges, baseline=0, fill=True, facecolor="#4c72b0", linewidth=0, alpha=0.85)
    ax.add_artist(patch)
    patch.sticky_edges.y.append(0)  # bars stand on the x axis: no margin below zero
    positive = counts[counts > 0]  # the smallest sets the floor of a log count axis
    ax.update_datalim([(edges[0], 0.0), (edges[-1], positive.max()), (edges[-1], positive.min())])
    ax.autoscale_view()


