"""The stepped histogram images: per-layer histogram rows drawn with Pillow.

Pure: rows of counts in, a Pillow image out. A row is laid out as
:func:`mlflow_xai.inspect.stats.histogram_rows` returns it: ``bins`` counts, then the
finite min and max, the number of finite values, their sum and sum of squares, and numel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow_xai.inspect.stats import bin_range

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["HistRow", "paletted", "render_grid"]


class HistRow:
    """Named view on one histogram row (counts, then min, max, n, sum, sum sq, numel)."""

    def __init__(self, row: np.ndarray) -> None:
        bins = len(row) - 6
        self.counts = row[:bins]
        self.lo, self.hi, n, self.total, self.sum_squares, numel = (float(v) for v in row[bins:])
        self.n_finite, self.numel = int(n), int(numel)
        lo, hi = bin_range(self.lo, self.hi)
        self.edges = np.linspace(lo, hi, bins + 1) if self.n_finite else np.zeros(bins + 1)


def render_grid(title: str, names: Sequence[str], rows: np.ndarray) -> PILImage:
    """Draw per-layer histograms as a grid of cells; return an RGB image.

    Drawn with Pillow straight onto pixels (one filled outline per layer, its name and
    value range, a mark at zero), where a matplotlib figure of the same grid costs about
    ten times as much: the monitor draws three per snapshot inside the training loop, and
    these thumbnails need no axes machinery.

    Example:
        >>> rows = np.zeros((1, 46)); rows[0, -6:] = [0.0, 1.0, 4, 2.0, 2.0, 4]
        >>> render_grid("weights", ["layers.0"], rows).size
        (240, 144)
    """
    from PIL import Image, ImageDraw

    n = len(names)
    cols = min(4, max(n, 1))
    nrows = max(1, math.ceil(n / cols))
    cell_w, cell_h, head = _CELL_W, _CELL_H, _TITLE_H
    img = Image.new("RGB", (cell_w * cols, head + cell_h * nrows), _PAPER)
    draw = ImageDraw.Draw(img)
    draw.text((cell_w * cols / 2, 6), title, fill=_INK, font=_font(13), anchor="mt")
    small = _font(11)
    for i, (name, row) in enumerate(zip(names, rows, strict=False)):
        h = HistRow(row)
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + 10, head + r * cell_h
        width, base, top = cell_w - 20, y0 + cell_h - 8, cell_h - 40
        bad = h.numel - h.n_finite
        if h.n_finite:
            peak = max(float(h.counts.max()), 1.0)
            # x from the bin index, not the edges: hi - lo of diverged weights overflows.
            xs = x0 + width * np.linspace(0.0, 1.0, len(h.counts) + 1)
            ys = base - top * h.counts / peak
            px = np.concatenate([[xs[0]], np.repeat(xs, 2)[1:-1], [xs[-1]]])
            py = np.concatenate([[base], np.repeat(ys, 2), [base]])
            draw.polygon(list(zip(px.tolist(), py.tolist(), strict=False)), fill=_BAR, outline=_BAR_EDGE)
            span = h.edges[-1] - h.edges[0]
            if h.edges[0] < 0 < h.edges[-1] and math.isfinite(span):
                zx = x0 + width * (-h.edges[0]) / span  # where zero is: sign and skew at a glance
                draw.line([(zx, base), (zx, base - top - 4)], fill=_ZERO_MARK, width=1)
            label = f"{name}  [{h.lo:.3g}, {h.hi:.3g}]"
        else:
            label = f"{name}  no finite values"
        if bad:
            label += f"  NaN/Inf: {bad}"
        draw.line([(x0, base), (x0 + width, base)], fill=_AXIS)
        draw.text((c * cell_w + cell_w / 2, y0 + 6), label, fill=_BAD if bad else _INK,
                  font=small, anchor="mt")
    return img


# Pixel sizes of a histogram image: one cell per layer, four cells a row, a title line.
_CELL_W, _CELL_H, _TITLE_H = 240, 120, 24
# The drawing's colours (RGB), and the palette its PNGs are stored with.
_PAPER, _INK, _BAR, _BAR_EDGE = (255, 255, 255), (0, 0, 0), (0x4C, 0x72, 0xB0), (0x2A, 0x4D, 0x7F)
_ZERO_MARK, _AXIS, _BAD = (0x22, 0x22, 0x22), (0x99, 0x99, 0x99), (0xC0, 0x00, 0x7A)


@functools.lru_cache(maxsize=1)
def _palette() -> PILImage:
    """A palette of the drawing's colours, each with 8 shades towards the paper (the
    antialiased edges of text and lines), and a grey ramp: a histogram image maps onto
    it exactly where it is flat and within ~20 of 255 levels on the antialiased edges,
    and a palette PNG encodes ~4x faster than RGB (the monitor stores three per snapshot)."""
    from PIL import Image

    colours = {_PAPER}
    for c in (_INK, _BAR, _BAR_EDGE, _ZERO_MARK, _AXIS, _BAD):
        colours.update(tuple(round(v + (p - v) * t / 8) for v, p in zip(c, _PAPER, strict=True)) for t in range(8))
    colours.update((v, v, v) for v in range(0, 256, 8))
    flat = [v for c in sorted(colours) for v in c]
    image = Image.new("P", (1, 1))
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def paletted(image: PILImage) -> PILImage:
    """``image`` (a :func:`render_grid` drawing) on the drawing's palette, without dithering."""
    from PIL import Image

    return image.quantize(palette=_palette(), dither=Image.Dither.NONE)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()
