"""The one-page HTML report of an explanation.

The page is self-contained: every image is embedded as a ``data:`` URI and the page
has no scripts, stylesheets or links, because the MLflow UI shows HTML artifacts in
a sandboxed frame where relative links do not resolve. Every string taken from the
summary (layer names come from users' models) is HTML-escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import PurePosixPath
from typing import Any

from mlflow_xai.reports.page import (
    DASH,
    MIME_TYPES,
    figure,
    is_number,
    number,
    page_head,
    percent,
    shape,
    text,
)

__all__ = ["SECTION_ORDER", "render_report"]

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

    Returns:
        The HTML page.

    Raises:
        ValueError: When an image path has no image extension.

    Example:
        >>> html = render_report({"layers": {"fc": None}}, {}, title="demo")
        >>> html.startswith("<!DOCTYPE html>") and "fc" in html
        True
    """
    parts = [
        *page_head(title),
        _source_html(summary.get("source"), summary.get("meta")),
        _warnings_html(summary.get("warnings")),
        "<h2>Diagnostics</h2>",
        _diagnostics_html(summary.get("diagnostics"), summary.get("loss")),
        "<h2>Layers</h2>",
        _layers_html(summary.get("layers"), _dead_threshold(summary.get("diagnostics"))),
        _attributions_html(summary.get("attributions")),
        _figures_html(images, captions or {}),
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
    return "\n".join([
        "<h2>Feature attributions</h2>",
        f"<p>Baseline: {text(attributions.get('baseline'))}.</p>",
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
    head_columns = "".join(f"<th>{heading}</th>" for _, heading, _, _ in _COLUMNS)
    rows = [
        '<div class="scroll"><table><thead>',
        f'<tr><th rowspan="2">layer</th><th rowspan="2">type</th>{head_groups}</tr>',
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
    if kind == "shape":
        shown = shape(stats.get(key))
    elif kind == _PERCENT:
        value = stats.get(key)
        shown = percent(value)
        if key == "dead_share" and is_number(value) and value > dead_threshold:
            css = "warn"
    elif kind == "nonfinite":
        nans = _int_or_none(stats.get("nan_count")) or 0
        infs = _int_or_none(stats.get("inf_count")) or 0
        shown = str(nans + infs)
        css = "bad" if nans + infs else ""
    elif kind == "gradient_status":
        status = [word for word in ("vanishing", "exploding") if stats.get(word)]
        shown = ", ".join(status) or "ok"
        css = "bad" if status else ""
    else:
        shown = number(stats.get(key))
    return f'<td class="{css}">{shown}</td>' if css else f"<td>{shown}</td>"


def _figures_html(images: Mapping[str, bytes], captions: Mapping[str, str]) -> str:
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
    return "\n".join(html)


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


