"""Tuning-run lookups: the best finished trial of a tuning experiment, by one metric."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from mlflow_xai.errors import XAIError
from mlflow_xai.tracking.contract import ROLE_TAG
from mlflow_xai.tracking.http import tracking_uri


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
