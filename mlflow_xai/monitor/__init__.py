"""The training monitor: the :class:`XAIMonitor` Lightning callback and its parts.

Each part is a job a reader can name:

* :mod:`~mlflow_xai.monitor.callback`: ``XAIMonitor``, Lightning's hooks only; it
  delegates every decision and every computation to the parts below;
* :mod:`~mlflow_xai.monitor.measure`: what is measured on the training device (norms,
  activation moments, alive units, histogram rows), with :mod:`mlflow_xai.inspect`'s rules;
* :mod:`~mlflow_xai.monitor.alerts`: the alert rules, pure (values in, events out);
* :mod:`~mlflow_xai.monitor.schedule`: when to measure, pure (epochs and costs in,
  decisions out);
* :mod:`~mlflow_xai.monitor.render`: the stepped histogram images, drawn with Pillow;
* :mod:`~mlflow_xai.monitor.sinks`: where it all goes, one sink per backend (MLflow,
  TensorBoard).

What reaches the run (metrics, images, tags, ``xai/training.html``) is documented in
:mod:`mlflow_xai.monitor.callback` and ``docs/monitor.md``.
"""

from __future__ import annotations

from mlflow_xai.monitor.alerts import (
    ALERT_KINDS,
    DEAD_SHARE_ALERT,
    EXPLODING_FACTOR,
    EXPLODING_GRAD_NORM,
    HISTORY_LENGTH,
    HISTORY_MIN,
    VANISHING_GRAD_NORM,
)
from mlflow_xai.monitor.callback import TRAINING_PAGE_PATH, XAIMonitor, XAIMonitorWarning
from mlflow_xai.monitor.measure import HISTOGRAM_BINS, hist_rows
from mlflow_xai.monitor.render import paletted, render_grid
from mlflow_xai.monitor.schedule import BUDGET, HISTOGRAM_BUDGET, HISTOGRAM_SNAPSHOTS
from mlflow_xai.tracking.http import answer_cut_off
from mlflow_xai.tracking.writer import FLUSH_EVERY_S, chunks_by_step

# The names these helpers had when the monitor was one module (tests and notebooks use them).
_chunks_by_step = chunks_by_step
_hist_rows = hist_rows
_paletted = paletted
_render_grid = render_grid

__all__ = [
    "ALERT_KINDS",
    "BUDGET",
    "DEAD_SHARE_ALERT",
    "EXPLODING_FACTOR",
    "EXPLODING_GRAD_NORM",
    "FLUSH_EVERY_S",
    "HISTOGRAM_BINS",
    "HISTOGRAM_BUDGET",
    "HISTOGRAM_SNAPSHOTS",
    "HISTORY_LENGTH",
    "HISTORY_MIN",
    "TRAINING_PAGE_PATH",
    "VANISHING_GRAD_NORM",
    "XAIMonitor",
    "XAIMonitorWarning",
    "answer_cut_off",
]
