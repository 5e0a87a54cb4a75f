"""The one-page HTML report of an explanation.

The page is self-contained: every image is embedded as a ``data:`` URI and the page
has no stylesheets, links or script files, because the MLflow UI shows HTML artifacts
in a sandboxed frame (``sandbox="allow-scripts"``) where relative links do not resolve
and no request goes out. One inline script adds what helps a reader: the layer table
sorts on a click on a column heading, and each heatmap with an embedded matrix
(:class:`HeatmapMatrix`, at most :data:`HEATMAP_MAX_SIDE` squared cells) gets a view to
zoom into and read values from. With scripts off the page reads as before: the table
in model order and the images. Every string taken from the summary (layer names come
from users' models) is HTML-escaped.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from mlflow_xai.reports.page import (
    DASH,
    MIME_TYPES,
    figure,
    is_number,
    number,
    page_head,
    percent,
    script_json,
    shape,
    text,
)

__all__ = ["HEATMAP_MAX_SIDE", "SECTION_ORDER", "HeatmapMatrix", "render_report"]

#: An embedded heatmap matrix has at most this side squared cells (block means beyond):
#: 96 x 96 float32 is 48 kB of base64, so a report with 16 heatmaps grows by < 1 MB.
HEATMAP_MAX_SIDE = 96


@dataclass(frozen=True)
class HeatmapMatrix:
    """The numbers behind a heatmap figure, for the page's zoom-and-hover view.

    Attributes:
        values: The matrix drawn (block means when ``block`` is not ``(1, 1)``), at most
            :data:`HEATMAP_MAX_SIDE` squared cells; NaN where a block has no finite value.
        block: Rows and columns of the original matrix each cell averages.
        shape: The original tensor's shape.
    """

    values: np.ndarray
    block: tuple[int, int] = (1, 1)
    shape: tuple[int, ...] = ()

#: Sections in page order; any other section follows, alphabetically.
SECTION_ORDER: tuple[str, ...] = (
    "architecture",
    "weights",
    "activations",
    "gradients",
    "attributions",
    "conductance",
)
_SECTION_NOTES = {
    "architecture": "The autograd graph of one forward pass: parameters in blue, "
    "operations in grey, the output in green.",
    "weights": "Each layer's weights. Heatmaps are centred on zero (red positive, "
    "blue negative); rows are output units, columns inputs.",
    "activations": "Layer outputs on the explained batch. A unit whose mean is zero "
    "on every sample of a ReLU layer is dead.",
    "gradients": "Gradients of the loss with respect to each layer's weights on the "
    "explained batch.",
    "attributions": "How much each input feature contributes to the output.",
}
# Table columns: (group, heading, key in the group's dict, how to format it).
_PERCENT = "percent"
_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("weight", "shape", "shape", "shape"),
    ("weight", "mean", "mean", "number"),
    ("weight", "std", "std", "number"),
    ("weight", "min", "min", "number"),
    ("weight", "max", "max", "number"),
    ("weight", "L2 norm", "l2_norm", "number"),
    ("weight", "near zero", "near_zero_share", _PERCENT),
    ("weight", "NaN/Inf", "", "nonfinite"),
    ("activation", "mean", "mean", "number"),
    ("activation", "std", "std", "number"),
    ("activation", "dead", "dead_share", _PERCENT),
    ("activation", "NaN/Inf", "", "nonfinite"),
    ("gradient", "L2 norm", "l2_norm", "number"),
    ("gradient", "grad/weight", "grad_to_weight_ratio", "number"),
    ("gradient", "status", "", "gradient_status"),
)
#: ``summary["meta"]`` keys shown under the source, with their labels.
_META_ENTRIES = (("model_type", "model"), ("n_params", "parameters"), ("model_format", "format"),
                 ("gradient_of", "gradients of"))
#: A layer with more dead units than this share is highlighted, unless the summary's
#: ``diagnostics.thresholds.dead_share_flag`` says otherwise.
_DEAD_WARN_SHARE = 0.5


def render_report(
    summary: Mapping[str, Any],
    images: Mapping[str, bytes],
    *,
    title: str = "mlflow-xai report",
    captions: Mapping[str, str] | None = None,
    matrices: Mapping[str, HeatmapMatrix] | None = None,
) -> str:
    """Render the explanation's summary and figures as one self-contained HTML page.

    The page shows, in order: the source (``summary["source"]``: a string or a mapping
    such as ``{"run_id": ..., "model_uri": ...}``) with the model type and parameter
    count from ``summary["meta"]``; the warnings (``summary["warnings"]``), if any; the headline diagnostics (``summary["diagnostics"]``
    and ``summary["loss"]``); a per-layer statistics table (``summary["layers"]``: name
    to ``{"module_type", "weight", "activation", "gradient"}``, each group a dict of
    statistics or ``None``, as :func:`mlflow_xai.inspect.summary.summary_dict` writes
    it), with NaN/Inf counts, vanishing/exploding gradients and dead shares above
    ``diagnostics.thresholds.dead_share_flag`` highlighted; then the figures. Missing
    keys and ``None`` values show as a dash.

    Figures are grouped into sections by the first component of their artifact path
    (``weights/layers.0.png`` is in ``weights``, ``architecture.svg`` in
    ``architecture``), sections ordered as in :data:`SECTION_ORDER`, then the rest
    alphabetically. Within a section a ``distributions`` figure comes first, the
    others keep the mapping's order (the model's layer order, which sorting would
    break: ``layers.10`` before ``layers.2``). When an image exists as both SVG and
    PNG only the SVG is embedded, since it scales and shows the same picture.

    Args:
        summary: The explanation summary, as written to ``summary.json``.
        images: Artifact path to the image's bytes (PNG, SVG, JPEG or GIF).
        title: Page title and heading.
        captions: Artifact path to a caption; each figure also shows its path, so a
            reader can find the artifact in MLflow.
        matrices: Artifact path of a heatmap image to its numbers: the figure gets a
            zoomable view that reads values on hover (scripts on), below the image.

    Returns:
        The HTML page.

    Raises:
        ValueError: When an image path has no image extension, or a matrix has more
            than :data:`HEATMAP_MAX_SIDE` squared cells.

    Example:
        >>> html = render_report({"layers": {"fc": None}}, {}, title="demo")
        >>> html.startswith("<!DOCTYPE html>") and "fc" in html
        True
    """
    parts = [
        *page_head(title, css=_REPORT_CSS, script=_REPORT_JS),
        _source_html(summary.get("source"), summary.get("meta")),
        _warnings_html(summary.get("warnings")),
        "<h2>Diagnostics</h2>",
        _diagnostics_html(summary.get("diagnostics"), summary.get("loss")),
        "<h2>Layers</h2>",
        _layers_html(summary.get("layers"), _dead_threshold(summary.get("diagnostics"))),
        _attributions_html(summary.get("attributions")),
        _figures_html(images, captions or {}, matrices or {}),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _attributions_html(attributions: Any) -> str:
    """Top features per attribution method, the completeness error, and whether they agree."""
    if not isinstance(attributions, Mapping) or not attributions.get("methods"):
        return ""
    rows = []
    for method, info in attributions["methods"].items():
        top = ", ".join(text(f) for f in info.get("top_features") or ())
        err = number(info.get("completeness_error_max"))
        rows.append(f"<tr><td>{text(method)}</td><td>{top}</td><td>{err}</td></tr>")
    agreement = attributions.get("agreement")
    rule = attributions.get("integrated_gradients")
    return "\n".join([
        "<h2>Feature attributions</h2>",
        f"<p>Baseline: {text(attributions.get('baseline'))}.</p>",
        f"<p>Integrated gradients: {text(rule)}.</p>" if rule else "",
        "<table><tr><th>method</th><th>top features (mean |attribution|)</th>"
        "<th>completeness error (max)</th></tr>",
        *rows,
        "</table>",
        f"<p>{text(agreement)}</p>" if agreement else "",
    ])


def _warnings_html(warnings: Any) -> str:
    """What the reader must know before trusting the figures (``summary["warnings"]``)."""
    if not isinstance(warnings, Sequence) or isinstance(warnings, str) or not warnings:
        return ""
    items = "".join(f"<li>{escape(str(w))}</li>" for w in warnings)
    return f'<h2>Warnings</h2><ul class="warnings">{items}</ul>'


def _source_html(source: Any, meta: Any) -> str:
    """Where the model came from, plus its type and size from ``summary["meta"]``."""
    entries: list[tuple[str, Any]] = []
    if isinstance(source, Mapping):
        entries += [(str(key), value) for key, value in source.items()]
    elif source is not None:
        entries.append(("source", source))
    if isinstance(meta, Mapping):
        entries += [(label, meta[key]) for key, label in _META_ENTRIES if key in meta]
    if not entries:
        return ""
    rows = "".join(f"<dt>{escape(key)}</dt><dd>{text(value)}</dd>" for key, value in entries)
    return f'<dl class="source">{rows}</dl>'


def _dead_threshold(diagnostics: Any) -> float:
    thresholds = diagnostics.get("thresholds") if isinstance(diagnostics, Mapping) else None
    value = thresholds.get("dead_share_flag") if isinstance(thresholds, Mapping) else None
    return float(value) if is_number(value) else _DEAD_WARN_SHARE


def _diagnostics_html(diagnostics: Any, loss: Any) -> str:
    if not isinstance(diagnostics, Mapping):
        return '<p class="note">No diagnostics in the summary.</p>'
    nonfinite = _int_or_none(diagnostics.get("nan_count"))
    infs = _int_or_none(diagnostics.get("inf_count"))
    if nonfinite is not None and infs is not None:
        nonfinite += infs
    cards = [
        ("NaN/Inf values", number(nonfinite), bool(nonfinite)),
        ("dead units", percent(diagnostics.get("dead_unit_share")), False),
        ("max gradient norm", number(diagnostics.get("max_grad_norm")), False),
    ]
    if loss is not None:
        cards.append(("loss on the batch", number(loss), False))
    html = ['<div class="cards">']
    for label, value, bad in cards:
        style = ' style="border-color:#a00;color:#a00"' if bad else ""
        html.append(
            f'<div class="card"{style}><div class="label">{label}</div>'
            f'<div class="value">{value}</div></div>'
        )
    html.append("</div>")
    flags = [str(flag) for flag in diagnostics.get("flags") or ()]
    if flags:
        items = "".join(f"<li>{escape(flag)}</li>" for flag in flags)
        html.append(f'<ul class="flags">{items}</ul>')
    else:
        html.append('<p class="ok">No problems flagged.</p>')
    return "".join(html)


def _layers_html(layers: Any, dead_threshold: float) -> str:
    if not isinstance(layers, Mapping) or not layers:
        return '<p class="note">No per-layer statistics in the summary.</p>'
    groups: list[tuple[str, int]] = []
    for group, *_ in _COLUMNS:
        if groups and groups[-1][0] == group:
            groups[-1] = (group, groups[-1][1] + 1)
        else:
            groups.append((group, 1))
    head_groups = "".join(f'<th colspan="{span}">{group}</th>' for group, span in groups)
    # data-col: the cell index a click on the heading sorts by (the page's script).
    head_columns = "".join(f'<th data-col="{i + 2}">{heading}</th>' for i, (_, heading, _, _) in enumerate(_COLUMNS))
    rows = [
        '<div class="scroll"><table class="layers-table"><thead>',
        f'<tr><th rowspan="2" data-col="0">layer</th><th rowspan="2" data-col="1">type</th>{head_groups}</tr>',
        f"<tr>{head_columns}</tr></thead><tbody>",
    ]
    for name, layer in layers.items():
        info = layer if isinstance(layer, Mapping) else {}
        cells = [
            f'<td class="name">{escape(str(name))}</td>',
            f'<td class="type">{text(info.get("module_type"))}</td>',
        ]
        for group, _, key, kind in _COLUMNS:
            stats = info.get(group)
            group_stats = stats if isinstance(stats, Mapping) else None
            cells.append(_cell(group_stats, key, kind, dead_threshold))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    rows.append("</tbody></table></div>")
    return "".join(rows)


def _cell(
    stats: Mapping[str, Any] | None, key: str, kind: str, dead_threshold: float
) -> str:
    """One table cell, highlighted where the value signals a problem."""
    if stats is None:
        return f"<td>{DASH}</td>"
    css = ""
    value: Any = stats.get(key) if key else None
    if kind == "shape":
        shown = shape(stats.get(key))
        dims = stats.get(key)
        value = math.prod(dims) if isinstance(dims, (list, tuple)) and all(is_number(d) for d in dims) else None
    elif kind == _PERCENT:
        value = stats.get(key)
        shown = percent(value)
        if key == "dead_share" and is_number(value) and value > dead_threshold:
            css = "warn"
    elif kind == "nonfinite":
        nans = _int_or_none(stats.get("nan_count")) or 0
        infs = _int_or_none(stats.get("inf_count")) or 0
        shown = str(nans + infs)
        value = nans + infs
        css = "bad" if nans + infs else ""
    elif kind == "gradient_status":
        status = [word for word in ("vanishing", "exploding") if stats.get(word)]
        shown = ", ".join(status) or "ok"
        value = len(status)
        css = "bad" if status else ""
    else:
        shown = number(stats.get(key))
    # data-v: the raw number the table sorts by (a shape by its size, a status by its flags).
    sort = f' data-v="{float(value)!r}"' if is_number(value) and not math.isnan(value) else ""
    return f'<td class="{css}"{sort}>{shown}</td>' if css else f"<td{sort}>{shown}</td>"


def _figures_html(images: Mapping[str, bytes], captions: Mapping[str, str],
                  matrices: Mapping[str, HeatmapMatrix]) -> str:
    sections: dict[str, list[str]] = {}
    for path in images:
        if PurePosixPath(path).suffix.lower() not in MIME_TYPES:
            raise ValueError(
                f"report image {path!r} is not a {'/'.join(MIME_TYPES)} file; "
                "pass only images to render_report"
            )
        sections.setdefault(_section_of(path), []).append(path)
    order = [s for s in SECTION_ORDER if s in sections]
    order += sorted(s for s in sections if s not in SECTION_ORDER)
    html = []
    for section in order:
        html.append(f"<h2>{escape(section.capitalize())}</h2>")
        if section in _SECTION_NOTES:
            html.append(f'<p class="note">{_SECTION_NOTES[section]}</p>')
        for path in _figure_order(sections[section]):
            html.append(figure(path, images[path], captions.get(path)))
            if path in matrices:
                html.append(_zoom_html(path, matrices[path]))
    return "\n".join(html)


def _zoom_html(path: str, matrix: HeatmapMatrix) -> str:
    """A hidden zoom view and its data; the script shows it (scripts off: the image only)."""
    values = np.asarray(matrix.values, dtype=np.float64)
    if values.ndim != 2 or values.size > HEATMAP_MAX_SIDE**2:
        raise ValueError(
            f"heatmap matrix for {path!r} has shape {values.shape}: pass a 2-D matrix of at most "
            f"{HEATMAP_MAX_SIDE}x{HEATMAP_MAX_SIDE} cells (figures.layers.block_mean_matrix reduces one)"
        )
    data = {
        "path": path, "rows": values.shape[0], "cols": values.shape[1], "block": list(matrix.block),
        "shape": [int(d) for d in matrix.shape],
        "v": base64.b64encode(values.astype("<f4").tobytes()).decode("ascii"),
    }
    blob = script_json(data)
    return (f'<div class="zoom" hidden><script type="application/json" class="heat-data">{blob}</script>'
            '<div class="zoom-bar"><button type="button" data-z="in">zoom in</button>'
            '<button type="button" data-z="out">zoom out</button><button type="button" data-z="reset">reset</button>'
            '<span class="note">wheel to zoom, drag to pan, hover to read a value</span></div>'
            '<div class="zoom-box"><canvas width="640" height="360"></canvas><div class="tip"></div></div></div>')


def _section_of(path: str) -> str:
    parts = PurePosixPath(path).parts
    return parts[0] if len(parts) > 1 else PurePosixPath(path).stem


def _figure_order(paths: Sequence[str]) -> list[str]:
    """Distributions first, then the given order; a PNG twin of an SVG is dropped."""
    def stem_and_suffix(path: str) -> tuple[str, str]:
        pure = PurePosixPath(path)
        return str(pure.with_suffix("")), pure.suffix.lower()

    svg_stems = {stem for stem, suffix in map(stem_and_suffix, paths) if suffix == ".svg"}
    kept = [
        p
        for p in paths
        if not (stem_and_suffix(p)[1] == ".png" and stem_and_suffix(p)[0] in svg_stems)
    ]
    return sorted(kept, key=lambda p: PurePosixPath(p).stem != "distributions")


def _int_or_none(value: Any) -> int | None:
    return int(value) if is_number(value) and math.isfinite(value) else None




_REPORT_CSS = """
table.layers-table th[data-col] { cursor: pointer; }
table.layers-table th[data-sorted="asc"]::after { content: " \\25B2"; }
table.layers-table th[data-sorted="desc"]::after { content: " \\25BC"; }
.zoom { margin: -.5rem 0 1.2rem; }
.zoom-bar { display: flex; gap: .4rem; align-items: center; margin-bottom: .3rem; }
.zoom-box { position: relative; display: inline-block; }
.zoom canvas { border: 1px solid #ddd; cursor: crosshair; max-width: 100%; }
.zoom .tip { position: absolute; pointer-events: none; background: rgba(255,255,255,.95); border: 1px solid #999;
             font: 12px ui-monospace, monospace; padding: 2px 5px; display: none; white-space: nowrap; }
"""

# Inline (the sandboxed frame loads no file); it requests nothing. Sorting: numbers by
# data-v (missing values last), text otherwise. Zoom: the matrix's float32 cells drawn on
# a canvas with a diverging scale centred on zero (sequential when all >= 0).
_REPORT_JS = r"""
document.addEventListener("DOMContentLoaded", function () {
  "use strict";
  function fmt(v) {
    if (v === null || isNaN(v)) return "NaN";
    var a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? v.toExponential(3) : String(+v.toPrecision(4));
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.layers-table"), function (table) {
    var body = table.tBodies[0];
    Array.prototype.forEach.call(table.querySelectorAll("th[data-col]"), function (th) {
      th.title = "sort by this column";
      th.addEventListener("click", function () {
        var col = +th.dataset.col, dir = th.dataset.sorted === "asc" ? "desc" : "asc";
        Array.prototype.forEach.call(table.querySelectorAll("th[data-sorted]"), function (o) { delete o.dataset.sorted; });
        th.dataset.sorted = dir;
        var rows = Array.prototype.slice.call(body.rows);
        rows.forEach(function (r, i) { if (r.dataset.order === undefined) r.dataset.order = i; });
        function key(r) {
          var c = r.cells[col];
          if (!c) return null;
          if (c.dataset.v !== undefined) return +c.dataset.v;
          return col <= 1 ? c.textContent : null;
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x === null && y === null) return a.dataset.order - b.dataset.order;
          if (x === null) return 1;
          if (y === null) return -1;
          var d = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
          if (d === 0) return a.dataset.order - b.dataset.order;
          return dir === "asc" ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  Array.prototype.forEach.call(document.querySelectorAll(".zoom"), function (box) {
    var D = JSON.parse(box.querySelector(".heat-data").textContent);
    var raw = atob(D.v), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    var V = new Float32Array(bytes.buffer), lim = 0, neg = false;
    for (i = 0; i < V.length; i++) if (isFinite(V[i])) { lim = Math.max(lim, Math.abs(V[i])); if (V[i] < 0) neg = true; }
    if (!lim) lim = 1;
    var cv = box.querySelector("canvas"), ctx = cv.getContext("2d"), tip = box.querySelector(".tip");
    var view = {r0: 0, c0: 0, rows: D.rows, cols: D.cols};
    function colour(v) {
      if (!isFinite(v)) return "#ff00ff";
      var t = v / lim, r, g, b;
      if (!neg) { r = 255 - t * 200; g = 255 - t * 120; b = 255 - t * 40; }
      else if (t >= 0) { r = 255; g = 255 - t * 200; b = 255 - t * 200; }
      else { r = 255 + t * 200; g = 255 + t * 170; b = 255; }
      return "rgb(" + Math.round(r) + "," + Math.round(g) + "," + Math.round(b) + ")";
    }
    function draw() {
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
      var cw = cv.width / view.cols, ch = cv.height / view.rows;
      var r1 = Math.min(D.rows, Math.ceil(view.r0 + view.rows)), c1 = Math.min(D.cols, Math.ceil(view.c0 + view.cols));
      for (var r = Math.max(0, Math.floor(view.r0)); r < r1; r++) {
        for (var c = Math.max(0, Math.floor(view.c0)); c < c1; c++) {
          ctx.fillStyle = colour(V[r * D.cols + c]);
          ctx.fillRect((c - view.c0) * cw, (r - view.r0) * ch, Math.ceil(cw), Math.ceil(ch));
        }
      }
    }
    function clamp() {
      view.rows = Math.min(D.rows, Math.max(1, view.rows)); view.cols = Math.min(D.cols, Math.max(1, view.cols));
      view.r0 = Math.max(0, Math.min(D.rows - view.rows, view.r0)); view.c0 = Math.max(0, Math.min(D.cols - view.cols, view.c0));
    }
    function cellAt(ev) {
      var rect = cv.getBoundingClientRect();
      var x = (ev.clientX - rect.left) / rect.width, y = (ev.clientY - rect.top) / rect.height;
      return {r: view.r0 + y * view.rows, c: view.c0 + x * view.cols, x: x, y: y,
              px: ev.clientX - rect.left, py: ev.clientY - rect.top};
    }
    function zoom(f, at) {
      at = at || {x: 0.5, y: 0.5, r: view.r0 + view.rows / 2, c: view.c0 + view.cols / 2};
      view.rows *= f; view.cols *= f; clamp();
      view.r0 = at.r - at.y * view.rows; view.c0 = at.c - at.x * view.cols; clamp(); draw();
    }
    cv.addEventListener("wheel", function (ev) { ev.preventDefault(); zoom(ev.deltaY < 0 ? 0.8 : 1.25, cellAt(ev)); });
    var drag = null;
    cv.addEventListener("mousedown", function (ev) { drag = {x: ev.clientX, y: ev.clientY, r0: view.r0, c0: view.c0}; });
    window.addEventListener("mouseup", function () { drag = null; });
    cv.addEventListener("mousemove", function (ev) {
      var rect = cv.getBoundingClientRect();
      if (drag) {
        view.r0 = drag.r0 - (ev.clientY - drag.y) / rect.height * view.rows;
        view.c0 = drag.c0 - (ev.clientX - drag.x) / rect.width * view.cols; clamp(); draw();
      }
      var p = cellAt(ev), r = Math.floor(p.r), c = Math.floor(p.c);
      if (r < 0 || c < 0 || r >= D.rows || c >= D.cols) { tip.style.display = "none"; return; }
      var br = D.block[0], bc = D.block[1];
      var where = (br * bc > 1)
        ? "rows " + r * br + "-" + ((r + 1) * br - 1) + ", cols " + c * bc + "-" + ((c + 1) * bc - 1) + " (block mean)"
        : "row " + r + ", col " + c;
      tip.textContent = where + ": " + fmt(V[r * D.cols + c]);
      tip.style.display = "block"; tip.style.left = (p.px + 12) + "px"; tip.style.top = (p.py + 12) + "px";
    });
    cv.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    box.querySelector("[data-z=in]").addEventListener("click", function () { zoom(0.5); });
    box.querySelector("[data-z=out]").addEventListener("click", function () { zoom(2); });
    box.querySelector("[data-z=reset]").addEventListener("click", function () {
      view = {r0: 0, c0: 0, rows: D.rows, cols: D.cols}; draw();
    });
    cv.addEventListener("dblclick", function () { view = {r0: 0, c0: 0, rows: D.rows, cols: D.cols}; draw(); });
    var ratio = D.rows / D.cols;
    cv.height = Math.max(60, Math.min(480, Math.round(cv.width * ratio)));
    box.hidden = false;
    draw();
  });
  document.body.dataset.ready = "1";
});
"""
