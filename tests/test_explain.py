"""The explain job end to end against a real sqlite MLflow store (one small trained model per module)."""

from __future__ import annotations

import base64
import json
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from mlflow_xai.errors import XAIError
from mlflow_xai.jobs.explain import explain_and_log
from mlflow_xai.jobs.train import train_and_log
from tests.conftest import TINY_CONFIG, _isolate, env_for

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as mp:
        uri = _isolate(mp, root)
        cfg = root / "cfg.json"
        cfg.write_text(json.dumps(TINY_CONFIG))
        out = train_and_log(cfg, register_as="diab", alias="champion", monitor=False, quiet=True)
        yield {"uri": uri, "root": root, "run_id": out.run_id, "mp": mp}


def _download(run_id: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def _artifacts(run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in MlflowClient().list_artifacts(run_id, path):
        out |= _artifacts(run_id, f.path) if f.is_dir else {f.path}
    return out


def test_explain_by_alias_logs_every_artifact_and_tags_the_version(trained: dict[str, Any]) -> None:
    client = MlflowClient()
    before = client.get_run(trained["run_id"])
    before_arts = _artifacts(trained["run_id"])
    out = explain_and_log(model_uri="models:/diab@champion", quiet=True)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_xai.role"] == "explain"
    assert run.data.tags["mlflow_xai.source_run_id"] == trained["run_id"]
    assert run.data.tags["mlflow_xai.source_model_uri"] == "models:/diab@champion"
    assert run.info.experiment_id == before.info.experiment_id  # beside the run it explains

    arts = _artifacts(out.run_id)
    linear = ["layers.0", "layers.3", "layers.21"]  # first hidden, second hidden, head
    expected = {"xai/architecture.svg", "xai/architecture.png", "xai/architecture.dot", "xai/summary.json",
                "xai/report.html", "xai/weights/distributions.png", "xai/activations/distributions.png",
                "xai/activations/mean_activations.png", "xai/gradients/distributions.png",
                *(f"xai/weights/{n}.png" for n in linear), *(f"xai/gradients/{n}.png" for n in linear),
                *(f"xai/attributions/{m}.{ext}" for m in ("integrated_gradients", "deep_lift", "gradient_shap",
                                                          "feature_ablation") for ext in ("png", "json")),
                "xai/conductance/layers.19.png", "xai/conductance/last_layer_weights_vs_conductance.png"}
    assert expected <= arts, expected - arts
    for path in arts:
        data = _download(out.run_id, path).read_bytes()
        if path.endswith(".png"):
            assert data.startswith(PNG) and len(data) > 1000, path
        elif path.endswith(".svg"):
            assert b"<svg" in data[:2000]
        elif path.endswith(".json"):
            json.loads(data)
    assert "digraph" in _download(out.run_id, "xai/architecture.dot").read_text()

    summary = json.loads(_download(out.run_id, "xai/summary.json").read_text())
    assert summary["schema_version"] == 1
    assert summary["layers"]["layers.0"]["weight"]["shape"] == [20, 10]
    assert summary["layers"]["layers.0"]["gradient"]["shape"] == [20, 10]
    assert summary["layers"]["layers.1"]["activation"]["dead_share"] is not None  # a ReLU
    assert summary["source"]["run_id"] == trained["run_id"]
    ig = json.loads(_download(out.run_id, "xai/attributions/integrated_gradients.json").read_text())
    assert set(ig["feature_names"]) == {"age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"}
    assert len(ig["ranked"]) == 10 and ig["completeness_error_max"] is not None
    # integrated gradients came with the conductance walk, and the summary says by which rule
    assert "Simpson" in summary["attributions"]["integrated_gradients"]
    assert summary["attributions"]["conductance_layers"]

    html = _download(out.run_id, "xai/report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<link" not in html and "<script src" not in html
    for s in srcs[:3]:
        base64.b64decode(s.split(",", 1)[1], validate=True)
    assert "Feature attributions" in html and "bmi" in html
    assert "Integrated gradients: the path integral by Simpson" in html
    # Each weight and gradient heatmap carries its numbers for the zoom view (20x10: as is).
    heats = {d["path"]: d for d in map(json.loads, re.findall(r'class="heat-data">(.*?)</script>', html))}
    assert {"xai/weights/layers.0.png", "xai/gradients/layers.0.png"} <= {f"xai/{p}" for p in heats}
    w0 = heats["weights/layers.0.png"]
    assert (w0["rows"], w0["cols"], w0["shape"], w0["block"]) == (20, 10, [20, 10], [1, 1])
    assert np.isfinite(np.frombuffer(base64.b64decode(w0["v"]), dtype="<f4")).all()

    for key in ("nan_count", "dead_unit_share", "max_grad_norm"):
        assert key in run.data.metrics
    mv = client.get_model_version("diab", "1")
    assert mv.tags["mlflow_xai.explain_run_id"] == out.run_id
    assert "mlflow_xai.dead_unit_share" in mv.tags

    after = client.get_run(trained["run_id"])  # the train run is never changed
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert _artifacts(trained["run_id"]) == before_arts


def test_explain_defaults_to_the_latest_train_run_and_takes_a_run_id(trained: dict[str, Any]) -> None:
    out = explain_and_log(attributions="none", quiet=True)
    assert out.source.run_id == trained["run_id"]
    assert not any(a.startswith("xai/attributions/") for a in _artifacts(out.run_id))
    out2 = explain_and_log(run_id=trained["run_id"], attributions="deep_lift", batches=2, quiet=True)
    assert out2.summary["data"]["rows"] == 2 * TINY_CONFIG["batch_size"]
    assert list(out2.summary["attributions"]["methods"]) == ["deep_lift"]


def _failed(expect: str, **kwargs: Any) -> mlflow.entities.Run:
    client = MlflowClient()
    with pytest.raises(XAIError, match=expect):
        explain_and_log(quiet=True, **kwargs)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`mlflow_xai.role` = 'explain'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    assert run.info.status == "FAILED"
    assert re.search(expect, run.data.tags["mlflow_xai.error"])
    return run


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"run_id": "0123456789abcdef0123456789abcdef"}, "run '0123456789abcdef0123456789abcdef' was not found"),
        ({"model_uri": "models:/nosuch@champion"}, "registered model 'nosuch' does not exist"),
        ({"model_uri": "models:/diab@nosuch"}, "registered model 'diab' has no alias 'nosuch'"),
        ({"model_uri": "models:/diab/99"}, "registered model 'diab' has no version 99"),
        ({"model_uri": "s3://bucket/model"}, "is not supported; use models:/NAME@ALIAS"),
        ({"experiment": "empty-exp"}, "has no finished train run"),
        ({"attributions": "shapley"}, None),
    ],
)
def test_bad_source_fails_the_run_with_one_line(trained: dict[str, Any], kwargs: dict, expect: str | None) -> None:
    if expect is None:  # a bad option is refused before any run starts
        with pytest.raises(XAIError, match="attribution method 'shapley' is not supported"):
            explain_and_log(quiet=True, **kwargs)
        return
    if kwargs.get("experiment"):
        mlflow.set_experiment("empty-exp")
    _failed(expect, **kwargs)


def test_a_figure_that_fails_on_the_drawing_thread_fails_the_run_with_its_line(
        trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures are drawn on the painter's thread: its error still ends the run FAILED, and the thread draws on."""
    import mlflow_xai.figures.layers as layers

    def broken(name: str, *a: Any, **kw: Any) -> Any:
        raise XAIError(f"cannot draw {name}: the figure failed on purpose")

    monkeypatch.setattr(layers, "heatmap", broken)
    run = _failed(r"cannot draw layers\.0 weight: the figure failed on purpose", run_id=trained["run_id"],
                  attributions="none")
    assert not {a for a in _artifacts(run.info.run_id) if a.startswith("xai/")}  # nothing half-logged
    monkeypatch.undo()
    again = explain_and_log(run_id=trained["run_id"], attributions="none", quiet=True)  # the same thread draws
    assert {"xai/weights/layers.0.png", "xai/report.html"} <= _artifacts(again.run_id)


def _fake_train_run(ckpt_bytes: bytes | None, sha: str | None) -> str:
    """A run tagged as a train run whose checkpoint is whatever the test wants."""
    mlflow.set_experiment("forged")
    with mlflow.start_run() as run:
        mlflow.set_tag("mlflow_xai.role", "train")
        if sha:
            mlflow.set_tag("mlflow_xai.checkpoint_sha256", sha)
        if ckpt_bytes is not None:
            tmp = Path(mlflow.get_artifact_uri().replace("file://", "")).parent / "upload"
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "last.ckpt").write_bytes(ckpt_bytes)
            mlflow.log_artifact(str(tmp / "last.ckpt"), "checkpoints")
    return run.info.run_id


def test_run_without_checkpoint(trained: dict[str, Any]) -> None:
    rid = _fake_train_run(None, None)
    _failed("has no checkpoints/last.ckpt artifact", run_id=rid)


def test_tampered_checkpoint_is_refused(trained: dict[str, Any]) -> None:
    good = _download(trained["run_id"], "checkpoints/last.ckpt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["net.layers.0.weight"] += 1.0
    buf = good.parent / "tampered.ckpt"
    torch.save(ckpt, buf)
    rid = _fake_train_run(buf.read_bytes(), sha256_file(good))  # the recorded sha is the original's
    _failed("does not match its recorded sha256", run_id=rid)


class _Payload:
    """Unpickling this would run code: it creates a marker file."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(trained: dict[str, Any], tmp_path: Path) -> None:
    good = _download(trained["run_id"], "checkpoints/last.ckpt")
    ckpt = torch.load(good, weights_only=True)
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    ckpt["mlflow_xai"]["extra"] = payload
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path, pickle_module=pickle)
    rid = _fake_train_run(path.read_bytes(), sha256_file(path))  # checksum matches: weights_only must refuse
    _failed("holds pickled objects that would need code to load", run_id=rid)
    assert not (tmp_path / "pwned").exists()


def test_cli_explain_prints_run_and_report_and_one_line_errors(trained: dict[str, Any]) -> None:
    root = trained["root"]
    env = env_for(trained["uri"], root / "work")
    ok = subprocess.run([sys.executable, "-m", "mlflow_xai", "explain", "--quiet", "--attributions", "none",
                         "--run-id", trained["run_id"]], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"explain run: [0-9a-f]{32}", ok.stdout) and "xai/report.html" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mlflow_xai", "explain", "--quiet", "--model-uri", "models:/diab/42"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["mlflow-xai: error: registered model 'diab' has no version 42; "
                                               "see its versions and aliases in the MLflow UI"]


def test_csv_classifier_train_and_explain_carry_the_column_names(trained: dict[str, Any]) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 120
    df = pd.DataFrame({"petal": rng.normal(size=n), "sepal": rng.normal(size=n), "stem": rng.normal(size=n)})
    df["kind"] = np.where(df["petal"] + 0.5 * df["sepal"] > 0, "wide", "narrow")
    path = trained["root"] / "flowers.csv"
    df.to_csv(path, index=False)
    cfg = trained["root"] / "cls.json"
    cfg.write_text(json.dumps({"l1": 2, "epochs": 2, "batch_size": 16}))
    tr = train_and_log(cfg, data=str(path), target="kind", experiment="flowers", monitor=False, quiet=True)
    train_run = MlflowClient().get_run(tr.run_id)
    assert train_run.data.params["task"] == "classification"
    assert {"test_accuracy", "test_f1"} <= set(train_run.data.metrics)
    out = explain_and_log(run_id=tr.run_id, attributions="deep_lift,feature_ablation", quiet=True)
    dl = json.loads(_download(out.run_id, "xai/attributions/deep_lift.json").read_text())
    assert dl["feature_names"] == ["petal", "sepal", "stem"]
    # the label depends on petal and sepal only, so stem should not lead
    assert dl["ranked"][0][0] in ("petal", "sepal")
    assert out.summary["data"]["task"] == "classification" and out.summary["loss"] is not None
    assert out.summary["layers"]["layers.0"]["gradient"] is not None
