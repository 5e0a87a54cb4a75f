"""Where the monitor's numbers and images go: one sink per backend (MLflow, TensorBoard).

Each sink takes flat values (a step's metrics as a dict, histogram rows per kind) and
makes the backend's calls; the callback never calls a backend itself.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from mlflow_xai.errors import XAIError
from mlflow_xai.monitor.render import HistRow, paletted
from mlflow_xai.monitor.schedule import ROW_COST_GUESS
from mlflow_xai.tracking.writer import FLUSH_EVERY_S, release, shared_writer

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from PIL.Image import Image as PILImage

__all__ = [
    "MlflowSink",
    "TensorBoardSink",
    "current_tracking_uri",
    "metric_key",
    "resolve_run",
]

# Characters MLflow accepts in a metric name; others in a layer name become "_".
_BAD_METRIC_CHARS = re.compile(r"[^/\w.\- ]")


def metric_key(name: str) -> str:
    """A layer name as MLflow accepts it in a metric key.

    Example:
        >>> metric_key("blocks.0:attn")
        'blocks.0_attn'
    """
    return _BAD_METRIC_CHARS.sub("_", name)


def current_tracking_uri() -> str:
    """``mlflow.get_tracking_uri()``, read in this process (spawned DDP ranks inherit it)."""
    import mlflow

    return mlflow.get_tracking_uri()


def resolve_run(trainer: Trainer, run_id: str | None, tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """The client and run the monitor logs to: ``run_id``, else the active run, else the
    run of an ``MLFlowLogger`` in ``trainer.loggers``.

    Raises:
        XAIError: No run to log to, or the run does not exist or is deleted.
    """
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.exceptions import MlflowException

    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id) and (
        tracking_uri is None or tracking_uri == mlflow.get_tracking_uri()
    ):
        # The active run exists and is running: MLflow checked that when it started it.
        return mlflow.MlflowClient(), active.info.run_id
    if run_id is not None:
        client, where = mlflow.MlflowClient(tracking_uri), "run_id"
    else:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is None:
            raise XAIError(
                "XAIMonitor has no MLflow run to log to: pass XAIMonitor(run_id=...), "
                "train inside `with mlflow.start_run():`, or add an MLFlowLogger to the "
                "Trainer's loggers"
            )
        client, run_id, where = logger.experiment, str(logger.run_id), "the MLFlowLogger's run"
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise XAIError(
            f"XAIMonitor cannot use {where} {run_id!r} at {client.tracking_uri!r}: "
            f"{(str(e).splitlines() or [''])[0]}; pass the id of an existing run and its "
            "tracking_uri"
        ) from e
    if run.info.lifecycle_stage != "active":
        raise XAIError(
            f"XAIMonitor cannot log to run {run_id!r}: it is {run.info.lifecycle_stage}; "
            "restore it with MlflowClient().restore_run(run_id) or use another run"
        )
    return client, run_id


class MlflowSink:
    """The monitor's side of the run's one writer (:mod:`mlflow_xai.tracking.writer`).

    The monitor buffers its rows here until a step is whole (an epoch end's rows wait
    for the next batch's measurement of the same step), then hands them to the run's
    :class:`~mlflow_xai.tracking.writer.RunWriter`, which it shares with the epoch
    metrics of ``mlflow-xai train``: one thread makes every MLflow call of the training,
    in ``log_batch`` calls that each carry whole steps, every :data:`FLUSH_EVERY_S`
    seconds, when an alert fires, and when training ends. The writer's failure policy
    is the monitor's: a cut-off answer is sent again; after any other failure nothing
    more is sent while training (warned about once), and what was not sent is tried once
    more when the fit ends.
    """

    def __init__(self, client: MlflowClient, run_id: str, warning: type[Warning] = UserWarning) -> None:
        self.client, self.run_id = client, run_id
        self.writer = shared_writer(client, run_id)
        self._warning = warning
        self._warned = False
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._last_flush = time.monotonic()

    @property
    def error(self) -> BaseException | None:
        """The writer's failure, if the store failed (then images are no longer drawn)."""
        return self.writer.error

    # --------------------------------------------------------------- buffer

    def add_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Buffer one step's metrics (written at the next flush)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, v, now, step) for k, v in values.items())

    def add_tags(self, tags: Mapping[str, str]) -> None:
        """Buffer run tags (written with the next flush's first call)."""
        self._tags.update(tags)

    def flush_if_due(self) -> None:
        """Hand the buffer to the writer when :data:`FLUSH_EVERY_S` have passed since the last flush."""
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics and tags to the writer and send; by default wait until written."""
        self._last_flush = time.monotonic()
        buffer, tags, self._buffer, self._tags = self._buffer, self._tags, [], {}
        self.writer.log(buffer, tags)
        self.writer.flush(wait=wait)
        self.warn_failure()

    def row_cost(self) -> float:
        """CPU seconds the writer spends per metric row (calls included), as measured once
        a few hundred rows were written, else ``ROW_COST_GUESS``."""
        rows = self.writer.rows
        return self.writer.cpu_seconds["batch"] / rows if rows >= 200 else ROW_COST_GUESS

    def image_cost(self) -> float:
        """CPU seconds the writer spends per image (encoding, storing); 0 before the first."""
        images = self.writer.images
        return self.writer.cpu_seconds["image"] / images if images else 0.0

    # ----------------------------------------------------------- artifacts

    def log_image(self, image: PILImage, key: str, step: int) -> None:
        """Store ``image`` (a :func:`~mlflow_xai.monitor.render.render_grid` drawing) as a
        palette PNG under ``key`` at ``step``, converted and stored on the writer thread."""
        self.writer.log_image(image, key, step, convert=paletted)

    def log_text(self, text: str, path: str) -> None:
        """Store ``text`` as the artifact ``path``, on the writer thread."""
        self.writer.log_text(text, path)

    def warn_failure(self) -> None:
        """Warn once that the store failed and logging stopped (training goes on)."""
        error = self.writer.error
        if error is not None and not self._warned:
            self._warned = True
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            warnings.warn(f"XAIMonitor stopped logging to MLflow run {self.run_id}: {first_line} (what was not "
                          "sent is tried once more when the fit ends)", self._warning, stacklevel=4)

    def close(self) -> None:
        """Write what was handed over and give the writer back (its last user ends it);
        warn about a failure."""
        self.flush(wait=False)
        release(self.writer)
        self.warn_failure()


class TensorBoardSink:
    """The histograms in every ``TensorBoardLogger`` of a trainer, as
    ``weights/<layer>``, ``gradients/<layer>``, ``activations/<layer>``."""

    def __init__(self, trainer: Trainer) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        self._writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def log_histograms(self, kinds: Mapping[str, tuple[list[str], np.ndarray]], step: int) -> None:
        for kind, (names, rows) in kinds.items():
            for name, row in zip(names, rows, strict=False):
                h = HistRow(row)
                if h.n_finite == 0:
                    continue  # TensorBoard refuses an empty histogram
                for writer in self._writers:
                    # The raw form takes the counts binned on the device: add_histogram would
                    # copy the whole tensor to the host and bin it again in numpy.
                    writer.add_histogram_raw(
                        f"{kind}/{name}",
                        min=h.lo,
                        max=h.hi,
                        num=h.n_finite,
                        sum=h.total,
                        sum_squares=h.sum_squares,
                        bucket_limits=h.edges[1:].tolist(),
                        bucket_counts=h.counts.tolist(),
                        global_step=step,
                    )
