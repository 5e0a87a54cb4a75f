"""A job's run: opening and ending it, logging into it, reading one back.

The tracking store is whatever ``MLFLOW_TRACKING_URI`` says (a remote ``mlflow
server`` included), MLflow's own default ``sqlite:///mlflow.db`` otherwise. Under
``mlflow run`` the run is already started and its id is in ``MLFLOW_RUN_ID``: we log
into it instead of opening a second one. In a DDP worker process nothing is logged:
rank 0 owns the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_xai.errors import XAIError
from mlflow_xai.tracking.contract import DEFAULT_EXPERIMENT, ERROR_TAG
from mlflow_xai.tracking.http import (
    apply_http_defaults,
    cause,
    is_unreachable,
    short_http_budget,
    tracking_uri,
    unreachable_error,
)


def default_experiment(name: str | None) -> str:
    """``--experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``mlflow-xai``."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def get_run(run_id: str) -> Any:
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise XAIError(
            f"run {run_id!r} was not found in the tracking store {tracking_uri()}; check the id "
            "(MLflow UI or `mlflow runs list`) and MLFLOW_TRACKING_URI"
        ) from exc


WORKER_RUN_ENV = "MLFLOW_XAI_RUN_ID"
_worker = False  # True inside a DDP worker's run_context: every logging call below is a no-op


def distributed_rank() -> int:
    """This process's rank as a launcher set it (Lightning's DDP launcher, torchrun, SLURM); 0 if none.

    The variables and their order are Lightning's own (``rank_zero_only``).
    """
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


@contextmanager
def _worker_run() -> Iterator[Any]:
    """A DDP worker's stand-in for the run: rank 0 owns the MLflow run; a worker logs and ends nothing."""
    from types import SimpleNamespace

    global _worker
    run_id = os.environ.get(WORKER_RUN_ENV) or os.environ.get("MLFLOW_RUN_ID") or ""
    _worker = True
    try:
        yield SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=""))
    finally:
        _worker = False


@contextmanager
def run_context(experiment: str | None, run_name: str | None = None,
                experiment_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The run to log into, ended FINISHED, FAILED (on an error) or KILLED (on Ctrl-C).

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is resumed; otherwise a new run
    starts in ``experiment`` (created if missing) or in ``experiment_id``. In a DDP worker
    process (rank > 0) nothing is started, logged or ended: rank 0 logs once.
    """
    apply_http_defaults()
    if distributed_rank() > 0:
        with _worker_run() as stand_in:
            yield stand_in
        return
    try:
        if os.environ.get("MLFLOW_RUN_ID"):
            run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        else:
            if experiment_id is not None:
                run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
            else:
                mlflow.set_experiment(default_experiment(experiment))
                run = mlflow.start_run(run_name=run_name)
    except MlflowException as exc:
        if not is_unreachable(exc):
            raise
        raise XAIError(
            f"the tracking server {tracking_uri()} does not answer ({cause(exc)}); "
            "start it or fix MLFLOW_TRACKING_URI, then run the command again"
        ) from exc
    previous = os.environ.get(WORKER_RUN_ENV)
    os.environ[WORKER_RUN_ENV] = run.info.run_id  # inherited by the DDP workers Lightning launches
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except Exception as exc:
        if isinstance(exc, XAIError) or not is_unreachable(exc):
            _fail(exc)
            raise
        # The server just failed a whole retry window: one line saying what to do, one quick
        # try to mark the run, no more waiting.
        lost = unreachable_error(exc, run.info.run_id)
        with short_http_budget():
            _fail(lost, quiet=True)
        raise lost from exc
    except BaseException as exc:
        _fail(exc)
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        if previous is None:
            os.environ.pop(WORKER_RUN_ENV, None)
        else:
            os.environ[WORKER_RUN_ENV] = previous


def _fail(exc: BaseException, quiet: bool = False) -> None:
    """End the active run FAILED, with a user error's line as its ``mlflow_xai.error`` tag."""
    if isinstance(exc, XAIError):
        message = str(exc)[:5000]
        _safe(lambda: mlflow.set_tag(ERROR_TAG, message))
    if quiet:
        _safe(lambda: mlflow.end_run(RunStatus.to_string(RunStatus.FAILED)))  # pops the run first
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))


def _safe(fn: Any) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def log_params(params: Mapping[str, Any]) -> None:
    """All params in one call; None becomes an empty string.

    MLflow params are immutable. Under ``mlflow run`` the entry point's parameters are
    already logged as given (``target=''``); where our resolved value differs (the
    diabetes data's ``target``), it is logged as ``resolved.<key>`` instead of failing.
    """
    if _worker:
        return
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params if run is not None else {}
    out: dict[str, str] = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if key not in existing:
            out[key] = text
        elif existing[key] != text:
            out[f"resolved.{key}"] = text
    if out:
        mlflow.log_params(out)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if _worker:
        return
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    if _worker:
        return
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    if _worker:
        return
    mlflow.log_artifact(str(path), artifact_path)


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    if _worker:
        return
    mlflow.log_artifacts(str(path), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    if _worker:
        return
