"""The training-dynamics page: one self-contained HTML file per train run (``xai/training.html``).

:class:`TrainingRecord` collects what :class:`mlflow_xai.XAIMonitor` measures while a
network trains (histogram counts per snapshot epoch, the per-layer scalar curves, the
alerts, the losses); :func:`render_training_page` turns it into a page whose data,
script and style are inline. The MLflow UI shows an HTML artifact in an iframe with
``sandbox="allow-scripts"`` (no network, no same-origin), so the page requests nothing:
no external library, no ``fetch``. Layer names come from users' models: they travel in
a JSON blob whose ``<`` is escaped, and the script writes them as text, never as markup.

Bounded size (the data layout is in ``docs/training-page.md``):

* histograms: at most :data:`PAGE_MAX_SNAPSHOTS` epochs (thinned evenly, first and last
  kept), at most :data:`PAGE_MAX_LAYERS` layers per kind (those whose distribution moved
  most, in model order), counts quantised to one byte per bin, scaled to the row's peak;
* curves: at most :data:`PAGE_MAX_POINTS` steps per metric family (thinned evenly, the
  last kept), stored as float32.

The page opens on the layer with the most notable change (:func:`opening_view`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlflow_xai.reports.page import page_head, script_json, text

__all__ = [
    "KINDS",
    "PAGE_MAX_LAYERS",
    "PAGE_MAX_POINTS",
    "PAGE_MAX_SNAPSHOTS",
    "PAGE_VERSION",
    "TrainingRecord",
    "opening_view",
    "page_data",
    "render_training_page",
]

#: Version of the page's JSON data layout (``docs/training-page.md``).
PAGE_VERSION = 1
#: Histogram kinds, in the order of the page's tabs.
KINDS = ("weights", "gradients", "activations")
#: Snapshot epochs kept on the page: 40 bins x 1 byte x 100 epochs is 4 kB per layer and
#: kind, and a slider with more stops than pixels per stop shows nothing more.
PAGE_MAX_SNAPSHOTS = 100
#: Layers kept per kind. A cookbook network has 8 weight layers and 7 activations at any
#: width; a deeper network keeps the 32 that moved most, and its page stays under 2 MB
#: with every cap reached.
PAGE_MAX_LAYERS = 32
#: Steps kept per metric family (all layers of ``grad_norm`` share one step axis): a
#: curve a few hundred pixels wide shows no more, and 32 layers x 6 families x 400
#: float32 values are 0.4 MB as base64.
PAGE_MAX_POINTS = 400
# Scalar curve families, in the page's order, with their labels.
_FAMILIES = {
    "weight_norm": "weight L2 norm",
    "grad_norm": "gradient L2 norm",
    "update_ratio": "update ratio ||dw|| / ||w||",
    "act_mean": "activation mean",
    "act_std": "activation std",
    "dead_share": "dead share",
}


@dataclass
class TrainingRecord:
    """What the monitor measured during one fit, kept on the host for the page.

    Histogram rows are laid out as the monitor bins them: ``bins`` counts, then the
    finite min and max, the number of finite values, their sum and sum of squares, and
    numel. Everything here is plain numbers; nothing refers to a tensor.

    Example:
        >>> r = TrainingRecord(bins=2)
        >>> r.add_histograms(0, 14, {"weights": (["fc"], np.array([[1, 3, -1, 1, 4, 0, 4, 4]]))})
        >>> r.add_metrics(14, {"weight_norm/fc": 2.0})
        >>> layer = page_data(r)["kinds"]["weights"]["layers"][0]
        >>> layer["name"], layer["lo"], layer["hi"], layer["peak"], layer["mean"]
        ('fc', [-1.0], [1.0], [3.0], [0.0])
    """

    bins: int = 40
    title: str = "Training dynamics"
    run_id: str | None = None
    layer_keys: dict[str, str] = field(default_factory=dict)  # layer name -> metric-safe name
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (epoch, step)
    # kind -> layer -> [(snapshot index, row)]
    histograms: dict[str, dict[str, list[tuple[int, np.ndarray]]]] = field(default_factory=dict)
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # metric key -> step -> value
    alerts: list[dict[str, Any]] = field(default_factory=list)  # kind, layer, step (first seen)
    losses: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # name -> (epoch, step, v)
    stride: int = 1  # epochs between snapshots for an unbounded fit; doubles as the record halves

    def has_snapshot(self, epoch: int) -> bool:
        return any(e == epoch for e, _ in self.snapshots)

    def add_histograms(self, epoch: int, step: int, kinds: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> None:
        """One snapshot: per kind, the layer names and their histogram rows."""
        if not kinds or self.has_snapshot(epoch):
            return
        index = len(self.snapshots)
        self.snapshots.append((epoch, step))
        for kind, (names, rows) in kinds.items():
            per_layer = self.histograms.setdefault(kind, {})
            for name, row in zip(names, np.asarray(rows, dtype=np.float64), strict=False):
                per_layer.setdefault(name, []).append((index, row.copy()))
        if len(self.snapshots) > 2 * PAGE_MAX_SNAPSHOTS:
            self._halve()

    def _halve(self) -> None:
        """Keep every other snapshot (the first and the newest always): a fit without an
        epoch limit keeps at most twice the page's cap of snapshots in memory."""
        n = len(self.snapshots)
        keep = sorted({*range(0, n, 2), n - 1})
        new_index = {old: new for new, old in enumerate(keep)}
        self.snapshots = [self.snapshots[i] for i in keep]
        for per_layer in self.histograms.values():
            for name, entries in per_layer.items():
                per_layer[name] = [(new_index[i], row) for i, row in entries if i in new_index]
        self.stride *= 2

    def add_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Scalars as the monitor logs them (``grad_norm/<layer>``, ``alert/<kind>``, ...)."""
        for key, value in values.items():
            self.metrics.setdefault(key, {})[step] = float(value)

    def add_alert(self, kind: str, layer: str, step: int) -> None:
        self.alerts.append({"kind": kind, "layer": layer, "step": int(step)})

    def add_loss(self, name: str, epoch: int, step: int, value: float) -> None:
        series = self.losses.setdefault(name, [])
        if series and series[-1][0] == epoch:
            series[-1] = (epoch, step, float(value))
        else:
            series.append((epoch, step, float(value)))


# ------------------------------------------------------------------ data


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _thin(n: int, limit: int) -> list[int]:
    """At most ``limit`` indices of ``range(n)``, evenly spread, first and last kept."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def _finite(value: float) -> float | None:
    """``value`` to 6 significant digits (what the page shows, and half the JSON), None if not finite."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def _moments(row: np.ndarray, bins: int) -> tuple[float, float]:
    n, total, squares = float(row[bins + 2]), float(row[bins + 3]), float(row[bins + 4])
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean * mean, 0.0))


def _change(rows: Sequence[np.ndarray], bins: int) -> float:
    """How far a layer's distribution moved from its first to its last snapshot:
    ``|mean_last - mean_first| / std_first + |ln(std_last / std_first)|``; 0 for one
    snapshot, infinite when the last one has NaN/Inf (it is what a reader must see)."""
    if len(rows) < 2:
        return 0.0
    first, last = rows[0], rows[-1]
    if last[bins + 2] < last[bins + 5]:  # non-finite values appeared
        return math.inf
    (m0, s0), (m1, s1) = _moments(first, bins), _moments(last, bins)
    if not all(map(math.isfinite, (m0, s0, m1, s1))):
        return 0.0
    if s0 <= 0 or s1 <= 0:
        return abs(m1 - m0) + abs(s1 - s0)
    return abs(m1 - m0) / s0 + abs(math.log(s1 / s0))


def opening_view(record: TrainingRecord) -> dict[str, Any]:
    """The kind and layer the page opens on, and why.

    The rule: the first layer of the first alert that fired (``nan`` and the weights'
    kind first, then gradient alerts on the gradients, ``dead_units`` on the
    activations), else the weight or activation layer whose distribution moved most
    between its first and last snapshot (:func:`_change`: shift of the mean in units of
    the first std plus the log of the std's growth), else the first layer. Gradients are
    left out of the comparison: they shrink by orders of magnitude as the loss falls,
    which is the normal case, not a notable one.
    """
    alert_kind = {"nan": "weights", "exploding_gradients": "gradients", "vanishing_gradients": "gradients",
                  "dead_units": "activations"}
    for alert in sorted(record.alerts, key=lambda a: a["step"]):
        kind = alert_kind.get(alert["kind"], "weights")
        if alert["layer"] in record.histograms.get(kind, {}):
            return {"kind": kind, "layer": alert["layer"],
                    "why": f"alert {alert['kind']} first fired here at step {alert['step']}"}
        for other in KINDS:
            if alert["layer"] in record.histograms.get(other, {}):
                return {"kind": other, "layer": alert["layer"],
                        "why": f"alert {alert['kind']} first fired here at step {alert['step']}"}
    best: tuple[float, str, str] | None = None
    for kind in ("weights", "activations"):
        for layer, entries in record.histograms.get(kind, {}).items():
            score = _change([row for _, row in entries], record.bins)
            if best is None or score > best[0]:
                best = (score, kind, layer)
    if best is not None:
        why = ("its distribution moved most from the first to the last snapshot "
               f"(score {best[0]:.3g}: mean shift in first-snapshot stds + |ln std ratio|)")
        return {"kind": best[1], "layer": best[2], "why": why}
    for kind in KINDS:
        if record.histograms.get(kind):
            return {"kind": kind, "layer": next(iter(record.histograms[kind])), "why": "the first layer"}
    return {"kind": "weights", "layer": None, "why": "no histograms were recorded"}


def page_data(record: TrainingRecord) -> dict[str, Any]:
    """The page's JSON blob (layout in ``docs/training-page.md``), with the caps applied."""
    bins = record.bins
    keep = _thin(len(record.snapshots), PAGE_MAX_SNAPSHOTS)
    new_index = {old: new for new, old in enumerate(keep)}
    kinds: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    for kind in KINDS:
        per_layer = record.histograms.get(kind)
        if not per_layer:
            continue
        names = list(per_layer)
        if len(names) > PAGE_MAX_LAYERS:
            scores = {n: _change([row for _, row in per_layer[n]], bins) for n in names}
            chosen = set(sorted(names, key=lambda n: -scores[n])[:PAGE_MAX_LAYERS])
            dropped[kind] = len(names) - PAGE_MAX_LAYERS
            names = [n for n in names if n in chosen]
        layers = []
        for name in names:
            entries = [(new_index[i], row) for i, row in per_layer[name] if i in new_index]
            if not entries:
                continue
            rows = np.stack([row for _, row in entries])
            counts = rows[:, :bins]
            peak = counts.max(axis=1)
            scaled = np.where(peak[:, None] > 0, counts / np.maximum(peak[:, None], 1e-300) * 255.0, 0.0)
            # A bin with any count shows: at least 1, never rounded away to empty.
            q = np.where(counts > 0, np.maximum(np.rint(scaled), 1), 0).astype(np.uint8)
            moments = [_moments(r, bins) for r in rows]
            layers.append({
                "name": name,
                "key": record.layer_keys.get(name, name),
                "snapshots": [i for i, _ in entries],
                "q": _b64(q),
                "peak": [_finite(float(p)) for p in peak],
                "lo": [_finite(float(r[bins])) for r in rows],
                "hi": [_finite(float(r[bins + 1])) for r in rows],
                "n": [int(r[bins + 2]) for r in rows],
                "numel": [int(r[bins + 5]) for r in rows],
                "mean": [_finite(m) for m, _ in moments],
                "std": [_finite(s) for _, s in moments],
            })
        kinds[kind] = {"layers": layers}
    return {
        "version": PAGE_VERSION,
        "title": record.title,
        "run_id": record.run_id,
        "bins": bins,
        "epochs": [record.snapshots[i][0] for i in keep],
        "steps": [record.snapshots[i][1] for i in keep],
        "kinds": kinds,
        "dropped_layers": dropped,
        "curves": _curves(record),
        "alerts": _alerts(record),
        "losses": {name: {"epochs": [e for e, _, _ in s], "steps": [st for _, st, _ in s],
                          "values": [_finite(v) for _, _, v in s]}
                   for name, s in record.losses.items()},
        "open": opening_view(record),
        "caps": {"snapshots": PAGE_MAX_SNAPSHOTS, "layers": PAGE_MAX_LAYERS, "points": PAGE_MAX_POINTS},
    }


def _curves(record: TrainingRecord) -> dict[str, Any]:
    """Per family one step axis (the union of its layers' steps, thinned) and one
    float32 series per layer key on it, NaN where a layer has no value at that step."""
    families: dict[str, dict[str, dict[int, float]]] = {}
    for key, values in record.metrics.items():
        family, _, layer = key.partition("/")
        if family in _FAMILIES and layer:
            families.setdefault(family, {})[layer] = values
    out: dict[str, Any] = {}
    for family in _FAMILIES:
        series = families.get(family)
        if not series:
            continue
        steps = sorted({s for values in series.values() for s in values})
        steps = [steps[i] for i in _thin(len(steps), PAGE_MAX_POINTS)]
        out[family] = {
            "label": _FAMILIES[family],
            "steps": steps,
            "series": {layer: _b64(np.array([values.get(s, math.nan) for s in steps], dtype="<f4"))
                       for layer, values in series.items()},
        }
    return out


def _alerts(record: TrainingRecord) -> list[dict[str, Any]]:
    """Each alert's first layer and step, and (thinned) every step where it held."""
    out = []
    for alert in record.alerts:
        held = sorted(s for s, v in record.metrics.get(f"alert/{alert['kind']}", {}).items() if v)
        held = [held[i] for i in _thin(len(held), PAGE_MAX_POINTS)]
        out.append({**alert, "steps": held})
    return out


# ------------------------------------------------------------------ page


def render_training_page(record: TrainingRecord) -> str:
    """The self-contained HTML page of a fit's training dynamics.

    Args:
        record: What the monitor collected.

    Returns:
        The page: data in a ``<script type="application/json">`` blob, the drawing script
        and the style inline; it loads nothing and requests nothing.

    Example:
        >>> html = render_training_page(TrainingRecord(title="demo <1>"))
        >>> html.startswith("<!DOCTYPE html>") and "demo &lt;1&gt;" in html
        True
    """
    data = page_data(record)
    source = f'<dl class="source"><dt>run</dt><dd>{text(record.run_id)}</dd></dl>' if record.run_id else ""
    parts = [
        *page_head(record.title, css=TRAINING_CSS),
        source,
        '<noscript><p class="note">This page draws with JavaScript, which is off. The same histograms are '
        "the run's <code>xai_weights</code>, <code>xai_gradients</code> and <code>xai_activations</code> "
        "images, and the curves are its <code>weight_norm/</code>, <code>grad_norm/</code>, ... metrics."
        "</p></noscript>",
        _BODY,
        f'<script type="application/json" id="xai-data">{script_json(data)}</script>',
        f"<script>{TRAINING_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


_BODY = """
<div id="alerts"></div>
<div id="app" class="app">
  <nav id="layers" class="layers" aria-label="layers"></nav>
  <main>
    <div id="kinds" class="tabs" role="tablist"></div>
    <p id="why" class="note"></p>
    <h2 id="dist-title">Distribution over epochs</h2>
    <p class="note">Epoch down, value across; colour is each epoch's density on a log scale (its highest bin
    darkest, 1% of it lightest).
    Hover to read a bin; the line marks the epoch shown below.</p>
    <div class="heat"><canvas id="heat" width="720" height="280"></canvas><div id="heat-tip" class="tip"></div></div>
    <div class="slider"><label for="epoch">epoch</label>
      <input type="range" id="epoch" min="0" max="0" value="0" step="1">
      <output id="epoch-label" for="epoch"></output></div>
    <div id="hist"></div>
    <p id="hist-stats" class="note"></p>
    <h2>Curves</h2>
    <p class="note">Shared step axis (optimizer steps); hover for values. Red lines: where an alert first fired,
    red ticks: every step where it held.</p>
    <div id="curves"></div>
  </main>
</div>
"""

#: Style of the training page, added to the shared :data:`mlflow_xai.reports.page.CSS`.
TRAINING_CSS = """
.app { display: grid; grid-template-columns: minmax(7rem, max-content) minmax(0, 1fr); gap: 1rem;
       align-items: start; }
main { min-width: 0; }
.layers { display: flex; flex-direction: column; gap: 2px; position: sticky; top: .5rem;
          max-height: 95vh; overflow-y: auto; }
.layers button, .tabs button { font: 12px ui-monospace, monospace; text-align: left; cursor: pointer;
          border: 1px solid #ccc; background: #fff; padding: .2rem .5rem; border-radius: 4px; }
.layers button.on, .tabs button.on { background: #4c72b0; color: #fff; border-color: #2a4d7f; }
.layers button.alert { border-left: 4px solid #c0007a; }
.layers button:disabled, .tabs button:disabled { color: #aaa; cursor: default; }
.tabs { display: flex; gap: .3rem; }
.tabs button { font-family: inherit; font-size: 13px; }
.heat { position: relative; max-width: 720px; }
canvas { border: 1px solid #ddd; width: 100%; display: block; }
#hist svg { width: 100%; max-width: 720px; height: auto; }
.tip { position: absolute; pointer-events: none; background: rgba(255,255,255,.95); border: 1px solid #999;
       font: 12px ui-monospace, monospace; padding: 2px 5px; display: none; white-space: nowrap; }
.slider { display: flex; align-items: center; gap: .6rem; margin: .6rem 0; }
.slider input { width: min(420px, 60%); }
.slider output { font-variant-numeric: tabular-nums; font-weight: 600; }
#alerts ul { color: #a00; }
#alerts button { font: inherit; color: #a00; background: none; border: none; text-decoration: underline;
                 cursor: pointer; padding: 0; }
.curves { display: flex; flex-wrap: wrap; gap: .5rem; }
.curve { border: 1px solid #eee; }
.curve text { font: 11px system-ui, sans-serif; fill: #333; }
.curve .val { font-family: ui-monospace, monospace; }
"""

#: The page's script: decodes the blob, draws with canvas and inline SVG markup, no requests.
TRAINING_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("xai-data").textContent);
  var KINDS = ["weights", "gradients", "activations"];
  var COLS = 120;
  var S = {kind: null, layer: null, snap: 0, hoverStep: null};
  function $(id) { return document.getElementById(id); }
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function fmt(v) {
    if (v === null || v === undefined || isNaN(v)) return "NaN";
    if (!isFinite(v)) return v > 0 ? "Inf" : "-Inf";
    var a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? v.toExponential(3) : String(+v.toPrecision(4));
  }
  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  function floats(b64) { var b = bytes(b64); return new Float32Array(b.buffer, 0, b.length / 4); }
  function layersOf(kind) { return (D.kinds[kind] && D.kinds[kind].layers) || []; }
  function current() {
    var ls = layersOf(S.kind);
    for (var i = 0; i < ls.length; i++) if (ls[i].name === S.layer) return ls[i];
    return null;
  }
  // Counts of one snapshot row, decoded: q / 255 * peak (one byte per bin).
  function rowCounts(L, r) {
    if (!L._q) L._q = bytes(L.q);
    var out = [];
    for (var b = 0; b < D.bins; b++) out.push(L._q[r * D.bins + b] / 255 * L.peak[r]);
    return out;
  }

  // ---------------------------------------------------------------- chooser
  function drawChooser() {
    var tabs = $("kinds"); tabs.innerHTML = "";
    KINDS.forEach(function (k) {
      var b = document.createElement("button");
      b.textContent = k; b.setAttribute("role", "tab"); b.dataset.kind = k;
      b.className = k === S.kind ? "on" : "";
      b.disabled = layersOf(k).length === 0;
      b.onclick = function () { choose(k, S.layer); };
      tabs.appendChild(b);
    });
    var nav = $("layers"); nav.innerHTML = "";
    var alerted = {};
    D.alerts.forEach(function (a) { alerted[a.layer] = true; });
    layersOf(S.kind).forEach(function (L) {
      var b = document.createElement("button");
      b.textContent = L.name; b.dataset.layer = L.name;
      b.className = (L.name === S.layer ? "on" : "") + (alerted[L.name] ? " alert" : "");
      b.onclick = function () { choose(S.kind, L.name); };
      nav.appendChild(b);
    });
  }
  function choose(kind, layer) {
    // A layer the new kind lacks (weights -> activations): the one at the same place in the list.
    var before = layersOf(S.kind).map(function (L) { return L.name; }).indexOf(layer);
    S.kind = kind;
    var ls = layersOf(kind);
    if (!ls.some(function (L) { return L.name === layer; })) {
      layer = ls.length ? ls[Math.max(0, Math.min(before, ls.length - 1))].name : null;
    }
    S.layer = layer;
    var L = current();
    S.snap = L ? L.snapshots.length - 1 : 0;
    var slider = $("epoch");
    slider.max = L ? Math.max(L.snapshots.length - 1, 0) : 0;
    slider.value = S.snap;
    drawChooser(); drawHeat(); drawHist(); drawCurves();
  }

  // ---------------------------------------------------------------- heatmap
  function range(L) {
    var lo = Infinity, hi = -Infinity;
    for (var r = 0; r < L.snapshots.length; r++) {
      if (L.lo[r] !== null && L.n[r] > 0) { lo = Math.min(lo, L.lo[r]); hi = Math.max(hi, L.hi[r]); }
    }
    if (!isFinite(lo) || !isFinite(hi)) return null;
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    return [lo, hi];
  }
  // One snapshot's counts spread over COLS common columns (uniform within each bin).
  function regrid(L, r, lo, hi) {
    var out = new Float64Array(COLS), c = rowCounts(L, r);
    if (L.lo[r] === null || L.n[r] === 0) return out;
    var a = L.lo[r], b = L.hi[r]; if (a === b) { a -= 0.5; b += 0.5; }
    var w = (b - a) / D.bins, span = hi - lo;
    for (var i = 0; i < D.bins; i++) {
      if (!c[i]) continue;
      var x0 = (a + i * w - lo) / span * COLS, x1 = (a + (i + 1) * w - lo) / span * COLS;
      var width = Math.max(x1 - x0, 1e-9);
      for (var k = Math.max(0, Math.floor(x0)); k < Math.min(COLS, Math.ceil(x1)); k++) {
        var overlap = Math.min(x1, k + 1) - Math.max(x0, k);
        if (overlap > 0) out[k] += c[i] * overlap / width;
      }
      if (x1 - x0 < 1e-9) out[Math.min(COLS - 1, Math.max(0, Math.floor(x0)))] += c[i];
    }
    return out;
  }
  function colour(t) {  // white -> blue -> dark blue
    t = Math.max(0, Math.min(1, t));
    var r = Math.round(255 - t * (255 - 20)), g = Math.round(255 - t * (255 - 60)), b = Math.round(255 - t * (255 - 130));
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  var heat = null;
  function drawHeat() {
    var cv = $("heat"), ctx = cv.getContext("2d"), L = current();
    ctx.clearRect(0, 0, cv.width, cv.height);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, cv.width, cv.height);
    heat = null;
    $("dist-title").textContent = L ? "Distribution over epochs: " + S.kind + " of " + L.name : "No histograms";
    if (!L) return;
    var rg = range(L); if (!rg) return;
    var left = 60, top = 6, w = cv.width - left - 10, h = cv.height - top - 30, n = L.snapshots.length;
    var rows = [];
    for (var r = 0; r < n; r++) rows.push(regrid(L, r, rg[0], rg[1]));
    var rowH = h / n, colW = w / COLS;
    for (r = 0; r < n; r++) {
      var m = 0; for (var k = 0; k < COLS; k++) m = Math.max(m, rows[r][k]);
      for (k = 0; k < COLS; k++) {
        if (!rows[r][k]) continue;
        ctx.fillStyle = colour(Math.log(1 + 99 * rows[r][k] / m) / Math.log(100));
        ctx.fillRect(left + k * colW, top + r * rowH, Math.ceil(colW), Math.ceil(rowH));
      }
    }
    ctx.fillStyle = "#333"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "right";
    var every = Math.max(1, Math.ceil(n / 12));
    for (r = 0; r < n; r += every) ctx.fillText("ep " + D.epochs[L.snapshots[r]], left - 4, top + (r + 0.5) * rowH + 4);
    for (var t = 0; t <= 4; t++) {
      ctx.textAlign = t === 0 ? "left" : t === 4 ? "right" : "center";
      ctx.fillText(fmt(rg[0] + (rg[1] - rg[0]) * t / 4), left + w * t / 4, top + h + 14);
    }
    if (rg[0] < 0 && rg[1] > 0) {
      var zx = left + (-rg[0]) / (rg[1] - rg[0]) * w;
      ctx.strokeStyle = "#888"; ctx.setLineDash([3, 3]); ctx.beginPath();
      ctx.moveTo(zx, top); ctx.lineTo(zx, top + h); ctx.stroke(); ctx.setLineDash([]);
    }
    ctx.strokeStyle = "#c0007a"; ctx.lineWidth = 2;
    ctx.strokeRect(left, top + S.snap * rowH, w, Math.max(rowH, 2)); ctx.lineWidth = 1;
    heat = {left: left, top: top, w: w, h: h, rowH: rowH, colW: colW, rows: rows, lo: rg[0], hi: rg[1], L: L};
  }
  function heatHover(ev) {
    var tip = $("heat-tip"), cv = $("heat");
    if (!heat) { tip.style.display = "none"; return; }
    var rect = cv.getBoundingClientRect(), sx = cv.width / rect.width, sy = cv.height / rect.height;
    var x = (ev.clientX - rect.left) * sx, y = (ev.clientY - rect.top) * sy;
    var r = Math.floor((y - heat.top) / heat.rowH), k = Math.floor((x - heat.left) / heat.colW);
    if (r < 0 || r >= heat.rows.length || k < 0 || k >= COLS) { tip.style.display = "none"; return; }
    var span = (heat.hi - heat.lo) / COLS, total = 0;
    for (var i = 0; i < COLS; i++) total += heat.rows[r][i];
    tip.textContent = "epoch " + D.epochs[heat.L.snapshots[r]] + "  [" + fmt(heat.lo + k * span) + ", " +
      fmt(heat.lo + (k + 1) * span) + "): " + (total ? (100 * heat.rows[r][k] / total).toFixed(1) : "0") + "%";
    tip.style.display = "block";
    tip.style.left = (ev.clientX - rect.left + 12) + "px"; tip.style.top = (ev.clientY - rect.top + 12) + "px";
  }

  // ---------------------------------------------------------------- one epoch
  function drawHist() {
    var L = current(), box = $("hist");
    if (!L) { box.innerHTML = ""; $("epoch-label").textContent = ""; $("hist-stats").textContent = ""; return; }
    var r = S.snap, idx = L.snapshots[r], c = rowCounts(L, r);
    $("epoch-label").textContent = "epoch " + D.epochs[idx] + " (step " + D.steps[idx] + ")";
    var W = 720, H = 200, pad = 30, peak = Math.max.apply(null, c.concat([1e-300]));
    var d = "M" + pad + "," + (H - pad);
    for (var i = 0; i < D.bins; i++) {
      var x0 = pad + (W - 2 * pad) * i / D.bins, x1 = pad + (W - 2 * pad) * (i + 1) / D.bins;
      var y = H - pad - (H - 2 * pad) * c[i] / peak;
      d += "L" + x0.toFixed(1) + "," + y.toFixed(1) + "L" + x1.toFixed(1) + "," + y.toFixed(1);
    }
    d += "L" + (W - pad) + "," + (H - pad) + "Z";
    var lo = L.lo[r], hi = L.hi[r], svg = '<svg viewBox="0 0 ' + W + ' ' + H + '" class="curve" id="hist-svg">' +
      '<path id="hist-path" d="' + d + '" fill="#4c72b0" stroke="#2a4d7f"/>' +
      '<line x1="' + pad + '" x2="' + (W - pad) + '" y1="' + (H - pad) + '" y2="' + (H - pad) + '" stroke="#999"/>';
    if (lo !== null && hi !== null && lo < 0 && hi > 0) {
      var zx = pad + (W - 2 * pad) * (-lo) / (hi - lo);
      svg += '<line x1="' + zx + '" x2="' + zx + '" y1="' + pad + '" y2="' + (H - pad) + '" stroke="#222" stroke-dasharray="3,3"/>';
    }
    svg += '<text x="' + pad + '" y="' + (H - 8) + '">' + esc(fmt(lo)) + '</text>' +
      '<text x="' + (W - pad) + '" y="' + (H - 8) + '" text-anchor="end">' + esc(fmt(hi)) + '</text>' +
      '<text x="' + (W / 2) + '" y="16" text-anchor="middle">' + esc(S.kind + " of " + L.name + ", epoch " + D.epochs[idx]) + '</text></svg>';
    box.innerHTML = svg;
    var bad = L.numel[r] - L.n[r];
    $("hist-stats").textContent = "min " + fmt(lo) + ", max " + fmt(hi) + ", mean " + fmt(L.mean[r]) + ", std " +
      fmt(L.std[r]) + ", " + L.n[r] + " finite values" + (bad ? ", NaN/Inf: " + bad : "");
  }

  // ---------------------------------------------------------------- curves
  var charts = [];
  function series() {
    var L = current(), out = [];
    if (!L) return out;
    Object.keys(D.curves).forEach(function (f) {
      var c = D.curves[f];
      if (!c.series[L.key]) return;
      if (!c._v) c._v = {};
      if (!c._v[L.key]) c._v[L.key] = floats(c.series[L.key]);
      out.push({label: c.label, steps: c.steps, values: c._v[L.key], lines: null});
    });
    var names = Object.keys(D.losses);
    if (names.length) {
      out.push({label: "loss per epoch", steps: null, lines: names.map(function (n) {
        return {name: n, steps: D.losses[n].steps, values: D.losses[n].values};
      })});
    }
    return out;
  }
  function stepRange() {
    var lo = Infinity, hi = -Infinity;
    Object.keys(D.curves).forEach(function (f) {
      var s = D.curves[f].steps; if (s.length) { lo = Math.min(lo, s[0]); hi = Math.max(hi, s[s.length - 1]); }
    });
    Object.keys(D.losses).forEach(function (n) {
      var s = D.losses[n].steps; if (s.length) { lo = Math.min(lo, s[0]); hi = Math.max(hi, s[s.length - 1]); }
    });
    if (!isFinite(lo)) return [0, 1];
    return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
  }
  var PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"];
  function drawCurves() {
    var box = $("curves"), list = series(), xr = stepRange();
    charts = [];
    var W = 360, H = 170, pl = 52, pr = 8, pt = 22, pb = 22, html = '<div class="curves">';
    list.forEach(function (s, ci) {
      var lines = s.lines || [{name: s.label, steps: s.steps, values: s.values}];
      var vals = [];
      lines.forEach(function (l) { for (var i = 0; i < l.values.length; i++) if (l.values[i] !== null && isFinite(l.values[i])) vals.push(l.values[i]); });
      var ymin = vals.length ? Math.min.apply(null, vals) : 0, ymax = vals.length ? Math.max.apply(null, vals) : 1;
      var log = ymin > 0 && ymax / ymin > 100;
      var f = log ? Math.log10 : function (v) { return v; };
      var a = f(ymin), b = f(ymax); if (a === b) { a -= 0.5; b += 0.5; }
      var X = function (st) { return pl + (W - pl - pr) * (st - xr[0]) / (xr[1] - xr[0]); };
      var Y = function (v) { return pt + (H - pt - pb) * (1 - (f(v) - a) / (b - a)); };
      var svg = '<svg class="curve" width="' + W + '" height="' + H + '" data-chart="' + ci + '">' +
        '<text x="' + pl + '" y="14">' + esc(s.label) + (log ? " (log)" : "") + '</text>' +
        '<text class="val" x="' + (W - pr) + '" y="14" text-anchor="end" id="val-' + ci + '"></text>';
      svg += '<text x="' + (pl - 4) + '" y="' + (pt + 8) + '" text-anchor="end">' + esc(fmt(ymax)) + '</text>' +
        '<text x="' + (pl - 4) + '" y="' + (H - pb) + '" text-anchor="end">' + esc(fmt(ymin)) + '</text>' +
        '<text x="' + pl + '" y="' + (H - 6) + '">' + esc(fmt(xr[0])) + '</text>' +
        '<text x="' + (W - pr) + '" y="' + (H - 6) + '" text-anchor="end">step ' + esc(fmt(xr[1])) + '</text>';
      D.alerts.forEach(function (al) {
        var x = X(al.step);
        svg += '<line x1="' + x + '" x2="' + x + '" y1="' + pt + '" y2="' + (H - pb) + '" stroke="#c0007a" stroke-width="1.5"><title>' +
          esc(al.kind + " first fired at step " + al.step + " in " + al.layer) + '</title></line>';
        al.steps.forEach(function (st) {
          var tx = X(st); svg += '<line x1="' + tx + '" x2="' + tx + '" y1="' + (H - pb) + '" y2="' + (H - pb - 5) + '" stroke="#c0007a"/>';
        });
      });
      lines.forEach(function (l, li) {
        var d = "", pen = false;
        for (var i = 0; i < l.steps.length; i++) {
          var v = l.values[i];
          if (v === null || !isFinite(v) || (log && v <= 0)) { pen = false; continue; }
          d += (pen ? "L" : "M") + X(l.steps[i]).toFixed(1) + "," + Y(v).toFixed(1); pen = true;
        }
        svg += '<path d="' + d + '" fill="none" stroke="' + PALETTE[li % PALETTE.length] + '" stroke-width="1.5"/>';
      });
      svg += '<line class="guide" x1="0" x2="0" y1="' + pt + '" y2="' + (H - pb) + '" stroke="#555" stroke-dasharray="2,2" visibility="hidden"/>';
      svg += '<rect class="hover" x="' + pl + '" y="' + pt + '" width="' + (W - pl - pr) + '" height="' + (H - pt - pb) + '" fill="transparent"/></svg>';
      html += svg;
      charts.push({lines: lines, X: X, pl: pl, pr: pr, W: W, xr: xr});
    });
    html += "</div>";
    if (!list.length) html = '<p class="note">No curves for this layer.</p>';
    box.innerHTML = html;
    Array.prototype.forEach.call(box.querySelectorAll("svg.curve"), function (el) {
      el.addEventListener("mousemove", function (ev) {
        var c = charts[+el.dataset.chart], rect = el.getBoundingClientRect();
        var x = (ev.clientX - rect.left) * (c.W / rect.width);
        hoverAt(c.xr[0] + (x - c.pl) / (c.W - c.pl - c.pr) * (c.xr[1] - c.xr[0]));
      });
      el.addEventListener("mouseleave", function () { hoverAt(null); });
    });
  }
  // One step for every chart: the shared axis. Each chart shows its value nearest that step.
  function hoverAt(step) {
    var svgs = $("curves").querySelectorAll("svg.curve");
    charts.forEach(function (c, ci) {
      var guide = svgs[ci].querySelector(".guide"), label = $("val-" + ci);
      if (step === null) { guide.setAttribute("visibility", "hidden"); label.textContent = ""; return; }
      var parts = [], at = null;
      c.lines.forEach(function (l) {
        var best = -1, dist = Infinity;
        for (var i = 0; i < l.steps.length; i++) {
          var dd = Math.abs(l.steps[i] - step);
          if (dd < dist && l.values[i] !== null) { dist = dd; best = i; }
        }
        if (best >= 0) { at = l.steps[best]; parts.push((c.lines.length > 1 ? l.name + " " : "") + fmt(l.values[best])); }
      });
      if (at === null) { guide.setAttribute("visibility", "hidden"); label.textContent = ""; return; }
      var x = c.X(at);
      guide.setAttribute("x1", x); guide.setAttribute("x2", x); guide.setAttribute("visibility", "visible");
      label.textContent = "step " + at + ": " + parts.join(", ");
    });
  }

  // ---------------------------------------------------------------- alerts
  function drawAlerts() {
    var box = $("alerts");
    if (!D.alerts.length) { box.innerHTML = '<p class="ok">No alerts fired.</p>'; return; }
    var ul = document.createElement("ul");
    D.alerts.forEach(function (a) {
      var li = document.createElement("li"), b = document.createElement("button");
      b.textContent = a.layer;
      b.onclick = function () {
        var kind = S.kind;
        if (!layersOf(kind).some(function (L) { return L.name === a.layer; })) {
          KINDS.forEach(function (k) { if (layersOf(k).some(function (L) { return L.name === a.layer; })) kind = k; });
        }
        choose(kind, a.layer);
      };
      li.appendChild(document.createTextNode("alert " + a.kind + ": first in layer "));
      li.appendChild(b);
      li.appendChild(document.createTextNode(" at step " + a.step + " (held at " + a.steps.length + " logged steps)"));
      ul.appendChild(li);
    });
    box.innerHTML = "<h2>Alerts</h2>"; box.appendChild(ul);
  }

  $("epoch").addEventListener("input", function () { S.snap = +this.value; drawHist(); drawHeat(); });
  $("heat").addEventListener("mousemove", heatHover);
  $("heat").addEventListener("mouseleave", function () { $("heat-tip").style.display = "none"; });
  $("heat").addEventListener("click", function (ev) {
    if (!heat) return;
    var rect = this.getBoundingClientRect(), y = (ev.clientY - rect.top) * (this.height / rect.height);
    var r = Math.floor((y - heat.top) / heat.rowH);
    if (r >= 0 && r < heat.rows.length) { S.snap = r; $("epoch").value = r; drawHist(); drawHeat(); }
  });
  document.addEventListener("keydown", function (ev) {
    var L = current(); if (!L || ev.target.tagName === "INPUT") return;
    if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
      S.snap = Math.max(0, Math.min(L.snapshots.length - 1, S.snap + (ev.key === "ArrowRight" ? 1 : -1)));
      $("epoch").value = S.snap; drawHist(); drawHeat();
    }
  });
  drawAlerts();
  var dropped = Object.keys(D.dropped_layers).map(function (k) { return D.dropped_layers[k] + " " + k; });
  $("why").textContent = "Opened on " + (D.open.layer === null ? "nothing" : D.open.kind + " of " + D.open.layer) +
    ": " + D.open.why + "." + (dropped.length ? " Layers left out (cap " + D.caps.layers + " per kind): " + dropped.join(", ") + "." : "");
  choose(D.open.kind || "weights", D.open.layer);
  document.body.dataset.ready = "1";
})();
"""
