"""The names mlflow-xai gives things in MLflow: its tags, the checkpoint's path, the default experiment.

The whole contract (artifacts, metrics, tags) is in ``docs/mlflow-contract.md``; these
are the names the jobs read back.
"""

from __future__ import annotations

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


def quoted(value: str) -> str:
    """``value`` inside a single-quoted MLflow filter string, its quotes backslash-escaped.

    MLflow's ids hold no quote; the escape keeps a malformed one from ending the string
    early. (A name with a quote cannot be matched this way: compare names after the
    search, as :func:`~mlflow_xai.tracking.registry.latest_version` does.)
    """
    return value.replace("'", "\\'")
