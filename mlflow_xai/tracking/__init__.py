"""The jobs' MLflow side, a module per concern.

* :mod:`~mlflow_xai.tracking.contract`: the names mlflow-xai gives things in MLflow;
* :mod:`~mlflow_xai.tracking.http`: HTTP settings, and a server that went away;
* :mod:`~mlflow_xai.tracking.runs`: opening, logging into and ending a job's run;
* :mod:`~mlflow_xai.tracking.writer`: the one buffered writer of a training (epoch
  metrics and the monitor alike);
* :mod:`~mlflow_xai.tracking.epochs`: the per-epoch losses (a Lightning callback);
* :mod:`~mlflow_xai.tracking.sources`: which model to explain, and downloading it;
* :mod:`~mlflow_xai.tracking.registry`: the logged model, registered versions, aliases;
* :mod:`~mlflow_xai.tracking.tuning`: the best trial of a tuning experiment.

The jobs import this package and call ``tracking.<name>``; the evaluator logs through
the run MLflow hands it, and ``sources/`` reads a model's ``MLmodel`` file
(``tests/test_layering.py`` lists who may import mlflow). Lightning is imported only by
:mod:`~mlflow_xai.tracking.epochs`, on first use of :func:`epoch_metrics_callback`.
"""

from __future__ import annotations

from typing import Any

from mlflow_xai.tracking.contract import (
    CHECKSUM_TAG,
    CONFIG_SOURCE_TAG,
    DEFAULT_EXPERIMENT,
    ERROR_TAG,
    EXPLAIN_RUN_TAG,
    LAST_CKPT,
    ROLE_TAG,
    SOURCE_RUN_TAG,
    SOURCE_URI_TAG,
    TRAIN_RUN_TAG,
)
from mlflow_xai.tracking.http import (
    HTTP_DEFAULTS,
    ServerUnreachable,
    answer_cut_off,
    apply_http_defaults,
    is_unreachable,
    keep_local_results,
    tracking_uri,
)
from mlflow_xai.tracking.registry import (
    latest_version,
    lineage_tags,
    log_pytorch_model,
    set_alias,
    tag_model_version,
)
from mlflow_xai.tracking.runs import (
    WORKER_RUN_ENV,
    default_experiment,
    distributed_rank,
    get_run,
    log_artifact,
    log_artifacts,
    log_metrics,
    log_params,
    log_text,
    run_context,
    set_tags,
)
from mlflow_xai.tracking.sources import (
    Source,
    download_checkpoint,
    download_model,
    local_artifact_path,
    resolve_source,
)
from mlflow_xai.tracking.tuning import best_run

__all__ = [
    "CHECKSUM_TAG", "CONFIG_SOURCE_TAG", "DEFAULT_EXPERIMENT", "ERROR_TAG", "EXPLAIN_RUN_TAG", "HTTP_DEFAULTS",
    "LAST_CKPT", "ROLE_TAG", "SOURCE_RUN_TAG", "SOURCE_URI_TAG", "TRAIN_RUN_TAG", "WORKER_RUN_ENV",
    "ServerUnreachable", "Source", "answer_cut_off", "apply_http_defaults", "best_run", "default_experiment",
    "distributed_rank", "download_checkpoint", "download_model", "epoch_metrics_callback", "get_run",
    "is_unreachable", "keep_local_results", "latest_version", "lineage_tags", "local_artifact_path",
    "log_artifact", "log_artifacts", "log_metrics", "log_params", "log_pytorch_model", "log_text",
    "resolve_source", "run_context", "set_alias", "set_tags", "tag_model_version", "tracking_uri",
]


def __getattr__(name: str) -> Any:
    # The epoch metrics are a Lightning callback: imported when train asks, not by explain.
    if name == "epoch_metrics_callback":
        from mlflow_xai.tracking.epochs import epoch_metrics_callback

        return epoch_metrics_callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
