"""Explaining models mlflow-xai did not train: logged by MLflow's own API, in a real sqlite store.

A conv net with batch norm, nested submodules and a module called twice (pt2, dynamic
batch, registered); an MLP exported for one batch size; one exported in training mode;
an MLP fitted in Lightning under ``mlflow.pytorch.autolog()`` (pickle, registered); a
pickle carrying a code payload. Each is explained through the job (and the CLI) and
through ``mlflow.models.evaluate(..., evaluators=["xai"])`` with the installed entry point.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from mlflow_xai.errors import XAIError
from mlflow_xai.jobs.explain import explain_and_log
from tests.conftest import _isolate, env_for
from tests.user_models import LitRegressor, Regressor, SmallConvNet

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["age", "bmi", "bp", "s1", "s2"]


def _logged(model: nn.Module, example: np.ndarray, name: str, registered: str | None = None) -> str:
    with mlflow.start_run(run_name=name) as run:
        info = mlflow.pytorch.log_model(model, name=name, input_example=example, registered_model_name=registered,
                                        pip_requirements=["torch"])
    return info.model_uri if registered is None else run.info.run_id


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("any-model")
    with pytest.MonkeyPatch.context() as mp:
        uri = _isolate(mp, root)
        mlflow.set_experiment("users-models")
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        conv = SmallConvNet().eval()
        # A few steps so that batch norm's running statistics are not the defaults.
        conv.train()
        with torch.no_grad():
            conv(torch.randn(64, 1, 8, 8))
        conv.eval()
        images = rng.normal(size=(24, 1, 8, 8)).astype(np.float32)
        labels = rng.integers(0, 3, size=24)
        np.savez(root / "images.npz", x=images, y=labels)
        conv_run = _logged(conv, images[:4], "convnet", registered="convnet")
        MlflowClient().set_registered_model_alias("convnet", "champion", "1")

        reg = Regressor().eval()
        table = pd.DataFrame(rng.normal(size=(30, 5)).astype(np.float32), columns=FEATURES)
        table["y"] = rng.normal(size=30).astype(np.float32)
        table.to_csv(root / "table.csv", index=False)
        fixed_uri = _logged(reg, table[FEATURES].to_numpy()[:1], "fixed-batch")
        dynamic_uri = _logged(reg, table[FEATURES].to_numpy()[:4], "dynamic-batch")
        training_uri = _logged(Regressor().train(), table[FEATURES].to_numpy()[:4], "exported-training")

        # Lightning under autolog: a pickled LightningModule, registered.
        mlflow.pytorch.autolog(registered_model_name="lit", log_every_n_epoch=1, silent=True)
        try:
            import lightning as L

            x = torch.as_tensor(table[FEATURES].to_numpy())
            y = torch.as_tensor(table["y"].to_numpy())
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
            with mlflow.start_run(run_name="lightning") as lit_run:
                L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False).fit(LitRegressor(), loader)
        finally:
            mlflow.pytorch.autolog(disable=True)
        yield {"uri": uri, "root": root, "conv": conv, "conv_run": conv_run, "images": images, "labels": labels,
               "reg": reg, "table": table, "fixed_uri": fixed_uri, "dynamic_uri": dynamic_uri,
               "training_uri": training_uri, "lit_run": lit_run.info.run_id}


def _summary(run_id: str) -> dict[str, Any]:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="xai/summary.json")
    return json.loads(Path(path).read_text())


def _report(run_id: str) -> str:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="xai/report.html")
    return Path(path).read_text()


def _grad_norms(model: nn.Module, x: torch.Tensor, loss_of: Any) -> tuple[float, dict[str, float]]:
    """Plain autograd on the user's own eager module: the reference the explanation must match."""
    params = {n: p for n, p in model.named_parameters() if n.endswith(".weight")}
    loss = loss_of(model(x))
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss), {n[: -len(".weight")]: float(g.norm()) for n, g in zip(params, grads, strict=True)}


def test_pt2_model_keeps_the_users_layer_names_types_weights_and_gradients(zoo: dict[str, Any]) -> None:
    out = explain_and_log(model_uri="models:/convnet@champion", data=str(zoo["root"] / "images.npz"),
                          attributions="none", quiet=True)
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_xai.role"] == "explain"
    summary = _summary(out.run_id)
    layers = summary["layers"]
    assert list(layers) == ["features.0.conv", "features.0.bn", "features.0.act", "features.1", "encoder.fc1",
                            "encoder.fc2", "encoder.act", "encoder.act@1", "head"]
    assert {n: e["module_type"] for n, e in layers.items()} == {
        "features.0.conv": "Conv2d", "features.0.bn": "BatchNorm2d", "features.0.act": "ReLU",
        "features.1": "MaxPool2d", "encoder.fc1": "Linear", "encoder.fc2": "Linear", "encoder.act": "Tanh",
        "encoder.act@1": "Tanh", "head": "Linear"}
    assert summary["meta"]["model_type"] == "SmallConvNet" and summary["meta"]["model_format"] == "pt2"
    assert summary["meta"]["fixed_batch"] is None and summary["data"]["rows"] == 24
    # Weights: the state dict's own numbers.
    state = zoo["conv"].state_dict()
    for name in ("features.0.conv", "features.0.bn", "encoder.fc1", "head"):
        w = state[f"{name}.weight"].double()
        assert layers[name]["weight"]["shape"] == list(w.shape)
        assert layers[name]["weight"]["mean"] == pytest.approx(float(w.mean()), rel=1e-5, abs=1e-7)
        assert layers[name]["weight"]["l2_norm"] == pytest.approx(float(w.norm()), rel=1e-5)
    # Gradients: autograd of the same loss on the same batch through the user's eager module.
    x, y = torch.as_tensor(zoo["images"]), torch.as_tensor(zoo["labels"])
    loss, norms = _grad_norms(zoo["conv"], x, lambda o: nn.functional.cross_entropy(o, y))
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["meta"]["gradient_of"].startswith("loss: cross-entropy")
    for name, norm in norms.items():
        assert layers[name]["gradient"]["l2_norm"] == pytest.approx(norm, rel=1e-4), name
    # The reused module's two calls see different inputs, so their outputs differ.
    assert layers["encoder.act"]["activation"]["mean"] != layers["encoder.act@1"]["activation"]["mean"]
    arts = {f.path for f in MlflowClient().list_artifacts(out.run_id, "xai/weights")}
    assert "xai/weights/features.0.conv.png" in arts and "xai/weights/encoder.fc1.png" in arts
    # The registry version leads to its explanation.
    tags = MlflowClient().get_model_version("convnet", "1").tags
    assert tags["mlflow_xai.explain_run_id"] == out.run_id
    assert tags["mlflow_xai.explain_report"] == f"runs:/{out.run_id}/xai/report.html"
    assert "encoder.act@1" in _report(out.run_id)


def test_fixed_batch_model_runs_in_chunks_and_matches_autograd(zoo: dict[str, Any]) -> None:
    out = explain_and_log(model_uri=zoo["fixed_uri"], data=str(zoo["root"] / "table.csv"), target="y", quiet=True)
    summary = _summary(out.run_id)
    assert summary["meta"]["fixed_batch"] == 1
    assert any("exactly 1 row" in w for w in summary["warnings"])
    assert any("attributions and conductance skipped" in w for w in summary["warnings"])
    assert summary["data"]["feature_names"] == FEATURES and summary["data"]["rows"] == 30
    table = zoo["table"]
    x, y = torch.as_tensor(table[FEATURES].to_numpy()), torch.as_tensor(table["y"].to_numpy())
    loss, norms = _grad_norms(zoo["reg"], x, lambda o: nn.functional.mse_loss(o, y))
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
    for name, norm in norms.items():
        assert summary["layers"][name]["gradient"]["l2_norm"] == pytest.approx(norm, rel=1e-4)
    assert "layers.2" not in summary["layers"]  # dropout, the identity in eval mode, is left out
    assert "exactly 1 row" in _report(out.run_id)


def test_dynamic_batch_regressor_gets_attributions_with_its_column_names(zoo: dict[str, Any]) -> None:
    out = explain_and_log(model_uri=zoo["dynamic_uri"], data=str(zoo["root"] / "table.csv"), target="y",
                          attributions="integrated_gradients,deep_lift", quiet=True)
    summary = _summary(out.run_id)
    attr = summary["attributions"]
    assert set(attr["methods"]) == {"integrated_gradients", "deep_lift"}
    assert set(attr["methods"]["deep_lift"]["top_features"]) <= set(FEATURES)
    assert attr["baseline"] == "mean of the 30 explained rows"
    assert attr["conductance_layers"] == ["layers.1"]
    assert "Simpson" in attr["integrated_gradients"]  # from the conductance walk
    arts = {f.path for f in MlflowClient().list_artifacts(out.run_id, "xai/attributions")}
    assert "xai/attributions/integrated_gradients.png" in arts


def test_without_targets_gradients_are_of_the_output_and_without_data_of_the_example(zoo: dict[str, Any]) -> None:
    out = explain_and_log(model_uri=zoo["dynamic_uri"], attributions="none", quiet=True)
    summary = _summary(out.run_id)
    assert summary["data"]["rows"] == 4 and summary["data"]["data"] == "the logged input example"
    assert any("input example only (4 rows)" in w for w in summary["warnings"])
    assert summary["meta"]["gradient_of"].startswith("output: the sum of the outputs")
    x = torch.as_tensor(zoo["table"][FEATURES].to_numpy()[:4])
    _, norms = _grad_norms(zoo["reg"], x, lambda o: o.sum())
    for name, norm in norms.items():
        assert summary["layers"][name]["gradient"]["l2_norm"] == pytest.approx(norm, rel=1e-4)


def test_model_exported_in_training_mode_is_explained_as_it_is_and_says_so(zoo: dict[str, Any]) -> None:
    out = explain_and_log(model_uri=zoo["training_uri"], data=str(zoo["root"] / "table.csv"), target="y",
                          attributions="none", quiet=True)
    summary = _summary(out.run_id)
    assert summary["meta"]["exported_in_training_mode"] is True
    assert any("exported in training mode" in w for w in summary["warnings"])
    assert "exported in training mode" in _report(out.run_id)


def test_run_id_of_a_run_that_logged_one_model(zoo: dict[str, Any]) -> None:
    out = explain_and_log(run_id=zoo["conv_run"], data=str(zoo["root"] / "images.npz"), attributions="none",
                          quiet=True)
    assert out.source.model_uri.startswith("models:/m-")
    assert MlflowClient().get_run(out.run_id).data.tags["mlflow_xai.source_run_id"] == zoo["conv_run"]


def _failed_explain(expect: str, **kwargs: Any) -> mlflow.entities.Run:
    client = MlflowClient()
    with pytest.raises(XAIError, match=expect) as info:
        explain_and_log(quiet=True, **kwargs)
    assert "\n" not in str(info.value)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             filter_string="tags.`mlflow_xai.role` = 'explain'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FAILED" and re.search(expect, run.data.tags["mlflow_xai.error"])
    return run


def test_pickled_lightning_model_is_refused_without_opt_in_and_explained_with_it(zoo: dict[str, Any]) -> None:
    _failed_explain("is a pickled PyTorch model", model_uri="models:/lit/1", data=str(zoo["root"] / "table.csv"))
    out = explain_and_log(model_uri="models:/lit/1", data=str(zoo["root"] / "table.csv"), target="y",
                          allow_pickle=True, attributions="none", quiet=True)
    summary = _summary(out.run_id)
    assert summary["meta"]["model_format"] == "pickle" and summary["meta"]["model_type"] == "LitRegressor"
    assert list(summary["layers"]) == ["net.0", "net.1", "net.2"]
    assert MlflowClient().get_model_version("lit", "1").tags["mlflow_xai.explain_run_id"] == out.run_id


class _Payload(nn.Module):
    """A module whose unpickling would run code: it creates a marker file."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


def test_code_in_a_pickled_model_never_runs_without_the_opt_in(zoo: dict[str, Any], tmp_path: Path) -> None:
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(payload, name="evil", serialization_format="pickle",
                                        pip_requirements=["torch"])
    assert not (tmp_path / "pwned").exists()
    _failed_explain("is a pickled PyTorch model", model_uri=info.model_uri, data=str(zoo["root"] / "table.csv"))
    assert not (tmp_path / "pwned").exists()
    # The payload is live: with the opt-in, loading runs it (and what it returns is no module).
    _failed_explain("did not load as a torch.nn.Module", model_uri=info.model_uri, data=str(zoo["root"] / "table.csv"),
                    allow_pickle=True)
    assert (tmp_path / "pwned").exists()


def test_pt2_archive_with_a_pickled_record_is_refused_before_anything_runs(zoo: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    import pickle
    import zipfile

    model_dir = Path(mlflow.artifacts.download_artifacts(zoo["dynamic_uri"], dst_path=str(tmp_path / "dl")))
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    torch.save({"x": payload}, evil, pickle_module=pickle)
    original = model_dir / "data" / "model.pt2"
    tampered = tmp_path / "model.pt2"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = evil.read_bytes() if info.filename.endswith("sample_inputs/model.pt") else src.read(info)
            dst.writestr(info, data)
    assert any(n.endswith("sample_inputs/model.pt") for n in zipfile.ZipFile(tampered).namelist())
    tampered.replace(original)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "tampered")
    _failed_explain("holds '.*sample_inputs/model.pt', which is not plain tensors or JSON",
                    model_uri=f"runs:/{run.info.run_id}/tampered", data=str(zoo["root"] / "table.csv"), target="y")
    assert not (tmp_path / "pwned").exists()
    # The payload is live: an unrestricted load of that record runs it.
    torch.load(evil, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_pickled_model_whose_class_is_gone_is_one_line_naming_it(zoo: dict[str, Any], tmp_path: Path) -> None:
    pkg = tmp_path / "gone_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from torch import nn\nclass Net(nn.Linear):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_pkg

        with mlflow.start_run():
            info = mlflow.pytorch.log_model(gone_pkg.Net(5, 1), name="gone", serialization_format="pickle",
                                            pip_requirements=["torch"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_pkg", None)
    _failed_explain("needs 'gone_pkg'", model_uri=info.model_uri, data=str(zoo["root"] / "table.csv"),
                    allow_pickle=True)


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"data": "images.npz"}, "has inputs of shape"),  # a regressor of 5 features fed images
        ({"data": "table.csv"}, "leaves a table's label out"),  # 6 columns: the label was not named
        ({"data": "nosuch.csv"}, "does not exist"),
        ({"data": "table.csv", "target": "nosuch"}, "target column 'nosuch' is not in"),
        ({"target": "y"}, "--target needs --data TABLE"),
    ],
)
def test_bad_data_for_a_users_model_fails_the_run_with_one_line(zoo: dict[str, Any], kwargs: dict[str, str],
                                                               expect: str) -> None:
    if "data" in kwargs:
        kwargs = {**kwargs, "data": str(zoo["root"] / kwargs["data"])}
    _failed_explain(expect, model_uri=zoo["dynamic_uri"], **kwargs)


def test_cli_explains_a_users_model_and_refuses_pickle_in_one_line(zoo: dict[str, Any]) -> None:
    env = env_for(zoo["uri"], zoo["root"] / "work")
    env["PYTHONPATH"] = str(REPO)  # the pickled LightningModule's class: tests.user_models
    ok = subprocess.run([sys.executable, "-m", "mlflow_xai", "explain", "--quiet", "--attributions", "none",
                         "--model-uri", "models:/convnet/1", "--data", str(zoo["root"] / "images.npz")],
                        cwd=zoo["root"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "(explains models:/convnet/1)" in ok.stdout
    # A pt2 model loads without mlflow.pytorch, so Lightning is never imported on that path.
    probe = ("import sys; from mlflow_xai.cli import main\n"
             "try:\n    main(standalone_mode=False)\n"
             "finally:\n    print('lightning imported:', any(m.split('.')[0] in ('lightning', 'pytorch_lightning') "
             "for m in sys.modules))")
    lean = subprocess.run([sys.executable, "-c", probe, "explain", "--quiet", "--attributions", "none",
                           "--model-uri", "models:/convnet/1", "--data", str(zoo["root"] / "images.npz")],
                          cwd=zoo["root"], env=env, capture_output=True, text=True, timeout=300)
    assert lean.returncode == 0, lean.stderr
    assert "lightning imported: False" in lean.stdout
    bad = subprocess.run([sys.executable, "-m", "mlflow_xai", "explain", "--quiet", "--model-uri", "models:/lit/1"],
                         cwd=zoo["root"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("mlflow-xai: error:")]
    assert len(errors) == 1 and "--allow-pickle" in errors[0] and "Traceback" not in bad.stderr


def test_compare_two_versions_of_a_users_model(zoo: dict[str, Any]) -> None:
    from mlflow_xai.jobs.compare import compare_and_log

    tuned = SmallConvNet().eval()
    tuned.load_state_dict(zoo["conv"].state_dict())
    with torch.no_grad():
        tuned.head.weight.mul_(1.5)  # only the head changes
    _logged(tuned, zoo["images"][:4], "convnet", registered="convnet")
    out = compare_and_log("models:/convnet/1", "models:/convnet/2", data=str(zoo["root"] / "images.npz"),
                          fail_above=0.1, quiet=True)
    data = out.data
    assert data["a"]["model_format"] == "pt2" and data["b"]["version"] == "2"
    assert data["weights"]["head"]["relative_l2"] == pytest.approx(0.5, rel=1e-5)
    assert data["weights"]["features.0.conv"]["relative_l2"] == 0.0
    assert data["activations"]["features.0.conv"]["relative_l2"] == 0.0 and data["activations"]["head"]["relative_l2"] > 0
    assert data["data"]["task"] == "classification" and data["predictions"]["rows"] == 24
    assert out.gate_failure is not None and "layer head drifted 0.5" in out.gate_failure


def test_the_xai_evaluator_is_installed_as_an_mlflow_entry_point() -> None:
    found = [ep for ep in entry_points(group="mlflow.model_evaluator") if ep.name == "xai"]
    assert found and found[0].value == "mlflow_xai.evaluator:XAIEvaluator"


def test_mlflow_evaluate_with_xai_beside_default(zoo: dict[str, Any]) -> None:
    data = zoo["table"]
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(zoo["dynamic_uri"], data=data, targets="y", model_type="regressor",
                                        evaluators=["xai", "default"],
                                        evaluator_config={"xai": {"attributions": "integrated_gradients"}})
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    # The default evaluator's numbers and ours, in the run and in the result.
    assert "mean_squared_error" in result.metrics and "nan_count" in result.metrics
    assert metrics["nan_count"] == 0 and "ig_completeness_error_max" in metrics
    # Our batch loss is the MSE of the whole table, as the default evaluator computes it.
    assert result.metrics["batch_loss"] == pytest.approx(result.metrics["mean_squared_error"], rel=1e-5)
    arts = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "xai")}
    assert {"xai/summary.json", "xai/report.html", "xai/architecture.dot"} <= arts
    summary = result.artifacts["xai_summary"].content
    assert summary["data"]["feature_names"] == FEATURES and summary["data"]["rows"] == 30


def test_mlflow_evaluate_with_xai_alone_on_a_classifier(zoo: dict[str, Any]) -> None:
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = zoo["table"][FEATURES].assign(label=np.arange(30) % 3)
    uri = _logged(clf, data[FEATURES].to_numpy()[:4], "classifier")
    with mlflow.start_run():
        result = mlflow.models.evaluate(uri, data=data, targets="label", model_type="classifier",
                                        evaluators=["xai"], evaluator_config={"xai": {"attributions": "none"}})
    summary = result.artifacts["xai_summary"].content
    assert summary["data"]["task"] == "classification"
    assert summary["meta"]["gradient_of"].startswith("loss: cross-entropy")
    x, y = torch.as_tensor(data[FEATURES].to_numpy()), torch.as_tensor(data["label"].to_numpy())
    loss, norms = _grad_norms(clf, x, lambda o: nn.functional.cross_entropy(o, y))
    assert result.metrics["batch_loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["layers"]["0"]["gradient"]["l2_norm"] == pytest.approx(norms["0"], rel=1e-4)
    with pytest.raises(XAIError, match="evaluator_config key nosuch unknown"), mlflow.start_run():
        mlflow.models.evaluate(uri, data=data, targets="label", model_type="classifier", evaluators=["xai"],
                               evaluator_config={"xai": {"nosuch": 1}})


def test_mlflow_evaluate_declines_models_that_are_not_pytorch(zoo: dict[str, Any]) -> None:
    from sklearn.linear_model import LinearRegression

    data = zoo["table"]
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(LinearRegression().fit(data[FEATURES], data["y"]), name="linear",
                                        pip_requirements=["scikit-learn"])
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(info.model_uri, data=data, targets="y", model_type="regressor",
                                        evaluators=["xai", "default"])
    assert "mean_squared_error" in result.metrics and "nan_count" not in result.metrics
    assert not MlflowClient().list_artifacts(run.info.run_id, "xai")
