"""Which model an explanation is about, and fetching it: run ids, model URIs, checkpoint downloads.

Every artifact path a run hands back is untrusted: it is checked to be a plain relative
path that lands inside the download folder before anything is joined or moved, and a
checkpoint is downloaded to a staging folder and moved into place only when complete
(its sha256 tag is returned for the caller to check).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_xai.errors import XAIError
from mlflow_xai.tracking.contract import CHECKSUM_TAG, LAST_CKPT, ROLE_TAG, quoted
from mlflow_xai.tracking.http import apply_http_defaults, tracking_uri
from mlflow_xai.tracking.runs import default_experiment, get_run


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
                                             filter_string=f"source_run_id = '{quoted(rid)}'", output_format="list")
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
