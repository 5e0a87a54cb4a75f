"""The train job end to end against a real sqlite MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from mlflow_xai.jobs.train import train_and_log
from tests.conftest import TINY_CONFIG, env_for

REPO = Path(__file__).resolve().parents[1]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_train_logs_params_metrics_checkpoints_model_and_alias(store: str, tiny_config: Path) -> None:
    out = train_and_log(tiny_config, register_as="diab", alias="champion", monitor=False, quiet=True)
    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_xai.role"] == "train"
    params = run.data.params
    for key, value in TINY_CONFIG.items():
        assert params[key] == str(value)
    assert params["act_fn"] == "ReLU" and params["optimizer"] == "Adam"
    assert (params["data"], params["task"], params["seed"], params["test_size"]) == ("diabetes", "regression", "42", "0.4")
    assert int(params["n_test"]) == 177 and int(params["n_fit"]) + int(params["n_val"]) == 177
    for key in ("train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(out.run_id, key)]
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= TINY_CONFIG["epochs"]
    for key in ("test_loss", "test_rmse", "test_mae", "test_r2"):
        assert key in run.data.metrics
    arts = _artifacts(client, out.run_id)
    assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= arts
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in arts)
    assert not any(a.startswith("xai/") for a in arts)  # monitor=False: no training page either

    local = Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="checkpoints/last.ckpt"))
    assert run.data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(local)
    ckpt = torch.load(local, weights_only=True)  # must need no code
    assert ckpt["mlflow_xai"]["config"]["l1"] == 1 and ckpt["mlflow_xai"]["feature_names"][2] == "bmi"
    # test_loss is the MSE on the standardized target; rmse is in the target's units
    y_std = ckpt["mlflow_xai"]["target_std"]
    assert run.data.metrics["test_rmse"] == pytest.approx(run.data.metrics["test_loss"] ** 0.5 * y_std, rel=1e-4)
    cfg = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="config.json")).read_text())
    assert cfg["l1"] == 1

    mv = client.get_model_version_by_alias("diab", "champion")
    assert mv.run_id == out.run_id and out.registered_version == str(mv.version)
    model = mlflow.pytorch.load_model("models:/diab@champion")
    assert model(torch.zeros(3, 10)).shape == (3, 1)  # pt2 export keeps the batch dimension dynamic


def _only_run(uri: str) -> mlflow.entities.Run:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mlflow-xai")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize(
    ("config", "extra", "needle"),
    [
        ({"l1": 1, "nodes": 3}, [], "unknown config key 'nodes'; valid keys:"),
        ({"l1": 1, "optimizer": "Lion"}, [], "optimizer='Lion' is not supported; use one of"),
        (TINY_CONFIG, ["--data", "DATA", "--target", "nope"], "target column 'nope' is not in"),
        (TINY_CONFIG, ["--data", "missing.csv", "--target", "y"], "does not exist"),
    ],
)
def test_bad_input_one_line_and_failed_run(store: str, tmp_path: Path, config: dict, extra: list[str], needle: str) -> None:
    from click.testing import CliRunner

    from mlflow_xai.cli import main

    (tmp_path / "cfg.json").write_text(json.dumps(config))
    (tmp_path / "d.csv").write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(20)))
    extra = [str(tmp_path / "d.csv") if e == "DATA" else e for e in extra]
    # In-process through click (the subprocess path is covered by the explain CLI test).
    result = CliRunner().invoke(main, ["train", "--quiet", "--no-monitor", "--config", "cfg.json", *extra])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-xai: error:") and needle in lines[0], result.stderr
    run = _only_run(store)
    assert run.info.status == "FAILED"
    assert needle in run.data.tags["mlflow_xai.error"]


def test_ctrl_c_marks_killed_and_keeps_the_last_checkpoint(store: str, tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"l1": 1, "epochs": 100000, "patience": 100000, "batch_size": 8}))
    proc = subprocess.Popen([sys.executable, "-m", "mlflow_xai", "train", "--quiet", "--no-monitor", "--config", "cfg.json"],
                            cwd=tmp_path, env=env_for(store, tmp_path / "work"), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "work").glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = _only_run(store)
    assert run.info.status == "KILLED"
    client = MlflowClient(store)
    assert "checkpoints/last.ckpt" in _artifacts(client, run.info.run_id)
    assert run.data.tags.get("mlflow_xai.checkpoint_sha256")
    # Epoch metrics are buffered; the interrupt still writes every finished epoch's value.
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert epochs and epochs == list(range(len(epochs))), epochs


@pytest.mark.slow
def test_mlproject_train_and_explain_log_into_the_runs_mlflow_run_started(store: str, tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({**TINY_CONFIG, "epochs": 2}))
    env = env_for(store, tmp_path / "work")
    env["MLFLOW_EXPERIMENT_NAME"] = "mlflow-xai"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
         "-P", f"config={tmp_path / 'cfg.json'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _only_run(store)  # one run: the one `mlflow run` started, not a second
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_xai.role"] == "train"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.params["epochs"] == "2"

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "explain", "--env-manager", "local",
         "-P", f"run_id={run.info.run_id}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(store)
    explains = client.search_runs([run.info.experiment_id], filter_string="tags.`mlflow_xai.role` = 'explain'")
    assert len(explains) == 1 and explains[0].info.status == "FINISHED"
    assert explains[0].data.tags["mlflow.project.entryPoint"] == "explain"
    assert explains[0].data.tags["mlflow_xai.source_run_id"] == run.info.run_id
    assert "xai/report.html" in _artifacts(client, explains[0].info.run_id)


def test_logged_model_takes_raw_features_and_predicts_in_target_units(store: str, tiny_config: Path) -> None:
    from mlflow_xai.data import load_dataset, split_dataset

    out = train_and_log(tiny_config, monitor=False, quiet=True)
    ds = load_dataset("diabetes")
    split = split_dataset(ds)
    models = mlflow.search_logged_models(output_format="list")
    model = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    raw_x = torch.as_tensor(split.X_test * split.std + split.mean)
    pred = model(raw_x).squeeze(-1).detach().numpy()
    raw_y = split.y_test * split.y_std + split.y_mean
    rmse = float(((pred - raw_y) ** 2).mean() ** 0.5)
    run = MlflowClient().get_run(out.run_id)
    assert rmse == pytest.approx(run.data.metrics["test_rmse"], rel=1e-4)
    assert 20 < rmse < 200  # diabetes target units (std ~77), not standardized ones


def test_a_small_cpu_fit_runs_on_one_thread_and_restores_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_xai.config import TrainerOptions
    from mlflow_xai.train import ONE_THREAD_PARAMETERS, fit_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu = TrainerOptions(accelerator="cpu")
        with fit_threads(ONE_THREAD_PARAMETERS, cpu) as threads:
            assert threads == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with fit_threads(ONE_THREAD_PARAMETERS + 1, cpu) as threads:  # a large network keeps torch's count
            assert threads == 2 and torch.get_num_threads() == 2
        with fit_threads(100, TrainerOptions(accelerator="gpu")) as threads:  # not a CPU fit
            assert threads == 2
        with pytest.raises(RuntimeError), fit_threads(100, cpu):
            raise RuntimeError("a failing fit")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        with fit_threads(100, cpu) as threads:
            assert threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
