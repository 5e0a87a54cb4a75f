"""What every self-contained page shares: the head and style, embedded figures, and
the formatting and escaping of values.

The MLflow UI shows HTML artifacts in a sandboxed frame where relative links do not
resolve and no stylesheet loads, so a page carries its style inline and its images
as ``data:`` URIs; a page with a script carries it inline too (the frame runs
scripts but allows no request). Every value from a summary is escaped before it is written.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
from html import escape
from pathlib import PurePosixPath
from typing import Any

__all__ = ["CSS", "DASH", "MIME_TYPES", "figure", "is_number", "number", "page_head", "percent", "script_json",
           "shape", "text"]

MIME_TYPES = {
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}

DASH = "&mdash;"

# Small and inline: the sandboxed frame loads no stylesheet.
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0 auto; max-width: 1200px; padding: 1rem 1.5rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
dl.source { display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem;
            color: #555; }
dl.source dt { font-weight: 600; }
dl.source dd { margin: 0; font-family: ui-monospace, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; margin: .8rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .4rem .8rem; min-width: 8rem; }
.card .label { color: #666; font-size: .8rem; }
.card .value { font-size: 1.2rem; font-variant-numeric: tabular-nums; }
ul.flags li { color: #a00; }
p.ok { color: #2a7a2a; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #e2e2e2; padding: .2rem .45rem; text-align: right;
         white-space: nowrap; }
th { background: #f4f4f4; }
td.name, td.type { text-align: left; font-family: ui-monospace, monospace; }
tr:nth-child(even) td { background: #fafafa; }
td.warn { background: #fff3cd !important; }
td.bad { background: #f8d7da !important; color: #a00; }
p.note { color: #555; margin-top: 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
"""


def page_head(title: str, *, css: str = "", script: str = "") -> list[str]:
    """The opening of a self-contained page: doctype, the shared style, the title heading.

    Args:
        title: Page title and heading (escaped here).
        css: Style a page adds to :data:`CSS`, inline like it.
        script: A script for the head, inline (the sandboxed frame loads no file); it
            runs before the body exists, so it should wait for ``DOMContentLoaded``.
    """
    head_script = f"<script>{script}</script>" if script else ""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}{css}</style>{head_script}</head><body>",
        f"<h1>{escape(title)}</h1>",
    ]


def figure(path: str, data: bytes, caption: str | None) -> str:
    mime = MIME_TYPES[PurePosixPath(path).suffix.lower()]
    encoded = base64.b64encode(data).decode("ascii")
    text = f"{escape(caption)} " if caption else ""
    return (
        f'<figure><img src="data:{mime};base64,{encoded}" alt="{escape(path)}">'
        f"<figcaption>{text}<code>{escape(path)}</code></figcaption></figure>"
    )


def script_json(data: Any) -> str:
    """``data`` as JSON safe inside a ``<script type="application/json">`` element.

    ``<``, ``>`` and ``&`` are written as ``\\u003c`` ..., so no string (a layer name such
    as ``</script><script>...``) can end the element or open a comment; ``JSON.parse``
    reads them back unchanged. NaN and Inf are refused (JSON has neither): pass None.

    Example:
        >>> script_json({"name": "</script>"})
        '{"name":"\\\\u003c/script\\\\u003e"}'
    """
    return (json.dumps(data, allow_nan=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(value: Any) -> str:
    if not is_number(value):
        return DASH if value is None else text(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return f"{value:.4g}"


def percent(value: Any) -> str:
    if not is_number(value) or not math.isfinite(value):
        return number(value)
    return f"{float(value):.1%}"


def shape(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return escape("\u00d7".join(str(n) for n in value)) or "scalar"
    return number(value)


def text(value: Any) -> str:
    return DASH if value is None else escape(str(value))
