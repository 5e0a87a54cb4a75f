"""Where the monitor's numbers and images go: one sink per backend (MLflow, TensorBoard).

Each sink takes flat values (a step's metrics as a dict, histogram rows per kind) and
makes the backend's calls; the callback never calls a backend itself.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow_xai.errors import XAIError
from mlflow_xai.monitor.render import HistRow, paletted
from mlflow_xai.monitor.schedule import ROW_COST_GUESS

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from PIL.Image import Image as PILImage

__all__ = [
    "CUT_RETRIES",
    "FLUSH_EVERY_S",
    "MAX_METRICS_PER_CALL",
    "MlflowSink",
    "TensorBoardSink",
    "answer_cut_off",
    "chunks_by_step",
    "current_tracking_uri",
    "metric_key",
    "resolve_run",
]

#: Buffered metrics go out at most this many seconds after they were measured (and at
#: alerts and at the end of training): a sqlite store costs ~25 ms per call plus ~0.2 ms
#: per metric, an HTTP server a round trip per call, so a few large calls are cheapest.
#: Not fewer: a tracking server writes a batch while training goes on, but whatever is
#: still buffered when training ends is written while ``fit`` waits.
FLUSH_EVERY_S = 2.0
#: Times a writer call is made again after its answer was cut off half-way (1, 2, 4 s
#: apart); each try has MLflow's own retries for a refused or reset connection.
CUT_RETRIES = 3
#: MLflow's limit on metrics in one log_batch call (mlflow.utils.validation).
MAX_METRICS_PER_CALL = 1000
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
    """The monitor's MLflow transport: a buffer of whole steps and one writer thread.

    Metrics are buffered and written with ``log_batch`` calls that each carry whole
    steps (never one call per metric), every :data:`FLUSH_EVERY_S` seconds, when an
    alert fires, and when training ends. The calls run in order on one daemon thread,
    so a slow or remote tracking server does not stall training. (MLflow's own
    ``log_batch(..., synchronous=False)`` queues per call, without the images, the page
    or the retry below, and without a way to wait for one run's writes alone.)

    A call whose answer was cut off half-way (the server went away while answering,
    which MLflow's HTTP retries do not cover) is made again, up to :data:`CUT_RETRIES`
    times: every call the monitor makes may be repeated (a metric logged twice with the
    same step and timestamp is stored once). Any other failure, or one that outlasts the
    retries, is kept (and later calls dropped) and warned about once: a broken tracking
    store must not stop a training.
    """

    def __init__(self, client: MlflowClient, run_id: str, warning: type[Warning] = UserWarning) -> None:
        self.client, self.run_id = client, run_id
        self.error: BaseException | None = None
        # CPU seconds of the writer thread (its share of the GIL and the cores), for the budget:
        self._rows, self._row_cpu = 0, 0.0  # metric rows written, and what their calls took
        self._images, self._image_cpu = 0, 0.0  # images stored, and what that took
        self._warning = warning
        self._warned = False
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="XAIMonitor-writer", daemon=True)
        self._thread.start()

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
        """Hand the buffered metrics and tags to the writer; by default wait until written.

        Each ``log_batch`` call carries whole steps (up to MLflow's 1000 metrics per
        call), so a step's metrics never straddle two calls.
        """
        self._last_flush = time.monotonic()
        if self._buffer or self._tags:
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in self._tags.items()]
            for i, chunk in enumerate(chunks_by_step(self._buffer, MAX_METRICS_PER_CALL) or [[]]):
                self._submit(lambda c=chunk, t=(tags if i == 0 else []): self._log_batch(c, t))
            self._buffer, self._tags = [], {}
        if wait:
            self._jobs.join()
        self.warn_failure()

    def _log_batch(self, metrics: list[Metric], tags: list[Any]) -> None:
        started = time.thread_time()
        try:
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        finally:
            self._row_cpu += time.thread_time() - started
            self._rows += len(metrics)

    def row_cost(self) -> float:
        """CPU seconds the writer spends per metric row (calls included), as measured once
        a few hundred rows were written, else ``ROW_COST_GUESS``."""
        return self._row_cpu / self._rows if self._rows >= 200 else ROW_COST_GUESS

    def image_cost(self) -> float:
        """CPU seconds the writer spends per image (encoding, storing); 0 before the first."""
        return self._image_cpu / self._images if self._images else 0.0

    # ----------------------------------------------------------- artifacts

    def log_image(self, image: PILImage, key: str, step: int) -> None:
        """Store ``image`` (a :func:`~mlflow_xai.monitor.render.render_grid` drawing) as a
        palette PNG under ``key`` at ``step``, on the writer thread."""
        self._submit(lambda: self._store_image(image, key, step))

    def _store_image(self, image: PILImage, key: str, step: int) -> None:
        started = time.thread_time()
        try:
            self.client.log_image(self.run_id, paletted(image), key=key, step=step)
        finally:
            self._image_cpu += time.thread_time() - started
            self._images += 1

    def log_text(self, text: str, path: str) -> None:
        """Store ``text`` as the artifact ``path``, on the writer thread."""
        self._submit(lambda: self.client.log_text(self.run_id, text, path))

    # --------------------------------------------------------------- thread

    def _submit(self, job: Callable[[], object]) -> None:
        if self.error is None:
            self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    self._run(job)
            except Exception as e:  # noqa: BLE001 - any store failure: keep it, go on
                self.error = e
            finally:
                self._jobs.task_done()

    @staticmethod
    def _run(job: Callable[[], object]) -> None:
        for attempt in range(CUT_RETRIES + 1):
            try:
                job()
                return
            except Exception as e:
                if attempt == CUT_RETRIES or not answer_cut_off(e):
                    raise
                time.sleep(2.0**attempt)

    def warn_failure(self) -> None:
        """Warn once that the store failed and logging stopped (training goes on)."""
        if self.error is not None and not self._warned:
            self._warned = True
            first_line = (str(self.error).splitlines() or [type(self.error).__name__])[0]
            warnings.warn(f"XAIMonitor stopped logging to MLflow run {self.run_id}: {first_line}",
                          self._warning, stacklevel=4)

    def close(self) -> None:
        """Write what was handed over, stop the thread, warn about a failure."""
        self._jobs.put(None)
        self._thread.join()
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


def chunks_by_step(metrics: list[Metric], limit: int) -> list[list[Metric]]:
    """Split into calls of at most ``limit`` metrics without splitting a step (unless a
    single step alone exceeds the limit: more than 333 layers)."""
    chunks: list[list[Metric]] = []
    current: list[Metric] = []
    i = 0
    while i < len(metrics):
        j = i
        while j < len(metrics) and metrics[j].step == metrics[i].step:
            j += 1
        block = metrics[i:j]
        if current and len(current) + len(block) > limit:
            chunks.append(current)
            current = []
        while len(block) > limit:
            chunks.append(block[:limit])
            block = block[limit:]
        current.extend(block)
        i = j
    if current:
        chunks.append(current)
    return chunks


def answer_cut_off(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server's answer broke off half-way.

    MLflow's HTTP client retries a refused or reset connection itself (and then says
    "Max retries exceeded"), but not an answer cut off after it began, as when a server
    is restarted while it answers: that shows as a broken transfer in the chain of
    causes of the ``MlflowException``.
    """
    import requests
    from urllib3.exceptions import MaxRetryError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.exceptions.ChunkedEncodingError):
            return True
        if isinstance(seen, requests.exceptions.ConnectionError):
            return not any(isinstance(a, MaxRetryError) for a in seen.args)
        seen = seen.__cause__ or seen.__context__
    return False
