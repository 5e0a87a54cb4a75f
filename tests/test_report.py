"""Tests for mlflow_xai.report: self-contained, escaped, grouped HTML."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from mlflow_xai.reports.explain import render_report

PNG = b"\x89PNG\r\n\x1a\n" + b"fake png body"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>'


def _stats(**extra: Any) -> dict[str, Any]:
    return {
        "shape": [4, 3],
        "mean": 0.125,
        "std": 1.0,
        "min": -2.0,
        "max": 2.0,
        "l2_norm": 3.4641,
        "near_zero_share": 0.25,
        "nan_count": 0,
        "inf_count": 0,
        **extra,
    }


def _summary() -> dict[str, Any]:
    return {
        "source": {"run_id": "abc123", "model_uri": "models:/diabetes@champion"},
        "loss": 0.5,
        "meta": {"model_type": "Net<1>", "n_params": 21},
        "diagnostics": {
            "nan_count": 2,
            "inf_count": 0,
            "dead_unit_share": 0.75,
            "max_grad_norm": 12.5,
            "flags": ["exploding gradient in layers.0 (norm 1.2e+03 > 1e+02)"],
        },
        "layers": {
            "layers.0": {
                "module_type": "Linear",
                "weight": _stats(nan_count=2),
                "activation": None,
                "gradient": _stats(grad_to_weight_ratio=0.01, vanishing=False, exploding=True),
            },
            "layers.1": {
                "module_type": "ReLU",
                "weight": None,
                "activation": _stats(dead_share=0.75),
                "gradient": None,
            },
            "<script>alert(1)</script>": {"module_type": "<b>Evil</b>", "weight": None},
        },
    }


def _images() -> dict[str, bytes]:
    return {
        "architecture.svg": SVG,
        "architecture.png": PNG + b"arch",
        "weights/layers.10.png": PNG + b"w10",
        "weights/layers.2.png": PNG + b"w2",
        "weights/distributions.png": PNG + b"wd",
        "gradients/distributions.png": PNG + b"gd",
        "activations/mean_per_unit.png": PNG + b"am",
        "custom/extra.png": PNG + b"extra",
    }


@pytest.fixture(scope="module")
def html() -> str:
    return render_report(_summary(), _images(), title="Explain <run>")


def test_report_is_self_contained(html: str) -> None:
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(src.startswith("data:image/") for src in sources)
    lowered = html.lower()
    assert "<link" not in lowered
    # Scripts are inline (the sandboxed frame runs them) and request nothing.
    assert re.findall(r"<script[^>]*>", lowered) == ["<script>"]
    for call in ("fetch(", "xmlhttprequest", "websocket", "sendbeacon", "http://", "https://", "import("):
        assert call not in lowered, call
    assert "href=" not in lowered
    assert "url(" not in lowered


def test_report_embeds_each_image_as_base64(html: str) -> None:
    for path, data in _images().items():
        if path == "architecture.png":
            continue  # the SVG of the same diagram is embedded instead
        assert base64.b64encode(data).decode() in html, path
    assert "data:image/svg+xml;base64," + base64.b64encode(SVG).decode() in html
    assert base64.b64encode(PNG + b"arch").decode() not in html


def test_report_escapes_strings_from_the_summary(html: str) -> None:
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;Evil&lt;/b&gt;" in html
    assert "<b>Evil" not in html
    assert "<title>Explain &lt;run&gt;</title>" in html


def test_report_header_shows_source_and_diagnostics(html: str) -> None:
    assert "abc123" in html and "models:/diabetes@champion" in html
    assert "Net&lt;1&gt;" in html and "<dd>21</dd>" in html
    assert "75.0%" in html  # dead unit share
    assert "12.5" in html  # max gradient norm
    assert "exploding gradient in layers.0" in html


def test_report_layer_table_marks_problems(html: str) -> None:
    assert "4\u00d73" in html  # weight shape
    assert "exploding" in html
    assert '<td class="bad" data-v="2.0">2</td>' in html  # NaN count of layers.0
    assert '<td class="warn" data-v="0.75">75.0%</td>' in html  # dead share of layers.1


def test_report_sections_in_order_with_distributions_first(html: str) -> None:
    headings = re.findall(r"<h2>([^<]*)</h2>", html)
    assert headings == [
        "Diagnostics",
        "Layers",
        "Architecture",
        "Weights",
        "Activations",
        "Gradients",
        "Custom",
    ]
    positions = [html.index(p) for p in ("weights/distributions.png", "weights/layers.2.png")]
    assert positions == sorted(positions)
    # Layer order is the caller's (model) order, not alphabetical.
    assert html.index("weights/layers.10.png") < html.index("weights/layers.2.png")


def test_report_uses_captions() -> None:
    captions = {"weights/layers.0.png": "weights of <layers.0>"}
    page = render_report({}, {"weights/layers.0.png": PNG}, title="t", captions=captions)
    assert "weights of &lt;layers.0&gt;" in page


def test_report_dead_share_threshold_comes_from_the_summary() -> None:
    layers = {"relu": {"module_type": "ReLU", "activation": {"dead_share": 0.3}}}
    default = render_report({"layers": layers}, {}, title="t")
    assert '<td class="warn" data-v="0.3">30.0%</td>' not in default
    diagnostics = {"thresholds": {"dead_share_flag": 0.2}}
    strict = render_report({"layers": layers, "diagnostics": diagnostics}, {}, title="t")
    assert '<td class="warn" data-v="0.3">30.0%</td>' in strict


def test_report_survives_missing_and_none_values() -> None:
    summary = {
        "diagnostics": {"nan_count": None, "dead_unit_share": None, "max_grad_norm": None},
        "layers": {"fc": {"weight": {"mean": None, "std": float("nan")}, "gradient": None}},
    }
    page = render_report(summary, {}, title="t")
    assert "No problems flagged." in page
    assert "NaN" in page and "&mdash;" in page
    assert render_report({}, {}, title="empty").count("<figure>") == 0


def test_report_rejects_non_image_paths() -> None:
    with pytest.raises(ValueError, match="architecture.dot"):
        render_report({}, {"architecture.dot": b"digraph {}"}, title="t")


def test_heatmap_matrix_is_embedded_beside_its_image_and_decodes() -> None:
    import json

    import numpy as np

    from mlflow_xai.reports.explain import HEATMAP_MAX_SIDE, HeatmapMatrix

    m = np.array([[-1.5, 0.25, np.nan], [2.0, 0.0, 1e-4]])
    page = render_report({}, {"weights/layers.0.png": PNG},
                         matrices={"weights/layers.0.png": HeatmapMatrix(m, (1, 1), (2, 3))})
    img = page.index('alt="weights/layers.0.png"')
    zoom = page.index('<div class="zoom" hidden>')
    assert img < zoom  # the picture first: with scripts off it is all a reader sees
    data = json.loads(re.search(r'class="heat-data">(.*?)</script>', page).group(1))
    assert (data["rows"], data["cols"], data["shape"]) == (2, 3, [2, 3])
    decoded = np.frombuffer(base64.b64decode(data["v"]), dtype="<f4").reshape(2, 3)
    assert np.array_equal(decoded, m.astype(np.float32), equal_nan=True)
    too_big = np.zeros((HEATMAP_MAX_SIDE + 1, HEATMAP_MAX_SIDE))
    with pytest.raises(ValueError, match="block_mean_matrix"):
        render_report({}, {"weights/x.png": PNG}, matrices={"weights/x.png": HeatmapMatrix(too_big)})


def test_layer_table_cells_carry_the_numbers_they_sort_by(html: str) -> None:
    heads = re.findall(r'<th[^>]*data-col="(\d+)"', html)
    assert heads[:2] == ["0", "1"] and len(heads) == 17  # layer, type and every statistic
    assert 'data-v="12.0">4\u00d73' in html  # a shape sorts by its size
