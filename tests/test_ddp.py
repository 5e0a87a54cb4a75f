"""The train job under Lightning DDP, two CPU processes (gloo), against a real ``mlflow server``.

Lightning's launcher re-runs the command for rank 1; rank 0 owns the MLflow run (its id
travels in ``MLFLOW_XAI_RUN_ID``) and the worker logs nothing: one run, each metric
once per step, the same artifacts as a single-process fit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from tests.conftest import TINY_CONFIG, env_for
from tests.mlflow_server import MlflowServer, run_cli, snapshot

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _kinds(artifacts: set[str]) -> set[str]:
    """Artifact names without the parts that differ between runs (event file suffix, monitor image steps)."""
    return {re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", a) for a in artifacts
            if not a.startswith("images/")}


def test_ddp_two_cpu_processes_one_run_logged_once(mlflow_server: MlflowServer, served: dict[str, Any],
                                                   tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CONFIG))
    env = env_for(mlflow_server.uri, tmp_path / "work")
    out = run_cli(["train", "--quiet", "--config", "cfg.json", "--experiment", "ddp", "--strategy", "ddp",
                   "--devices", "2", "--accelerator", "cpu", "--monitor-every", "1"], env, tmp_path, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1  # rank 1 opened no run of its own
    run = runs[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_xai.role"] == "train"
    epochs = int(run.data.metrics["epochs_run"])
    for key in ("train_loss", "val_loss"):
        assert [m.step for m in client.get_metric_history(rid, key)] == list(range(epochs)), key  # once each
    grad_steps = [m.step for m in client.get_metric_history(rid, "grad_norm/layers.0")]
    assert grad_steps and len(grad_steps) == len(set(grad_steps))
    # 141 fit rows split over 2 ranks of 32-row batches: 3 steps an epoch, not 5.
    assert max(grad_steps) < epochs * 3
    assert {"test_loss", "test_rmse", "test_mae", "test_r2"} <= set(run.data.metrics)

    arts = snapshot(client, rid)["artifacts"]
    assert _kinds(arts) == _kinds(served["train_before"]["artifacts"])  # same artifacts as one process
    local = tmp_path / "work" / rid / "checkpoints" / "last.ckpt"
    assert run.data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(local)
    models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == rid]
    assert len(models) == 1
