"""Everything that talks to MLflow for the train and explain jobs: runs, lookups, downloads, registry.

The tracking store is whatever ``MLFLOW_TRACKING_URI`` says (a remote ``mlflow
server`` included), MLflow's own default ``sqlite:///mlflow.db`` otherwise. Under
``mlflow run`` the run is already started and its id is in ``MLFLOW_RUN_ID``: we log
into it instead of opening a second one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_xai.errors import XAIError

if TYPE_CHECKING:
    import lightning as L

ROLE_TAG = "mlflow_xai.role"
CHECKSUM_TAG = "mlflow_xai.checkpoint_sha256"
SOURCE_RUN_TAG = "mlflow_xai.source_run_id"
SOURCE_URI_TAG = "mlflow_xai.source_model_uri"
ERROR_TAG = "mlflow_xai.error"
EXPLAIN_RUN_TAG = "mlflow_xai.explain_run_id"
LAST_CKPT = "checkpoints/last.ckpt"
DEFAULT_EXPERIMENT = "mlflow-xai"


def default_experiment(name: str | None) -> str:
    """``--experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``mlflow-xai``."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def tracking_uri() -> str:
    return str(mlflow.get_tracking_uri())


@contextmanager
def run_context(experiment: str | None, run_name: str | None = None,
                experiment_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The run to log into, ended FINISHED, FAILED (on an error) or KILLED (on Ctrl-C).

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is resumed; otherwise a new run
    starts in ``experiment`` (created if missing) or in ``experiment_id``.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    else:
        if experiment_id is not None:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
        else:
            mlflow.set_experiment(default_experiment(experiment))
            run = mlflow.start_run(run_name=run_name)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        if isinstance(exc, XAIError):
            _safe(lambda: mlflow.set_tag(ERROR_TAG, str(exc)[:5000]))
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


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
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(path), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def epoch_metrics_callback() -> "L.Callback":
    """A Lightning callback logging ``train_loss`` and ``val_loss`` each epoch, step = epoch."""
    from lightning.pytorch.callbacks import Callback

    class _EpochMetrics(Callback):
        def __init__(self) -> None:
            self.run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
            self.client = MlflowClient()

        def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
            if not trainer.is_global_zero or trainer.sanity_checking:
                return
            now = int(time.time() * 1000)
            metrics = [
                Metric(key, float(trainer.callback_metrics[key]), now, trainer.current_epoch)
                for key in ("train_loss", "val_loss")
                if key in trainer.callback_metrics
            ]
            if metrics:  # one call per epoch, not one per metric
                self.client.log_batch(self.run_id, metrics=metrics)

    return _EpochMetrics()


def log_pytorch_model(model: Any, input_example: Any, registered_name: str | None) -> Any:
    """Log the network as an MLflow model in torch.export's pt2 format (loads without unpickling code)."""
    import mlflow.pytorch
    import torch

    # Explicit requirements: MLflow's inference of them loads the model in a subprocess
    # and costs seconds for nothing (loading a pt2 model needs torch and mlflow only).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    return mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=input_example,
        serialization_format="pt2",
        pip_requirements=requirements,
        registered_model_name=registered_name or None,
        await_registration_for=60,
    )


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def latest_version(name: str, run_id: str) -> str:
    """The registered version of ``name`` produced by ``run_id`` (the newest one)."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{_q(name)}' and run_id='{_q(run_id)}'")
    if not versions:
        raise XAIError(f"no version of registered model {name!r} comes from run {run_id}")
    return str(max(int(v.version) for v in versions))


def _q(s: str) -> str:
    return s.replace("'", "\\'")


@dataclass(frozen=True)
class Source:
    """The train run an explanation is about, and how the user named it."""

    run_id: str
    experiment_id: str
    model_uri: str  # what the user passed, or runs:/<id>/checkpoints/last.ckpt
    registered_name: str | None = None
    version: str | None = None


def get_run(run_id: str) -> Any:
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise XAIError(
            f"run {run_id!r} was not found in the tracking store {tracking_uri()}; check the id "
            "(MLflow UI or `mlflow runs list`) and MLFLOW_TRACKING_URI"
        ) from exc


def resolve_source(run_id: str | None, model_uri: str | None, experiment: str | None) -> Source:
    """Find the train run to explain: a run id, a model URI, or the latest train run."""
    if run_id and model_uri:
        raise XAIError("pass either --run-id or --model-uri, not both")
    if model_uri:
        return _resolve_uri(model_uri)
    if run_id:
        run = get_run(run_id)
        return Source(run.info.run_id, run.info.experiment_id, f"runs:/{run.info.run_id}/{LAST_CKPT}")
    name = default_experiment(experiment)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        raise XAIError(
            f"experiment {name!r} does not exist in {tracking_uri()}; train first "
            "(`mlflow-xai train`) or pass --experiment, --run-id or --model-uri"
        )
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise XAIError(
            f"experiment {name!r} has no finished train run; run `mlflow-xai train` first "
            "or pass --run-id or --model-uri"
        )
    r = runs[0]
    return Source(r.info.run_id, r.info.experiment_id, f"runs:/{r.info.run_id}/{LAST_CKPT}")


_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)(/.*)?$")


def _resolve_uri(uri: str) -> Source:
    client = MlflowClient()
    if m := _RUNS.match(uri):
        run = get_run(m["run_id"])
        return Source(run.info.run_id, run.info.experiment_id, uri)
    m = _MODELS_ALIAS.match(uri) or _MODELS_VERSION.match(uri)
    if m is None:
        raise XAIError(
            f"model URI {uri!r} is not supported; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/..."
        )
    name = m["name"]
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise XAIError(
            f"registered model {name!r} does not exist in {tracking_uri()}; check the name "
            "(train with --register-as NAME to create it)"
        ) from exc
    try:
        if "alias" in m.groupdict():
            mv = client.get_model_version_by_alias(name, m["alias"])
        else:
            mv = client.get_model_version(name, m["version"])
    except MlflowException as exc:
        what = f"alias {m['alias']!r}" if "alias" in m.groupdict() else f"version {m['version']}"
        raise XAIError(
            f"registered model {name!r} has no {what}; see its versions and aliases in the MLflow UI"
        ) from exc
    if not mv.run_id:
        raise XAIError(f"{uri} was not logged from a run, so it has no mlflow-xai checkpoint to explain")
    run = get_run(mv.run_id)
    return Source(run.info.run_id, run.info.experiment_id, uri, name, str(mv.version))


def download_checkpoint(source: Source, dst: Path) -> tuple[Path, str | None, Any]:
    """Download ``checkpoints/last.ckpt`` of the source run into ``dst``.

    Returns the local path, the recorded sha256 tag and the run. The download goes to a
    temporary folder inside ``dst`` and is moved into place only when complete, so a
    broken download never leaves a partial file to be loaded.
    """
    run = get_run(source.run_id)
    names = {f.path for f in MlflowClient().list_artifacts(source.run_id, "checkpoints")}
    if LAST_CKPT not in names:
        raise XAIError(
            f"run {source.run_id} has no {LAST_CKPT} artifact; explain a run logged by `mlflow-xai train`"
        )
    staging = Path(tempfile.mkdtemp(dir=dst, prefix=".download-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=source.run_id, artifact_path=LAST_CKPT, dst_path=str(staging)
        ))
        if not local.resolve().is_relative_to(staging.resolve()):
            raise XAIError(f"artifact path of run {source.run_id} escapes the download folder; refusing it")
        final = dst / "last.ckpt"
        os.replace(local, final)
    except MlflowException as exc:
        raise XAIError(
            f"downloading {LAST_CKPT} of run {source.run_id} failed ({str(exc).splitlines()[0]}); "
            "check the tracking server and try again"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, run.data.tags.get(CHECKSUM_TAG), run


def tag_model_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
