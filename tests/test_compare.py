"""The compare job on a real sqlite store (the registry study's two versions), and its pure computation."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from torch import nn

import mlflow_xai
from mlflow_xai.checkpoint import load_checkpoint, sha256_file
from mlflow_xai.cli import main
from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.compare import prediction_shift, weight_drift
from tests.conftest import _isolate

PNG = b"\x89PNG\r\n\x1a\n"


def _written_train_run(root: Path, hidden: tuple[int, ...]) -> str:
    """A train-run-like run whose checkpoint is written directly (another architecture, no training)."""
    from mlflow_xai.config import TunedConfig
    from mlflow_xai.data import load_dataset, split_dataset
    from mlflow_xai.nets import MLP, NET_PREFIX
    from mlflow_xai.train import checkpoint_meta

    cfg = TunedConfig(hidden_sizes=hidden)
    ds = load_dataset("diabetes")
    torch.manual_seed(1)
    net = MLP(cfg, 10, 1)
    path = root / "other" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {NET_PREFIX + k: v for k, v in net.state_dict().items()},
                "mlflow_xai": checkpoint_meta(cfg, ds, split_dataset(ds), "diabetes")}, path)
    mlflow.set_experiment("other")
    with mlflow.start_run() as run:
        mlflow.set_tags({"mlflow_xai.role": "train", "mlflow_xai.checkpoint_sha256": sha256_file(path)})
        mlflow.log_artifact(str(path), "checkpoints")
    return run.info.run_id


@pytest.fixture(scope="module")
def study(registry_study: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, registry_study["root"])
        other = _written_train_run(registry_study["root"], (8,))
        yield {**registry_study, "other": other}


def _compare_cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["compare", "--quiet", *args])


def _run_of(output: str) -> Any:
    m = re.search(r"compare run: ([0-9a-f]{32})", output)
    assert m, output
    return MlflowClient().get_run(m[1])


def _artifacts(run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in MlflowClient().list_artifacts(run_id, path):
        out |= _artifacts(run_id, f.path) if f.is_dir else {f.path}
    return out


def _download(run_id: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def _checkpoint(run_id: str) -> Any:
    return load_checkpoint(_download(run_id, "checkpoints/last.ckpt"))


def test_compare_two_versions_of_one_architecture(study: dict[str, Any]) -> None:
    result = _compare_cli("models:/reg@champion", "models:/reg/2", "--fail-above", "1000", "--rows", "40")
    assert result.exit_code == 0, result.output + result.stderr
    run = _run_of(result.output)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["mlflow_xai.role"] == "compare"
    assert (tags["mlflow_xai.compare_a"], tags["mlflow_xai.compare_b"]) == ("models:/reg@champion", "models:/reg/2")
    assert tags["mlflow_xai.compare_a_run_id"] == study["v1"].run_id
    assert tags["mlflow_xai.compare_b_run_id"] == study["v2"].run_id
    assert tags["mlflow_xai.compare_gate"] == "passed"
    assert run.info.experiment_id == MlflowClient().get_run(study["v2"].run_id).info.experiment_id

    linear = ["layers.0", "layers.3", "layers.6", "layers.9", "layers.12", "layers.15", "layers.18", "layers.21"]
    arts = _artifacts(run.info.run_id)
    expected = {"xai/compare/compare.json", "xai/compare/report.html", "xai/compare/predictions.png",
                "xai/compare/weights/drift.png", "xai/compare/weights/distributions.png",
                "xai/compare/activations/shift.png", "xai/compare/activations/distributions.png",
                *(f"xai/compare/weights/{n}.png" for n in linear)}
    assert expected == arts, arts ^ expected
    for path in arts:
        if path.endswith(".png"):
            data = _download(run.info.run_id, path).read_bytes()
            assert data.startswith(PNG) and len(data) > 1000, path

    data = json.loads(_download(run.info.run_id, "xai/compare/compare.json").read_text())
    assert data["schema_version"] == 1 and list(data["weights"]) == linear
    assert data["only_in_a"] == data["only_in_b"] == [] and data["shape_mismatch"] == {}
    assert (data["a"]["version"], data["b"]["version"]) == ("1", "2")
    # The numbers equal a direct computation from the two checkpoints.
    a, b = _checkpoint(study["v1"].run_id), _checkpoint(study["v2"].run_id)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    drifts = {}
    for name in linear:
        wa, wb = sa[f"{name}.weight"].double(), sb[f"{name}.weight"].double()
        drifts[name] = float(torch.linalg.vector_norm(wb - wa) / torch.linalg.vector_norm(wa))
        entry = data["weights"][name]
        assert entry["relative_l2"] == pytest.approx(drifts[name], rel=1e-6), name
        assert entry["max_abs_diff"] == pytest.approx(float((wb - wa).abs().max()), rel=1e-6)
        ba, bb = sa[f"{name}.bias"].double(), sb[f"{name}.bias"].double()
        assert entry["bias_relative_l2"] == pytest.approx(float(torch.linalg.vector_norm(bb - ba)
                                                                / torch.linalg.vector_norm(ba)), rel=1e-6)
        assert entry["shape"] == list(wa.shape)
    top = max(drifts, key=drifts.__getitem__)
    assert data["max_drift"]["layer"] == top and data["max_drift"]["value"] == pytest.approx(drifts[top], rel=1e-6)
    assert run.data.metrics["max_weight_drift"] == pytest.approx(drifts[top], rel=1e-6)
    assert run.data.metrics["weight_drift/layers.0"] == pytest.approx(drifts["layers.0"], rel=1e-6)

    # Activations and predictions on the same 40 test rows, each model with its own standardization.
    from mlflow_xai.data import load_dataset, split_dataset

    split = split_dataset(load_dataset("diabetes"))
    x = torch.as_tensor(split.X_test[:40])
    with torch.no_grad():
        hidden_a, hidden_b = a.model.layers[:2](x), b.model.layers[:2](x)
        pa = a.model(x).squeeze(-1).double() * a.meta.target_std + a.meta.target_mean
        pb = b.model(x).squeeze(-1).double() * b.meta.target_std + b.meta.target_mean
    act = data["activations"]["layers.1"]  # the first ReLU
    assert act["relative_l2"] == pytest.approx(float(torch.linalg.vector_norm((hidden_b - hidden_a).double())
                                                     / torch.linalg.vector_norm(hidden_a.double())), rel=1e-5)
    assert act["dead_share_a"] is not None and "layers.2" not in data["activations"]  # no dropout entries
    preds = data["predictions"]
    assert preds["rows"] == 40 and preds["task"] == "regression"
    assert preds["rmse_diff"] == pytest.approx(float(torch.sqrt(((pb - pa) ** 2).mean())), rel=1e-5)
    assert preds["max_abs_diff"] == pytest.approx(float((pb - pa).abs().max()), rel=1e-5)

    html = _download(run.info.run_id, "xai/compare/report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(expected) - 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    base64.b64decode(srcs[0].split(",", 1)[1], validate=True)
    assert "<link" not in html and "<script" not in html and "layers.21" in html and "models:/reg@champion" in html


def test_fail_above_exits_1_naming_the_layer(study: dict[str, Any]) -> None:
    result = _compare_cli(study["v1"].run_id, study["v2"].run_id, "--fail-above", "0.0001", "--rows", "16")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"mlflow-xai: drift gate failed: layer layers\.\d+ drifted [\d.e+-]+ > "
                                        r"--fail-above 0.0001", lines[0]), result.stderr
    run = _run_of(result.output)
    assert run.info.status == "FINISHED"  # the comparison itself succeeded
    assert run.data.tags["mlflow_xai.compare_gate"] == "failed"
    assert run.data.tags["mlflow_xai.max_drift_layer"] in lines[0]


def test_different_architectures_compare_by_predictions(study: dict[str, Any]) -> None:
    result = _compare_cli(study["v1"].run_id, study["other"], "--rows", "16", "--fail-above", "0.5")
    assert result.exit_code == 1 and "share no layer of the same shape" in result.stderr, result.stderr
    assert "no layer in common: compared by predictions only" in result.output
    run = _run_of(result.output)
    data = json.loads(_download(run.info.run_id, "xai/compare/compare.json").read_text())
    assert data["weights"] == {} and data["max_drift"] is None
    assert data["shape_mismatch"] == {"layers.0": {"a": [20, 10], "b": [8, 10]},
                                      "layers.3": {"a": [10, 20], "b": [1, 8]}}
    assert "layers.21" in data["only_in_a"] and data["only_in_b"] == []
    assert data["predictions"]["rows"] == 16 and data["predictions"]["rmse_diff"] > 0
    assert "xai/compare/predictions.png" in _artifacts(run.info.run_id)
    assert "max_weight_drift" not in run.data.metrics and "prediction_rmse_diff" in run.data.metrics


@pytest.mark.parametrize(
    ("a", "b", "needle"),
    [
        ("models:/reg@nosuch", "models:/reg/1", "registered model 'reg' has no alias 'nosuch'"),
        ("models:/reg/1", "models:/nosuch/1", "registered model 'nosuch' does not exist"),
        ("0123456789abcdef0123456789abcdef", "models:/reg/1", "run '0123456789abcdef0123456789abcdef' was not found"),
        ("s3://bucket/model", "models:/reg/1", "is not supported; use models:/NAME@ALIAS"),
        ("TRIAL", "models:/reg/1", "has no checkpoints/last.ckpt artifact"),
    ],
)
def test_bad_side_one_line_and_failed_run(study: dict[str, Any], a: str, b: str, needle: str) -> None:
    a = study["trials"][0] if a == "TRIAL" else a
    result = _compare_cli(a, b)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-xai: error:") and needle in lines[0], result.stderr
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.`mlflow_xai.role` = 'compare'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FAILED" and needle in run.data.tags["mlflow_xai.error"]


def test_bad_threshold_is_refused_before_any_run(study: dict[str, Any]) -> None:
    result = _compare_cli("models:/reg/1", "models:/reg/2", "--fail-above", "-1")
    assert result.exit_code == 2 and "use a drift >= 0" in result.output + result.stderr


# --------------------------------------------------------------------------- pure computation
def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_weight_drift_exact_values_and_unmatched_layers() -> None:
    a = nn.Sequential(_linear([[3.0, 0.0], [0.0, 4.0]], [1.0, 0.0]), nn.ReLU(), _linear([[1.0, 1.0]], [0.0]))
    b = nn.Sequential(_linear([[3.0, 0.0], [0.0, 1.0]], [1.0, 0.0]), nn.ReLU(), _linear([[1.0, 1.0, 1.0]], [0.0]),
                      _linear([[2.0]], [0.0]))
    drifts, only_a, only_b, mismatched = weight_drift(a, b, bins=4)
    assert list(drifts) == ["0"] and only_a == () and only_b == ("3",)
    assert mismatched == {"2": ((1, 2), (1, 3))}
    d = drifts["0"]
    assert d.relative_l2 == pytest.approx(3.0 / 5.0) and d.diff_l2 == pytest.approx(3.0)
    assert d.max_abs_diff == 3.0 and d.bias_relative_l2 == 0.0
    np.testing.assert_array_equal(d.diff, [[0.0, 0.0], [0.0, -3.0]])
    np.testing.assert_array_equal(d.hist_a.edges, d.hist_b.edges)  # shared bins
    assert d.hist_a.edges[0] == 0.0 and d.hist_a.edges[-1] == 4.0
    assert d.hist_a.counts.sum() == d.hist_b.counts.sum() == 4


def test_compare_activations_predictions_and_training_flags() -> None:
    a = nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), nn.ReLU(), nn.Dropout(0.5),
                      _linear([[1.0, 1.0]], [0.0]))
    b = nn.Sequential(_linear([[2.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), nn.ReLU(), nn.Dropout(0.5),
                      _linear([[1.0, 1.0]], [0.0]))
    a.train()
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    cmp = mlflow_xai.compare(a, b, x)  # the top-level name of mlflow_xai.inspect.compare.compare
    assert isinstance(cmp, mlflow_xai.Comparison)
    assert a.training and all(m.training for m in a.modules())  # flags restored
    assert "2" not in cmp.activations  # dropout is the identity in eval mode
    relu = cmp.activations["1"]
    # act_a = [[1,1],[2,0]], act_b = [[2,1],[4,0]]: ||diff|| = sqrt(1+4), ||act_a|| = sqrt(6)
    assert relu.relative_l2 == pytest.approx(math.sqrt(5 / 6))
    assert relu.dead_share_a == 0.0 and relu.mean_shift == pytest.approx(0.75)
    # Sorted values: [0,1,1,2] vs [0,1,2,4]: W1 = (0+0+1+2)/4
    assert relu.wasserstein == pytest.approx(0.75)
    p = cmp.predictions
    assert p is not None
    np.testing.assert_allclose(p.pred_a, [2.0, 2.0])
    np.testing.assert_allclose(p.pred_b, [3.0, 4.0])
    assert (p.mean_abs_diff, p.max_abs_diff) == (1.5, 2.0) and p.rmse_diff == pytest.approx(math.sqrt(2.5))
    assert cmp.max_drift == ("0", pytest.approx(1 / math.sqrt(2)))


def test_prediction_shift_classification_and_shape_mismatch() -> None:
    la = np.array([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    lb = np.array([[2.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    s = prediction_shift(la, lb, "classification")
    assert s.agreement == pytest.approx(2 / 3) and s.mean_abs_diff > 0
    with pytest.raises(XAIError, match="outputs of different shapes"):
        prediction_shift(np.zeros((3, 1)), np.zeros((3, 2)))


def test_weight_drift_max_abs_diff_over_finite_values() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
        b.weight.copy_(torch.tensor([[1.5, -2.0, 3.0], [0.0, 0.25, 0.0]]))
    drift, *_ = weight_drift(nn.Sequential(a), nn.Sequential(b))
    assert drift["0"].max_abs_diff == 4.0  # |-2 - 2|: the negative side counts
    with torch.no_grad():
        b.weight[1, 2] = float("nan")
        b.weight[1, 0] = float("inf")
    drift, *_ = weight_drift(nn.Sequential(a), nn.Sequential(b))
    assert drift["0"].max_abs_diff == 4.0 and math.isnan(drift["0"].diff_l2)
    with torch.no_grad():
        b.weight.fill_(float("nan"))
    drift, *_ = weight_drift(nn.Sequential(a), nn.Sequential(b))
    assert math.isnan(drift["0"].max_abs_diff)
