"""A tuning study logged to MLflow and two model versions trained from it, shared by the registry
and compare tests (session-scoped: two trainings in all). Imported by ``conftest.py``.

Each test module that uses it points the process at its store again (``_isolate``): other
modules' fixtures move the global tracking URI while it lives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient


def log_trial(params: dict[str, Any], metrics: dict[str, float], status: str = "FINISHED") -> str:
    """A tuning trial as spotpython, Optuna or a hand-written loop logs it: params and metrics."""
    with mlflow.start_run() as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="session")
def registry_study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Experiment ``tune`` with three trials (and a failed one); ``reg`` v1 (@champion, the best
    trial by val_loss) and v2 (@challenger, from trial 1), same architecture, in experiment ``prod``."""
    from mlflow_xai.jobs.train import train_and_log
    from tests.conftest import _isolate

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        uri = _isolate(mp, root)
        mlflow.set_experiment("tune")
        # Keys as in a config file (spotpython writes "ReLU()"), plus a tuner's own bookkeeping.
        t1 = log_trial({"l1": "1", "epochs": "2", "batch_size": "32", "act_fn": "ReLU()", "trial_number": "0"},
                       {"val_loss": 0.5, "r2": 0.2})
        t2 = log_trial({"l1": "1", "epochs": "2.0", "batch_size": "64", "act_fn": "ReLU", "lr_mult": "3",
                        "batch_norm": "False", "trial_number": "1"}, {"val_loss": 0.3, "r2": 0.1})
        t3 = log_trial({"l1": "2", "epochs": "2", "batch_size": "32", "act_fn": "LeakyReLU", "trial_number": "2"},
                       {"val_loss": 0.9, "r2": 0.6})
        log_trial({"l1": "1", "act_fn": "ReLU"}, {"val_loss": 0.01, "r2": 0.99}, status="FAILED")  # never picked
        lines: list[str] = []
        v1 = train_and_log(config_from_experiment="tune", metric="val_loss", mode="min", experiment="prod",
                           register_as="reg", alias="champion", monitor=False, quiet=True, echo=lines.append)
        v2 = train_and_log(config_from_run=t1, experiment="prod", register_as="reg", alias="challenger",
                           monitor=False, quiet=True, echo=lines.append)
    yield {"uri": uri, "root": root, "trials": (t1, t2, t3), "v1": v1, "v2": v2, "lines": lines}
