"""The jobs' MLflow side: runs, lookups, downloads, registry, HTTP settings.

The jobs talk to MLflow through this module; the monitor logs through its own
writer, the evaluator through the run MLflow hands it, and ``sources/`` reads a
model's ``MLmodel`` file (``tests/test_layering.py`` lists who may import mlflow).

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
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
TRAIN_RUN_TAG = "mlflow_xai.train_run_id"
CONFIG_SOURCE_TAG = "mlflow_xai.config_source_run_id"
LAST_CKPT = "checkpoints/last.ckpt"
DEFAULT_EXPERIMENT = "mlflow-xai"


def default_experiment(name: str | None) -> str:
    """``--experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else ``mlflow-xai``."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def tracking_uri() -> str:
    return str(mlflow.get_tracking_uri())


#: MLflow's HTTP client settings that mlflow-xai sets when the environment does not
#: (a user's own value always wins). Every request to a tracking server waits at most
#: 60 s for an answer; a failed one (refused, reset, timed out, 429/5xx) is retried 6
#: times, ``2 * 2**n`` s apart (0, 4, 8, 16, 32, 64 s, plus up to 1 s of jitter each):
#: a server that is back within about two minutes loses nothing. MLflow's own defaults
#: (120 s, 7 retries: about four minutes) may change between versions; these do not.
HTTP_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
}


def apply_http_defaults() -> None:
    """Set :data:`HTTP_DEFAULTS` in ``os.environ`` where unset (MLflow reads them at each request)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Connection reset",
                "timeout exception", "Read timed out", "Failed to establish a new connection",
                "RemoteDisconnected", "ConnectionError", "Connection broken")


def is_unreachable(exc: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server did not answer (after retries)."""
    import requests

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, MlflowException) and any(s in str(cur) for s in _UNREACHABLE):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class ServerUnreachable(XAIError):
    """The tracking server stopped answering; the message says where the local files are."""


@contextmanager
def _short_http_budget() -> Iterator[None]:
    """One try, 5 s: for the last calls of a run whose server has just been found gone."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_LOCAL_RESULTS: dict[str, Path] = {}


def keep_local_results(run_id: str, local_dir: Path) -> None:
    """Say that ``local_dir`` holds run ``run_id``'s finished training: a lost server names it."""
    _LOCAL_RESULTS[run_id] = local_dir


_CAUSES = (("Connection refused", "connection refused"), ("timed out", "timed out"),
           ("timeout", "timed out"), ("Connection reset", "connection reset"),
           ("Connection aborted", "connection aborted"), ("RemoteDisconnected", "connection dropped"),
           ("too many", "error answers"), ("Max retries exceeded", "no answer"))


def _cause(exc: BaseException) -> str:
    """A few words for why the server did not answer, instead of MLflow's long request dump."""
    text = str(exc)
    for needle, words in _CAUSES:
        if needle in text:
            return f"{words}, after {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '?')} retries"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _unreachable_error(exc: BaseException, run_id: str) -> ServerUnreachable:
    uri, first = tracking_uri(), _cause(exc)
    local = _LOCAL_RESULTS.get(run_id)
    if local is None:
        return ServerUnreachable(f"the tracking server {uri} stopped answering ({first}); run {run_id} is "
                                 "incomplete: run the command again when the server is back")
    local = local.resolve()
    return ServerUnreachable(
        f"the tracking server {uri} stopped answering ({first}); training finished locally: the "
        f"checkpoints, config.json and TensorBoard logs of run {run_id} are in {local}; upload them when "
        f"the server is back with `MLFLOW_TRACKING_URI={uri} mlflow artifacts log-artifacts --run-id "
        f"{run_id} --local-dir {local}`"
    )


#: Set by rank 0 while its run is open, so that DDP worker processes it launches know the run.
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
            f"the tracking server {tracking_uri()} does not answer ({_cause(exc)}); "
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
        lost = _unreachable_error(exc, run.info.run_id)
        with _short_http_budget():
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
    mlflow.log_text(text, artifact_file)


#: Per-epoch metrics are written at most this many seconds after the epoch (and when
#: training ends or fails): a sqlite store costs ~25 ms a call, which a cookbook epoch of
#: ~40 ms cannot hide, while a call every few seconds is free and the UI's charts still
#: follow the training.
EPOCH_METRICS_FLUSH_S = 5.0


def epoch_metrics_callback() -> L.Callback:
    """A Lightning callback logging ``train_loss`` and ``val_loss`` each epoch, step = epoch.

    The values are buffered and written in one ``log_batch`` call every
    :data:`EPOCH_METRICS_FLUSH_S` seconds and at the end of training, whether it ends
    normally, by an exception or by Ctrl-C: every epoch's values reach the run.
    """
    from lightning.pytorch.callbacks import Callback

    class _EpochMetrics(Callback):
        def __init__(self) -> None:
            active = mlflow.active_run()  # none in a DDP worker, which logs nothing
            self.run_id = active.info.run_id if active is not None else ""
            self.client = MlflowClient()
            self.pending: list[Metric] = []
            self.last_flush = time.monotonic()
            self.error: Exception | None = None  # set when the server stopped answering

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Every rank reads callback_metrics: under DDP the first read all-reduces the
            # epoch's losses (sync_dist), a collective that rank 0 alone would enter out of
            # step with the others' next one (the monitor's) and deadlock or abort.
            values = trainer.callback_metrics
            if not trainer.is_global_zero or trainer.sanity_checking:
                return
            now = int(time.time() * 1000)
            self.pending += [
                Metric(key, float(values[key]), now, trainer.current_epoch)
                for key in ("train_loss", "val_loss")
                if key in values
            ]
            if time.monotonic() - self.last_flush >= EPOCH_METRICS_FLUSH_S:
                self.flush()

        def flush(self, final: bool = False) -> None:
            # MLflow takes at most 1000 metrics a call. A call that fails after MLflow's
            # retries keeps its metrics pending and training goes on without waiting on the
            # server again; train_and_log's ``final`` flush tries once more and raises.
            if self.error is not None and not final:
                return
            try:
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    del self.pending[:1000]
            except Exception as exc:
                if final:
                    raise
                self.error = exc
                warnings.warn(f"mlflow-xai: logging train_loss/val_loss to MLflow failed ({str(exc)[:200]}); "
                              "training goes on, the values are kept and logged at the end", stacklevel=2)
            else:
                self.error = None
            self.last_flush = time.monotonic()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.flush()

        def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                         exception: BaseException) -> None:
            self.flush()

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
        # MLflow would reload the exported model and predict on the example (~0.3 s);
        # tests/test_train.py loads the logged model and predicts instead.
        validate_serving_input=False,
    )


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def latest_version(name: str, run_id: str) -> str:
    """The registered version of ``name`` produced by ``run_id`` (the newest one).

    The search filters by run id only and the name is compared here: MLflow's filter
    syntax has no escape for a quote inside a quoted value (``\\'`` and ``''`` match
    nothing), and a registered model's name may hold one (``team's net``).
    """
    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"run_id='{_q(run_id)}'") if v.name == name]
    if not versions:
        raise XAIError(f"no version of registered model {name!r} comes from run {run_id}")
    return str(max(int(v.version) for v in versions))


def _q(s: str) -> str:
    return s.replace("'", "\\'")


@dataclass(frozen=True)
class Source:
    """The model an explanation is about, and how the user named it.

    ``kind`` is ``checkpoint`` for a run of ``mlflow-xai train`` (its checkpoint is
    explained) and ``model`` for any other MLflow PyTorch model (``artifact_uri`` is what
    to download; ``run_id`` its source run, empty when it has none).
    """

    run_id: str
    experiment_id: str
    model_uri: str  # what the user passed, or runs:/<id>/checkpoints/last.ckpt
    registered_name: str | None = None
    version: str | None = None
    kind: str = "checkpoint"
    artifact_uri: str | None = None


def _is_train_run(run: Any) -> bool:
    """A run of ``mlflow-xai train``: its checkpoint, not its logged model, is what gets explained."""
    return run.data.tags.get(ROLE_TAG) == "train"


def _model_source(run: Any | None, uri: str, artifact_uri: str, experiment_id: str | None = None,
                  name: str | None = None, version: str | None = None) -> Source:
    if run is not None and _is_train_run(run):
        return Source(run.info.run_id, run.info.experiment_id, uri, name, version)
    exp = run.info.experiment_id if run is not None else (experiment_id or "")
    return Source(run.info.run_id if run is not None else "", exp, uri, name, version,
                  kind="model", artifact_uri=artifact_uri)


def _run_model(run: Any) -> Source:
    """The one MLflow model a run that is not ours logged."""
    if _is_train_run(run):
        return Source(run.info.run_id, run.info.experiment_id, f"runs:/{run.info.run_id}/{LAST_CKPT}")
    rid = run.info.run_id
    try:
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{_q(rid)}'", output_format="list")
    except MlflowException:
        models = []
    if not models:
        raise XAIError(
            f"run {rid} has no {LAST_CKPT} artifact and logged no MLflow model; explain a run logged by "
            "`mlflow-xai train` or one that logged a PyTorch model (mlflow.pytorch.log_model or autolog)"
        )
    if len(models) > 1:
        listed = ", ".join(f"models:/{m.model_id} ({m.name})" for m in models[:6])
        raise XAIError(f"run {rid} logged {len(models)} models; pass one with --model-uri: {listed}")
    return Source(rid, run.info.experiment_id, f"models:/{models[0].model_id}",
                  kind="model", artifact_uri=f"models:/{models[0].model_id}")


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
    apply_http_defaults()
    if run_id and model_uri:
        raise XAIError("pass either --run-id or --model-uri, not both")
    if model_uri:
        return _resolve_uri(model_uri)
    if run_id:
        return _run_model(get_run(run_id))
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
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)(/(?P<path>.*))?$")
_MODELS_ID = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


def _resolve_uri(uri: str) -> Source:
    client = MlflowClient()
    if m := _RUNS.match(uri):
        run = get_run(m["run_id"])
        path = (m["path"] or "").strip("/")
        if _is_train_run(run) or not path:
            return _run_model(run) if not path else Source(run.info.run_id, run.info.experiment_id, uri)
        return _model_source(run, uri, uri)
    if m := _MODELS_ID.match(uri):
        try:
            logged = mlflow.get_logged_model(m["model_id"])
        except MlflowException as exc:
            raise XAIError(f"logged model {m['model_id']!r} does not exist in {tracking_uri()}; check the id") from exc
        run = get_run(logged.source_run_id) if logged.source_run_id else None
        return _model_source(run, uri, uri, experiment_id=logged.experiment_id)
    m = _MODELS_ALIAS.match(uri) or _MODELS_VERSION.match(uri)
    if m is None:
        raise XAIError(
            f"model URI {uri!r} is not supported; use models:/NAME@ALIAS, models:/NAME/VERSION, "
            "models:/MODEL_ID or runs:/RUN_ID/PATH"
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
    run = get_run(mv.run_id) if mv.run_id else None
    return _model_source(run, uri, f"models:/{name}/{mv.version}", name=name, version=str(mv.version))


def local_artifact_path(root: Path, artifact_path: str, owner: str) -> Path:
    """Where ``artifact_path`` (a name from a run, untrusted) lands under ``root``; refuses escapes.

    Absolute paths, drive letters, backslashes, empty and ``.``/``..`` components are
    refused before anything is joined, and the joined path must resolve inside ``root``.
    """
    parts = artifact_path.split("/")
    if (not artifact_path or artifact_path.startswith("/") or "\\" in artifact_path or ":" in artifact_path
            or any(p in ("", ".", "..") for p in parts)):
        raise XAIError(f"artifact path {artifact_path!r} of {owner} is not a plain relative path; refusing it")
    root = root.resolve()
    local = root.joinpath(*parts).resolve()
    if not local.is_relative_to(root):
        raise XAIError(f"artifact path {artifact_path!r} of {owner} escapes the download folder; refusing it")
    return local


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
        # Where MLflow says it wrote the file is checked like any untrusted artifact path: a
        # plain relative path inside the staging folder, and there the checkpoint's base name.
        owner = f"run {source.run_id}"
        landed = local_artifact_path(staging, Path(os.path.relpath(local, staging)).as_posix(), owner)
        if landed != staging.resolve() / Path(LAST_CKPT).name:
            raise XAIError(f"artifact path of {owner} is not where its download should be; refusing it")
        final = dst / "last.ckpt"
        os.replace(local, final)
    except (MlflowException, OSError, ValueError) as exc:
        # OSError covers requests' connection and broken-transfer errors (IOError subclasses).
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XAIError(
            f"downloading {LAST_CKPT} of run {source.run_id} failed ({first[:300]}); "
            "check the tracking server and try again"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, run.data.tags.get(CHECKSUM_TAG), run


def download_model(source: Source, dst: Path) -> Path:
    """Download the MLflow model ``source.artifact_uri`` into a fresh folder inside ``dst``.

    Only files are fetched (the MLmodel YAML, the weights); nothing is loaded here. Where
    MLflow says it put the model is checked like any untrusted artifact path.
    """
    uri = source.artifact_uri or source.model_uri
    staging = Path(tempfile.mkdtemp(dir=dst, prefix=".model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging)))
    except (MlflowException, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XAIError(f"downloading the model {uri} failed ({first[:300]}); check the URI and the tracking server") from exc
    rel = Path(os.path.relpath(local, staging)).as_posix()
    landed = staging.resolve() if rel == "." else local_artifact_path(staging, rel, uri)
    if not landed.is_dir():
        raise XAIError(f"{uri} is a single file, not an MLflow model folder; point at the model (runs:/RUN_ID/model)")
    return landed


def tag_model_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a model version; a ``None`` value removes that tag (a stale one from an earlier job)."""
    client = MlflowClient()
    existing = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if value is None:
            if key in existing:
                client.delete_model_version_tag(name, version, key)
        else:
            client.set_model_version_tag(name, version, key, str(value)[:5000])  # the store's value limit


def lineage_tags(train_run_id: str, config_source_run_id: str | None) -> dict[str, str]:
    """The tags that lead from a model version to its train run and the tuning trial of its config."""
    tags = {TRAIN_RUN_TAG: train_run_id}
    if config_source_run_id:
        tags[CONFIG_SOURCE_TAG] = config_source_run_id
    return tags


def best_run(experiment: str, metric: str, mode: str) -> tuple[Any, int]:
    """The finished run of ``experiment`` with the lowest (``min``) or highest (``max``) ``metric``.

    Runs of mlflow-xai's own jobs (tagged ``mlflow_xai.role``) are not tuning trials and
    are skipped, as are runs without a finite value of the metric. Returns the run and
    how many finished candidates carried the metric.
    """
    import math

    if mode not in ("min", "max"):
        raise XAIError(f"--mode {mode!r} is invalid; use min or max")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise XAIError(f"tuning experiment {experiment!r} does not exist in {tracking_uri()}; check the name "
                       "(MLflow UI or `mlflow experiments search`) and MLFLOW_TRACKING_URI")
    client = MlflowClient()
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs += [r for r in page if ROLE_TAG not in r.data.tags]
        token = page.token
        if not token:
            break
    if not runs:
        raise XAIError(f"tuning experiment {experiment!r} has no finished run; finish a tuning study "
                       "(or pick its best trial with --config-from-run RUN_ID)")
    scored = [r for r in runs if metric in r.data.metrics and math.isfinite(r.data.metrics[metric])]
    if not scored:
        seen = sorted({k for r in runs for k in r.data.metrics})
        raise XAIError(f"no finished run of tuning experiment {experiment!r} has the metric {metric!r}; "
                       f"pass --metric with one of: {', '.join(seen[:12]) or '(no metrics logged)'}")
    sign = 1.0 if mode == "min" else -1.0
    # Ties go to the earliest run, so the choice does not depend on the store's order.
    best = min(scored, key=lambda r: (sign * r.data.metrics[metric], r.info.start_time or 0))
    return best, len(scored)
