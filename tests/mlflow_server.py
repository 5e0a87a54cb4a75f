"""A real ``mlflow server`` process for the tests that need the HTTP path.

``MlflowServer`` starts ``.venv/bin/mlflow server`` on 127.0.0.1 and a free port,
with a backend store (sqlite in its folder unless ``store_uri`` names another, such as
PostgreSQL: tests/postgres.py) and an artifact destination (a local folder unless
``artifacts_destination`` names another, such as ``s3://bucket/path``; artifacts are
proxied over HTTP, as on a team server), waits for ``/health`` and stops the whole
process group (the server and its uvicorn workers) when done: SIGTERM, then SIGKILL.
The fixtures are imported by ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """One ``mlflow server``; ``stop()`` and ``start()`` again keep its store, port and URI."""

    def __init__(self, root: Path, port: int | None = None, store_uri: str | None = None,
                 artifacts_destination: str | None = None, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "server.db"
        self.store_uri = store_uri or f"sqlite:///{self.db}"
        self.artifacts = root / "artifacts"
        self.artifacts_destination = artifacts_destination or str(self.artifacts)
        self.workers = workers
        self.env = dict(env or {})  # extra variables for the server (e.g. MLFLOW_S3_ENDPOINT_URL)
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: lighter and faster to start
        env.update(self.env)
        cmd = [str(MLFLOW), "server", "--backend-store-uri", self.store_uri,
               "--artifacts-destination", self.artifacts_destination, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            # Own process group: stop() ends the server and the uvicorn worker it spawns, nothing else.
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s; see {self.log}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # start_new_session: the group id is the server's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(pgid, signal.SIGKILL)  # the worker may outlive its parent
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


    def kill(self) -> None:
        """Crash it: SIGKILL to the whole group at once (what a lost machine or OOM kill looks like)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` shared by the session (sqlite backend, proxied local artifacts)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def use_server(monkeypatch: pytest.MonkeyPatch, uri: str, root: Path) -> None:
    """Point this process's MLflow at the server (undone by ``monkeypatch``), working in ``root``."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_XAI_WORKDIR", str(root / "work"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        # Set, then deleted: monkeypatch records the variable, so teardown also removes
        # one that mlflow.set_experiment sets meanwhile (MLFLOW_EXPERIMENT_ID).
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.chdir(root)
    # What mlflow.set_tracking_uri sets, restored at teardown.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    # The experiment mlflow.set_experiment makes active (the jobs call it): none at first, and
    # restored at teardown, so an id of this server never reaches a later test's store.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``mlflow-xai ARGS`` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "mlflow_xai", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(client: object, run_id: str) -> dict[str, object]:
    """Everything a train run shows: status, tags, params, metric histories, artifact paths."""
    from mlflow import MlflowClient

    assert isinstance(client, MlflowClient)
    run = client.get_run(run_id)

    def arts(path: str | None = None) -> set[str]:
        out: set[str] = set()
        for f in client.list_artifacts(run_id, path):
            out |= arts(f.path) if f.is_dir else {f.path}
        return out

    return {
        "status": run.info.status, "end_time": run.info.end_time,
        "tags": dict(run.data.tags), "params": dict(run.data.params),
        "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics},
        "artifacts": arts(),
    }


N_CONCURRENT = 3


@pytest.fixture(scope="session")
def served(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One ``mlflow-xai train`` and three concurrent ``explain`` processes, CLI against the session's server.

    The model is registered as ``served`` with alias ``champion``. The three explains
    start at once on the same source: the first by ``models:/served@champion`` (it tags
    the version), the others by ``--run-id`` with ``--attributions none``. Returns the run ids (``explain_run_id`` is
    the first one's), the train run as it was before the explanations, and the outputs.
    """
    import json

    from mlflow import MlflowClient

    from tests.conftest import TINY_CONFIG, env_for

    root = tmp_path_factory.mktemp("served")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    env = env_for(mlflow_server.uri, root / "work")
    train = run_cli(["train", "--quiet", "--config", str(cfg), "--register-as", "served", "--alias", "champion"],
                    env, root)
    assert train.returncode == 0, train.stderr[-3000:]
    train_id = train.stdout.split("train run: ", 1)[1].split()[0]
    client = MlflowClient(mlflow_server.uri)
    before = snapshot(client, train_id)
    # The first explains everything (the whole contract over HTTP); the others skip the attributions.
    sources = [["--model-uri", "models:/served@champion"]] + [
        ["--run-id", train_id, "--attributions", "none"]] * (N_CONCURRENT - 1)
    procs = [subprocess.Popen([sys.executable, "-m", "mlflow_xai", "explain", "--quiet", *src], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in sources]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
    explain_ids = [o.stdout.split("explain run: ", 1)[1].split()[0] for o in outs]
    return {"root": root, "env": env, "train_run_id": train_id, "explain_run_id": explain_ids[0],
            "explain_run_ids": explain_ids, "train_before": before, "train_out": train, "explain_outs": outs}
