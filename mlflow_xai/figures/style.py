"""The house style every figure shares: fixed-margin grids, small panels, PNG output.

Figures are built without pyplot (no global state, no window, no leaked figures in a
long-running process) and laid out with fixed margins in inches rather than a layout
engine, with few artists per panel, so that a grid of many layers renders quickly.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.gridspec import GridSpec

__all__ = [
    "GRID_COLUMNS",
    "HIST_CELL",
    "HIST_GAP",
    "HIST_MARGIN",
    "NICE_STEPS",
    "InViewLocator",
    "Painter",
    "centre_text",
    "compact_count",
    "figure_to_png",
    "fixed_grid",
    "inches_rect",
    "message_figure",
    "style_panel",
]

#: Panels per row of a grid of layers.
GRID_COLUMNS = 4
# Layout in inches. Every figure here is laid out by fixed margins rather than by a
# layout engine: constrained layout measured every tick label of every panel and made
# ``print_figure`` draw the whole figure twice, about two thirds of the time a 24-panel
# grid took to render. The margins fit the tick labels the formatters below produce.
HIST_CELL = (2.55, 1.7)  # one histogram panel
HIST_GAP = (0.6, 0.5)  # room for the next panel's count labels; for ticks and a title
HIST_MARGIN = (0.8, 0.15, 0.5, 0.55)  # left, right, bottom, top
# Tick steps of the default AutoLocator: 0.5 and 1k rather than 0.6 and 800.
NICE_STEPS = [1, 2, 2.5, 5, 10]


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes with the Agg backend.

    Args:
        fig: The figure to render.
        dpi: Resolution in dots per inch.

    Returns:
        The PNG file's bytes.

    Example:
        >>> png = figure_to_png(Figure(figsize=(1, 1)))
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_figure(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class Painter:
    """Builds and renders figures to PNG on a background thread, in the order given.

    A job hands each figure here and goes on computing: PyTorch's kernels release the
    GIL, so the drawing overlaps the next stage (attributions, the diagram) on another
    core. Every painter of a process draws on the same one thread, started on first use
    and kept: the figures of jobs running at once are drawn one after another, never by
    two threads together, and a service that explains in a loop does not start (and
    leave memory behind in) a thread per call.
    Use it as a context manager: leaving it waits for what it queued (or, on an error,
    drops what has not started).

    Example:
        >>> with Painter() as paint:
        ...     png = paint(lambda: Figure(figsize=(1, 1)))
        >>> png.result()[1:4] == b"PNG"
        True
    """

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, dpi: int = 100) -> None:
        self.dpi = dpi
        self._futures: list[Future[bytes]] = []

    @classmethod
    def _thread(cls) -> ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-xai-figures")
            return cls._pool

    def __call__(self, build: Callable[[], Figure]) -> Future[bytes]:
        """Queue ``build()`` (which returns a Figure) for rendering; the future holds the PNG bytes."""
        future = self._thread().submit(lambda: figure_to_png(build(), self.dpi))
        self._futures.append(future)
        return future

    def __enter__(self) -> Painter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            for future in self._futures:
                future.cancel()
        wait(self._futures)


class InViewLocator(MaxNLocator):
    """:class:`~matplotlib.ticker.MaxNLocator` without the ticks beyond the view.

    ``MaxNLocator`` pads its ticks past both ends of the axis; matplotlib builds a
    tick (five artists) for each and then leaves it undrawn: a third of all ticks
    on a small panel.
    """

    def __call__(self) -> list[float]:
        ticks = np.asarray(super().__call__(), dtype=np.float64)
        if self.axis is None:
            return ticks.tolist()
        lo, hi = sorted(self.axis.get_view_interval())
        slack = (hi - lo) * 1e-9  # keep a tick that sits on the edge up to rounding
        return ticks[(ticks >= lo - slack) & (ticks <= hi + slack)].tolist()


def fixed_grid(
    nrows: int,
    ncols: int,
    cell: tuple[float, float],
    gap: tuple[float, float],
    margin: tuple[float, float, float, float],
) -> tuple[Figure, GridSpec]:
    """A figure sized to hold ``nrows x ncols`` cells, and its grid.

    All sizes are in inches: ``cell`` is one axes' (width, height), ``gap`` the
    (horizontal, vertical) space between cells and ``margin`` the (left, right,
    bottom, top) space around them, so panels keep their size however many there are.
    """
    left, right, bottom, top = margin
    width = left + right + ncols * cell[0] + (ncols - 1) * gap[0]
    height = bottom + top + nrows * cell[1] + (nrows - 1) * gap[1]
    fig = Figure(figsize=(width, height))
    grid = fig.add_gridspec(
        nrows,
        ncols,
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap[0] / cell[0],
        hspace=gap[1] / cell[1],
    )
    return fig, grid


def inches_rect(
    fig: Figure, *, left: float, right: float, bottom: float, top: float
) -> tuple[float, float, float, float]:
    """Figure-fraction ``(x0, y0, width, height)`` of a box inset by margins in inches."""
    width, height = fig.get_size_inches()
    return (
        left / width,
        bottom / height,
        max(0.05, 1 - (left + right) / width),
        max(0.05, 1 - (bottom + top) / height),
    )


def style_panel(ax: Axes, name: str) -> None:
    """The look of one small histogram panel of a grid: title, small ticks, few of them."""
    # A fixed y stops the per-draw search for tick labels the title might overlap.
    ax.set_title(name, fontsize=9, pad=3, y=1.0)
    ax.tick_params(labelsize=7)
    # The panels have no axis labels of their own (the figure has), so fixed label
    # coordinates skip measuring every tick label again to place an empty label.
    ax.xaxis.set_label_coords(0.5, 0.0)
    ax.yaxis.set_label_coords(0.0, 0.5)
    # Few ticks: each one is several artists to build, lay out and draw, times 24 panels.
    ax.xaxis.set_major_locator(InViewLocator(nbins=4, steps=NICE_STEPS))
    formatter = ScalarFormatter()
    formatter.set_powerlimits((-3, 4))
    ax.xaxis.set_major_formatter(formatter)
    ax.xaxis.get_offset_text().set_fontsize(7)


def compact_count(value: float, _pos: object = None) -> str:
    """A count tick label of at most about five characters: ``2.5k``, ``1.2M``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def centre_text(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def message_figure(title: str, text: str) -> Figure:
    """A small figure that says why there is no plot, so callers need no special case."""
    fig = Figure(figsize=(5.0, 2.0))
    ax = fig.add_axes(inches_rect(fig, left=0.2, right=0.2, bottom=0.2, top=0.45))
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, y=1.0)
    centre_text(ax, text)
    return fig
