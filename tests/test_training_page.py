"""Tests of mlflow_xai.reports.training and of the page XAIMonitor writes at the end of a fit.

The page's data is checked by decoding its JSON blob exactly as the page's script does
(base64 -> uint8 / float32); the browser side is in tests/test_ui.py. A real MLflow
sqlite store in a temporary folder holds the runs.
"""

from __future__ import annotations

import base64
import json
import math
import re
import warnings
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mlflow_xai.monitor import HISTOGRAM_BINS, TRAINING_PAGE_PATH, XAIMonitor
from mlflow_xai.reports.training import (
    PAGE_MAX_LAYERS,
    PAGE_MAX_POINTS,
    PAGE_MAX_SNAPSHOTS,
    TrainingRecord,
    opening_view,
    page_data,
    render_training_page,
)
from tests.test_monitor import TinyNet, loader

BINS = HISTOGRAM_BINS


def blob(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="xai-data">(.*?)</script>', html, re.S)
    assert found, "no data blob in the page"
    return json.loads(found.group(1))


def counts(layer: dict, bins: int) -> np.ndarray:
    """The page's decoding: q / 255 * peak per row."""
    q = np.frombuffer(base64.b64decode(layer["q"]), dtype=np.uint8).reshape(-1, bins)
    return q / 255.0 * np.array(layer["peak"])[:, None]


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def row(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """A histogram row as the monitor lays it out: counts, min, max, n, sum, sum sq, numel."""
    c, edges = np.histogram(values, bins=bins)
    return np.concatenate([c, [values.min(), values.max(), values.size, values.sum(), (values**2).sum(),
                               values.size]]).astype(np.float64)


def synthetic(layers: int, epochs: int, steps_per_epoch: int = 14, seed: int = 0) -> TrainingRecord:
    """A record shaped as a long fit of a deep network would leave it."""
    rng = np.random.default_rng(seed)
    r = TrainingRecord(bins=BINS, title="synthetic", run_id="r1")
    names = [f"layers.{2 * i}" for i in range(layers)]
    for e in range(epochs):
        step = (e + 1) * steps_per_epoch
        kinds = {kind: (names, np.stack([row(rng.normal(0, 1 + e / epochs, 500)) for _ in names]))
                 for kind in ("weights", "gradients", "activations")}
        r.add_histograms(e, step, kinds)
        for n in names:
            r.add_metrics(step, {f"weight_norm/{n}": 1 + e, f"grad_norm/{n}": 1 / (1 + e),
                                 f"update_ratio/{n}": 1e-3, f"act_mean/{n}": 0.1, f"act_std/{n}": 1.0,
                                 f"dead_share/{n}": 0.0})
        r.add_loss("train_loss", e, step, 1 / (1 + e))
        r.add_loss("val_loss", e, step, 1.1 / (1 + e))
    return r


def test_blob_decodes_to_the_recorded_histograms_and_curves() -> None:
    rng = np.random.default_rng(1)
    r = TrainingRecord(bins=BINS, run_id="abc")
    rows = {e: np.stack([row(rng.normal(e, 1, 1000)), row(rng.uniform(-1, 1, 300))]) for e in range(3)}
    for e, rs in rows.items():
        r.add_histograms(e, 10 * e, {"weights": (["a", "b<1>"], rs)})
        r.add_metrics(10 * e, {"grad_norm/a": 0.5 + e, "alert/dead_units": 1.0})
    r.add_metrics(5, {"grad_norm/a": 7.0})
    r.add_alert("dead_units", "b<1>", 10)
    data = blob(render_training_page(r))
    assert data["epochs"] == [0, 1, 2] and data["steps"] == [0, 10, 20] and data["bins"] == BINS
    for i, layer in enumerate(data["kinds"]["weights"]["layers"]):
        assert layer["name"] == ["a", "b<1>"][i]
        decoded = counts(layer, BINS)
        for e in range(3):
            want = rows[e][i]
            # One byte per bin scaled to the row's peak: within half a level of the peak.
            assert np.allclose(decoded[e], want[:BINS], atol=want[:BINS].max() / 255 / 2 + 1e-9)
            assert ((decoded[e] > 0) == (want[:BINS] > 0)).all()  # no bin rounded away
            # Statistics to 6 significant digits: what the page shows.
            assert math.isclose(layer["lo"][e], want[BINS], rel_tol=1e-5)
            assert math.isclose(layer["hi"][e], want[BINS + 1], rel_tol=1e-5)
            assert layer["n"][e] == want[BINS + 2] and layer["numel"][e] == want[BINS + 5]
            assert math.isclose(layer["mean"][e], want[BINS + 3] / want[BINS + 2], rel_tol=1e-5, abs_tol=1e-12)
    curve = data["curves"]["grad_norm"]
    assert curve["steps"] == [0, 5, 10, 20]
    assert floats(curve["series"]["a"]).tolist() == [0.5, 7.0, 1.5, 2.5]
    assert data["alerts"] == [{"kind": "dead_units", "layer": "b<1>", "step": 10, "steps": [0, 10, 20]}]
    assert data["open"]["layer"] == "b<1>" and data["open"]["kind"] == "weights"


def test_layer_names_cannot_break_out_of_the_blob() -> None:
    r = TrainingRecord(bins=BINS, title="t </script><b>")
    evil = "</script><script>alert(1)</script>"
    r.add_histograms(0, 0, {"weights": ([evil], np.stack([row(np.arange(10.0))]))})
    html = render_training_page(r)
    assert html.count("</script>") == 2  # the blob's and the script's own
    assert "<script>alert(1)" not in html and "<b>" not in html.split("<body>")[1]
    assert blob(html)["kinds"]["weights"]["layers"][0]["name"] == evil


def test_page_requests_nothing() -> None:
    html = render_training_page(synthetic(layers=3, epochs=5))
    lowered = html.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", lowered)
    assert "http://" not in lowered and "https://" not in lowered
    for call in ("fetch(", "xmlhttprequest", "websocket", "import(", "<link", "url(", "sendbeacon", "<iframe"):
        assert call not in lowered, call


def test_cookbook_sized_page_stays_under_two_megabytes() -> None:
    # l1=256 changes widths, not depth: 8 weight layers, 7 ReLUs; the caps bound the rest.
    # 500 epochs of 14 steps each, every epoch recorded: the page keeps its caps.
    r = synthetic(layers=8, epochs=500)
    data = page_data(r)
    assert len(data["epochs"]) == PAGE_MAX_SNAPSHOTS and data["epochs"][0] == 0 and data["epochs"][-1] == 499
    assert all(len(c["steps"]) == PAGE_MAX_POINTS for c in data["curves"].values())
    size = len(render_training_page(r).encode())
    assert size < 2_000_000, size


def test_page_at_every_cap_stays_under_two_megabytes() -> None:
    r = synthetic(layers=PAGE_MAX_LAYERS, epochs=2 * PAGE_MAX_SNAPSHOTS, steps_per_epoch=20)
    size = len(render_training_page(r).encode())
    assert size < 2_000_000, size


def test_deep_network_keeps_the_layers_that_moved_most() -> None:
    r = synthetic(layers=PAGE_MAX_LAYERS + 6, epochs=4)
    moved = "layers.20"
    for _, entries in [(k, v) for k, v in r.histograms["weights"].items() if k == moved]:
        entries[-1][1][BINS + 3] = 50.0 * entries[-1][1][BINS + 2]  # its mean jumps to 50
    data = page_data(r)
    names = [la["name"] for la in data["kinds"]["weights"]["layers"]]
    assert len(names) == PAGE_MAX_LAYERS and moved in names
    assert data["dropped_layers"]["weights"] == 6
    assert len(render_training_page(r).encode()) < 2_000_000
    assert opening_view(r)["layer"] == moved


def test_a_long_unbounded_fit_keeps_a_bounded_record() -> None:
    r = TrainingRecord(bins=4)
    one = {"weights": (["a"], np.array([[1, 0, 0, 0, 0, 1, 1, 0, 0, 1]]))}
    for e in range(1000):
        if e % r.stride == 0:
            r.add_histograms(e, e, one)
    assert len(r.snapshots) <= 2 * PAGE_MAX_SNAPSHOTS + 1 and r.stride > 1
    assert r.snapshots[0][0] == 0 and len(r.histograms["weights"]["a"]) == len(r.snapshots)


def test_opens_on_the_layer_whose_distribution_moved_most() -> None:
    rng = np.random.default_rng(2)
    r = TrainingRecord(bins=BINS)
    for e in range(3):
        still, moving = rng.normal(0, 1, 800), rng.normal(0, 1 + 3 * e, 800)
        r.add_histograms(e, e, {"weights": (["still", "moving"], np.stack([row(still), row(still)])),
                                "activations": (["act"], np.stack([row(moving)]))})
    view = opening_view(r)
    assert (view["kind"], view["layer"]) == ("activations", "act") and "moved most" in view["why"]


# ------------------------------------------------------------- the monitor


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    exp = MlflowClient(uri).create_experiment("page", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    return MlflowClient(uri)


def fit(monitor: XAIMonitor, epochs: int = 4, model: TinyNet | None = None, **kw: object) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with mlflow.start_run() as run:
            L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[monitor],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      **kw).fit(model or TinyNet(), loader())
    return run.info.run_id


def test_monitor_writes_the_page_with_every_epoch_and_layer(client: MlflowClient, tmp_path: Path) -> None:
    rid = fit(XAIMonitor(log_every_n_steps=2, module="net"), epochs=4)
    path = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=TRAINING_PAGE_PATH, dst_path=str(tmp_path))
    data = blob(Path(path).read_text(encoding="utf-8"))
    assert data["run_id"] == rid and data["epochs"] == [0, 1, 2, 3]
    assert data["steps"] == [4, 8, 12, 16]
    names = {k: [la["name"] for la in v["layers"]] for k, v in data["kinds"].items()}
    assert names == {"weights": ["0", "2", "4"], "gradients": ["0", "2", "4"], "activations": ["1", "3"]}
    # The curves are the logged metrics, value for value (float32).
    for family in ("weight_norm", "grad_norm", "update_ratio", "act_mean", "act_std", "dead_share"):
        curve = data["curves"][family]
        for key, b64 in curve["series"].items():
            logged = {m.step: m.value for m in client.get_metric_history(rid, f"{family}/{key}")}
            got = dict(zip(curve["steps"], floats(b64).tolist(), strict=True))
            assert set(logged) <= set(got)
            assert all(math.isclose(got[s], v, rel_tol=1e-6, abs_tol=1e-30) for s, v in logged.items())
    # The weight histogram of the last snapshot is the final weights'.
    model_rows = data["kinds"]["weights"]["layers"][0]
    assert model_rows["n"][-1] == 4 * 8 and model_rows["numel"][-1] == 32


def test_page_records_losses_and_can_be_turned_off(client: MlflowClient) -> None:
    class Logged(TinyNet):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

    rid = fit(XAIMonitor(module="net"), epochs=3, model=Logged())
    html = client.download_artifacts(rid, TRAINING_PAGE_PATH)
    losses = blob(Path(html).read_text(encoding="utf-8"))["losses"]
    assert losses["train_loss"]["epochs"] == [0, 1, 2] and all(v > 0 for v in losses["train_loss"]["values"])
    off = fit(XAIMonitor(module="net", training_page=False), epochs=2)
    assert [a.path for a in client.list_artifacts(off, "xai")] == []


def test_page_after_a_nan_names_the_alert(client: MlflowClient) -> None:
    rid = fit(XAIMonitor(module="net", log_every_n_steps=1, quiet=True), epochs=2, model=TinyNet(nan_at_step=5))
    data = blob(Path(client.download_artifacts(rid, TRAINING_PAGE_PATH)).read_text("utf-8"))
    assert data["alerts"][0]["kind"] == "nan" and data["alerts"][0]["step"] == 5
    assert 5 in data["alerts"][0]["steps"]
    assert data["open"]["layer"] == "2" and "nan" in data["open"]["why"]


def test_bad_training_page_argument_is_a_clear_error() -> None:
    from mlflow_xai.errors import XAIError

    with pytest.raises(XAIError, match="training_page must be True or False"):
        XAIMonitor(training_page="yes")  # type: ignore[arg-type]
