"""Shared fixtures: a real sqlite MLflow store in tmp_path, and one small trained run per session."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tiny but real: the cookbook rule at l1=1 on the diabetes data (10 inputs).
TINY_CONFIG: dict[str, Any] = {"l1": 1, "epochs": 3, "batch_size": 32, "patience": 2}


def _isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> str:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_XAI_WORKDIR", str(root / "work"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(root)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite MLflow store in tmp_path; yields its tracking URI."""
    uri = _isolate(monkeypatch, tmp_path)
    yield uri
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def env_for(uri: str, workdir: Path) -> dict[str, str]:
    """Environment for a CLI subprocess logging to ``uri``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_XAI_WORKDIR=str(workdir))
    # MLflow's telemetry thread can unset a variable while a request iterates os.environ
    # (KeyError '_MLFLOW_TELEMETRY_SESSION_ID', seen offline with mlflow 3.17): a flaky test.
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # `mlflow run --env-manager local` runs `python` from PATH: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# A real `mlflow server` (session-scoped) and one CLI train + explain against it: tests/mlflow_server.py.
from tests.mlflow_server import mlflow_server, served  # noqa: E402, F401

# A team's server: PostgreSQL backend store, proxied artifacts (session-scoped): tests/postgres.py.
from tests.postgres import postgres_mlflow_server  # noqa: E402, F401

# A tuning study and two registered versions trained from it: tests/registry_study.py.
from tests.registry_study import registry_study  # noqa: E402, F401

# `make test` runs the suite on two pytest-xdist workers with --dist loadgroup. Each
# session fixture above costs tens of seconds (a server, CLI trainings), so all the tests
# that need one share a worker; every other file stays whole on one worker, so its
# module-scoped fixtures are built once.
_SHARED_FIXTURE_GROUPS = {"mlflow_server": "server", "served": "server", "registry_study": "registry",
                          "postgres_mlflow_server": "postgres"}


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection of each item: xdist reads the groups in its collection_modifyitems.
    needs = set(getattr(item, "fixturenames", ()))
    group = next((g for f, g in _SHARED_FIXTURE_GROUPS.items() if f in needs), item.path.stem)
    item.add_marker(pytest.mark.xdist_group(group))
