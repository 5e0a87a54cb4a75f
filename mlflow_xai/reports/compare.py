"""The one-page HTML report of a comparison of two models (``xai/compare/report.html``).

Self-contained like the explain report (:mod:`mlflow_xai.reports.explain`; the style and
escaping helpers are :mod:`mlflow_xai.reports.page`): every image is a ``data:`` URI, no scripts, no links,
because the MLflow UI shows HTML artifacts in a sandboxed frame. Every string from
``compare.json`` (layer names, model URIs) is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from mlflow_xai.reports.page import figure, number, page_head, percent, shape, text

__all__ = ["render_compare_report"]

_SECTIONS = (
    ("weights", "Weights", "Per layer: the weight drift ||W_B \u2212 W_A|| / ||W_A||, the distributions of "
     "both sides overlaid (A blue, B orange) and heatmaps of W_B \u2212 W_A (red: B larger)."),
    ("activations", "Activations", "Layer outputs of both models on the same test rows: the relative change "
     "||act_B \u2212 act_A|| / ||act_A|| per layer and the distributions overlaid."),
    ("predictions", "Predictions", "Both models' predictions on the same test rows."),
)


def render_compare_report(data: Mapping[str, Any], images: Mapping[str, bytes], *,
                          title: str = "mlflow-xai compare") -> str:
    """Render ``compare.json``'s content and the figures as one self-contained HTML page.

    Args:
        data: The comparison as written to ``compare.json``.
        images: Artifact path (relative to ``xai/compare/``) to PNG bytes; grouped into
            sections by their first path component (``weights/``, ``activations/``) or
            stem (``predictions.png``).
        title: Page title and heading.

    Returns:
        The HTML page.

    Example:
        >>> html = render_compare_report({"a": {"ref": "x"}, "b": {"ref": "y"}, "weights": {}}, {})
        >>> html.startswith("<!DOCTYPE html>")
        True
    """
    parts = [
        *page_head(title),
        _sides_html(data.get("a"), data.get("b")),
        _verdict_html(data),
        "<h2>Predictions</h2>",
        _table(data.get("predictions") or {}, None),
        "<h2>Weight drift per layer</h2>",
        _layers_table(data.get("weights") or {}, (
            ("type", "module_type", "text"), ("shape", "shape", "shape"), ("drift", "relative_l2", "number"),
            ("bias drift", "bias_relative_l2", "number"), ("max |diff|", "max_abs_diff", "number"),
            ("L2 A", "l2_a", "number"), ("L2 B", "l2_b", "number"), ("mean A", "mean_a", "number"),
            ("mean B", "mean_b", "number"), ("std A", "std_a", "number"), ("std B", "std_b", "number"),
        ), data.get("fail_above")),
        "<h2>Activation shift per layer</h2>",
        _layers_table(data.get("activations") or {}, (
            ("type", "module_type", "text"), ("change", "relative_l2", "number"),
            ("Wasserstein", "wasserstein", "number"), ("mean A", "mean_a", "number"),
            ("mean B", "mean_b", "number"), ("std A", "std_a", "number"), ("std B", "std_b", "number"),
            ("dead A", "dead_share_a", "percent"), ("dead B", "dead_share_b", "percent"),
        ), None),
        _unmatched_html(data),
        _figures_html(images),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _sides_html(a: Any, b: Any) -> str:
    rows = []
    for label, side in (("A", a), ("B", b)):
        if not isinstance(side, Mapping):
            continue
        desc = ", ".join(f"{k} {text(side.get(k))}" for k in ("run_id", "registered_model", "version", "n_params")
                         if side.get(k) is not None)
        rows.append(f"<dt>{label}</dt><dd>{text(side.get('ref'))} ({desc})</dd>")
    return f'<dl class="source">{"".join(rows)}</dl>' if rows else ""


def _verdict_html(data: Mapping[str, Any]) -> str:
    top = data.get("max_drift")
    cards = []
    if isinstance(top, Mapping):
        cards.append(("largest weight drift", f"{number(top.get('value'))} ({text(top.get('layer'))})"))
    preds = data.get("predictions") or {}
    if preds.get("rmse_diff") is not None:
        cards.append(("prediction RMS difference", number(preds.get("rmse_diff"))))
    if preds.get("agreement") is not None:
        cards.append(("predictions agreeing", percent(preds.get("agreement"))))
    cards.append(("layers compared", number(len(data.get("weights") or {}))))
    html = ['<div class="cards">'] + [
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div></div>'
        for label, value in cards] + ["</div>"]
    gate = data.get("gate")
    if isinstance(gate, Mapping) and gate.get("passed") is not None:
        css = "ok" if gate["passed"] else "note"
        colour = "" if gate["passed"] else ' style="color:#a00"'
        html.append(f'<p class="{css}"{colour}>{text(gate.get("message"))}</p>')
    return "".join(html)


def _table(values: Mapping[str, Any], _threshold: Any) -> str:
    if not values:
        return '<p class="note">No predictions compared.</p>'
    head = "".join(f"<th>{escape(str(k))}</th>" for k in values)
    cells = "".join(f"<td>{number(v)}</td>" for v in values.values())
    return f'<div class="scroll"><table><tr>{head}</tr><tr>{cells}</tr></table></div>'


def _layers_table(layers: Mapping[str, Any], columns: Sequence[tuple[str, str, str]], threshold: Any) -> str:
    if not layers:
        return '<p class="note">No layer in common.</p>'
    head = "<th>layer</th>" + "".join(f"<th>{h}</th>" for h, _, _ in columns)
    rows = [f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>']
    for name, info in layers.items():
        cells = [f'<td class="name">{escape(str(name))}</td>']
        for _, key, kind in columns:
            value = info.get(key) if isinstance(info, Mapping) else None
            if kind == "text":
                cells.append(f'<td class="type">{text(value)}</td>')
            elif kind == "shape":
                cells.append(f"<td>{shape(value)}</td>")
            elif kind == "percent":
                cells.append(f"<td>{percent(value)}</td>")
            else:
                over = key == "relative_l2" and isinstance(threshold, (int, float)) and (
                    value is None or value > threshold)
                cells.append(f'<td class="bad">{number(value)}</td>' if over else f"<td>{number(value)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    rows.append("</tbody></table></div>")
    return "".join(rows)


def _unmatched_html(data: Mapping[str, Any]) -> str:
    items = []
    for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        names = data.get(key) or []
        if names:
            items.append(f"<li>{label}: {', '.join(text(n) for n in names)}</li>")
    for name, shapes in (data.get("shape_mismatch") or {}).items():
        items.append(f"<li>{text(name)}: weight {shape(shapes.get('a'))} in A, {shape(shapes.get('b'))} in B"
                     " (not compared)</li>")
    if not items:
        return ""
    return "<h2>Layers not compared</h2><ul>" + "".join(items) + "</ul>"


def _figures_html(images: Mapping[str, bytes]) -> str:
    html = []
    for section, heading, note in _SECTIONS:
        paths = [p for p in images if p.split("/", 1)[0].removesuffix(".png") == section]
        if not paths:
            continue
        html.append(f"<h2>{heading}: figures</h2><p class=\"note\">{escape(note)}</p>")
        html += [figure(f"xai/compare/{p}", images[p], None) for p in paths]
    return "\n".join(html)
