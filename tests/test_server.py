"""train -> explain over HTTP: the CLI against a real ``mlflow server`` (sqlite backend, proxied artifacts).

The same contract as the local tests (test_train.py, test_explain.py), checked through
the REST API and the server's artifact proxy. The server and the one train + explain
come from the session fixtures in tests/mlflow_server.py.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from tests.conftest import TINY_CONFIG
from tests.mlflow_server import MlflowServer, snapshot, use_server

pytestmark = pytest.mark.server

PNG = b"\x89PNG\r\n\x1a\n"
LINEAR = ["layers.0", "layers.3", "layers.21"]  # first hidden, second hidden, head (l1=1 on 10 inputs)


def _download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=uri))


def test_train_over_http_logs_the_contract(mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    rid = served["train_run_id"]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_xai.role"] == "train"
    for key, value in TINY_CONFIG.items():
        assert run.data.params[key] == str(value)
    assert run.data.params["data"] == "diabetes" and run.data.params["task"] == "regression"
    for key in ("train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(rid, key)]
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= TINY_CONFIG["epochs"]  # once per epoch
    assert {"test_loss", "test_rmse", "test_mae", "test_r2", "epochs_run"} <= set(run.data.metrics)
    assert any(k.startswith("weight_norm/") for k in run.data.metrics)  # the XAIMonitor, over HTTP too

    arts = served["train_before"]["artifacts"]
    assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= arts
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in arts)
    local = _download(mlflow_server.uri, rid, "checkpoints/last.ckpt", tmp_path)
    assert run.data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(local)
    # The server proxied the upload into its own artifact destination.
    stored = list(mlflow_server.artifacts.rglob(f"{rid}/artifacts/checkpoints/last.ckpt"))
    assert len(stored) == 1 and sha256_file(stored[0]) == sha256_file(local)

    mv = client.get_model_version_by_alias("served", "champion")
    assert mv.run_id == rid
    assert "see it: open http://127.0.0.1:" in served["train_out"].stdout


def test_explain_over_http_logs_every_artifact_and_leaves_the_train_run(
        mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    rid = served["explain_run_id"]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_xai.role"] == "explain"
    assert run.data.tags["mlflow_xai.source_run_id"] == served["train_run_id"]
    assert run.data.tags["mlflow_xai.source_model_uri"] == "models:/served@champion"
    assert {"nan_count", "dead_unit_share", "max_grad_norm", "ig_completeness_error_max"} <= set(run.data.metrics)

    arts = snapshot(client, rid)["artifacts"]
    expected = {"xai/architecture.dot", "xai/summary.json", "xai/report.html", "xai/weights/distributions.png",
                "xai/activations/distributions.png", "xai/activations/mean_activations.png",
                "xai/gradients/distributions.png", "xai/conductance/conductance.json",
                *(f"xai/weights/{n}.png" for n in LINEAR), *(f"xai/gradients/{n}.png" for n in LINEAR),
                *(f"xai/attributions/{m}.{ext}" for m in ("integrated_gradients", "deep_lift", "gradient_shap",
                                                          "feature_ablation") for ext in ("png", "json"))}
    assert expected <= arts, expected - arts
    xai = _download(mlflow_server.uri, rid, "xai", tmp_path)
    for path in arts:
        data = (xai.parent / path).read_bytes()
        if path.endswith(".png"):
            assert data.startswith(PNG) and len(data) > 1000, path
        elif path.endswith(".json"):
            json.loads(data)
    summary = json.loads((xai / "summary.json").read_text())
    assert summary["source"]["run_id"] == served["train_run_id"]
    assert summary["source"]["registered_model"] == "served"
    assert summary["layers"]["layers.0"]["weight"]["shape"] == [20, 10]
    html = (xai / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    base64.b64decode(srcs[0].split(",", 1)[1], validate=True)

    mv = client.get_model_version_by_alias("served", "champion")
    assert mv.tags["mlflow_xai.explain_run_id"] == rid
    # The train run is never changed by an explanation.
    assert snapshot(client, served["train_run_id"]) == served["train_before"]


def test_compare_over_http(mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow-xai compare`` (issue 6) through the server: in-process through click, to spare an import."""
    from click.testing import CliRunner

    from mlflow_xai.cli import main

    use_server(monkeypatch, mlflow_server.uri, tmp_path)
    result = CliRunner().invoke(main, ["compare", "--quiet", "--rows", "32", served["train_run_id"],
                                       "models:/served@champion"])
    assert result.exit_code == 0, result.output
    match = re.search(r"compare run: ([0-9a-f]{32})", result.stdout)
    assert match, result.stdout
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(match[1])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_xai.role"] == "compare"
    arts = snapshot(client, match[1])["artifacts"]
    assert {"xai/compare/report.html", "xai/compare/compare.json"} <= arts
    assert snapshot(client, served["train_run_id"]) == served["train_before"]


def test_cli_errors_over_http_are_one_line(mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process through click (the subprocess path is the ``served`` fixture's)."""
    from click.testing import CliRunner

    from mlflow_xai.cli import main

    use_server(monkeypatch, mlflow_server.uri, tmp_path)
    bad = CliRunner().invoke(main, ["explain", "--quiet", "--model-uri", "models:/served/42"])
    assert bad.exit_code == 2, bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit)  # no traceback
    assert bad.stderr.strip().splitlines() == ["mlflow-xai: error: registered model 'served' has no version 42; "
                                               "see its versions and aliases in the MLflow UI"]
    client = MlflowClient(mlflow_server.uri)
    failed = client.search_runs([client.get_run(served["train_run_id"]).info.experiment_id],
                                filter_string="tags.`mlflow_xai.role` = 'explain' and attributes.status = 'FAILED'")
    assert any("has no version 42" in r.data.tags.get("mlflow_xai.error", "") for r in failed)


def test_concurrent_explains_each_log_their_own_complete_run(mlflow_server: MlflowServer,
                                                             served: dict[str, Any]) -> None:
    """Three explain processes started at once on the same train run (the ``served`` fixture)."""
    client = MlflowClient(mlflow_server.uri)
    ids = served["explain_run_ids"]
    assert len(set(ids)) == len(ids) == 3
    listings = []
    for rid in ids:
        run = client.get_run(rid)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow_xai.source_run_id"] == served["train_run_id"]
        assert {"nan_count", "max_grad_norm"} <= set(run.data.metrics)
        listings.append(snapshot(client, rid)["artifacts"])
    # Each one complete, none mixed into another (the first also has the attributions).
    assert listings[1] == listings[2] and listings[1] < listings[0]
    assert listings[0] - listings[1] == {a for a in listings[0] if a.startswith(("xai/attributions/",
                                                                                  "xai/conductance/"))}
    assert "xai/report.html" in listings[1] and len(listings[1]) > 20
    assert snapshot(client, served["train_run_id"]) == served["train_before"]
