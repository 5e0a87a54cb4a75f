"""The one MLflow writer of a training: every metric, tag, image and page, off the training loop.

A :class:`RunWriter` buffers what the training hands it and sends it from one
background thread, in order: metrics and tags go out in ``log_batch`` calls that each
carry whole steps (MLflow takes at most 1000 metrics a call), every
:data:`FLUSH_EVERY_S` seconds or when asked; images and texts as they come. The epoch
metrics (:mod:`mlflow_xai.tracking.epochs`) and the monitor share one writer per run
(:func:`shared_writer`), so a training makes its MLflow calls from one thread and in
as few calls as its steps allow.

The failure policy, the same for every write (``docs/tracking-server.md``):

* a call whose answer was cut off half-way (a server restarted while it answered,
  which MLflow's HTTP retries do not cover) is made again, up to
  :data:`~mlflow_xai.tracking.http.CUT_RETRIES` times (every call here may be repeated:
  a metric logged twice with the same step and timestamp is stored once);
* any other failure (MLflow has already retried a refused or reset connection for
  about two minutes) is kept in :attr:`RunWriter.error`: from then on nothing more is
  sent and training goes on without waiting on the server; what was not sent is kept
  (up to :data:`MAX_UNSENT_METRICS` metrics) and tried once more by
  :meth:`RunWriter.close`, which raises when that last try fails too and it was asked
  to (``mlflow-xai train`` then says where its local files are).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from mlflow_xai.tracking.http import CUT_RETRIES, answer_cut_off

#: Buffered metrics go out at most this many seconds after they were handed over (and
#: when asked, e.g. at an alert, and at the end of training): a sqlite store costs ~25 ms
#: per call plus ~0.2 ms per metric, an HTTP server a round trip per call, so a few large
#: calls are cheapest; whatever is still buffered when training ends is written while
#: ``fit`` waits.
FLUSH_EVERY_S = 2.0
#: MLflow's limit on metrics in one ``log_batch`` call (mlflow.utils.validation).
MAX_METRICS_PER_CALL = 1000
#: Metrics kept for the last try after the store failed; older ones are dropped beyond it.
MAX_UNSENT_METRICS = 200_000


def chunks_by_step(metrics: list[Metric], limit: int = MAX_METRICS_PER_CALL) -> list[list[Metric]]:
    """Split into calls of at most ``limit`` metrics without splitting a step (unless a
    single step alone exceeds the limit: more than 333 layers for the monitor).

    Example:
        >>> from mlflow.entities import Metric
        >>> ms = [Metric("a", 1.0, 0, s) for s in (0, 0, 1, 1, 1, 2)]
        >>> [[m.step for m in c] for c in chunks_by_step(ms, 4)]
        [[0, 0], [1, 1, 1, 2]]
    """
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


@dataclass
class _Job:
    """One MLflow call, kept whole so that it can be made again."""

    send: Callable[[MlflowClient, str], object]
    metrics: int = 0  # how many metrics it carries (what the unsent bound counts)
    kind: str = "batch"  # batch | image | text
    done: threading.Event = field(default_factory=threading.Event)


class RunWriter:
    """One background thread making one run's MLflow calls, in order (see the module docstring).

    Args:
        client: The client of the run's tracking store.
        run_id: The run written to.
        flush_every_s: Seconds buffered metrics may wait (:data:`FLUSH_EVERY_S`).
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.error: BaseException | None = None
        self.dropped = 0  # unsent metrics dropped beyond MAX_UNSENT_METRICS
        # What the writer's thread spent, for a caller's cost budget (the monitor's): CPU
        # seconds (its share of the GIL and the cores) per kind of call, and their count.
        self.cpu_seconds: dict[str, float] = {"batch": 0.0, "image": 0.0, "text": 0.0}
        self.rows = 0  # metrics written
        self.images = 0  # images stored
        self._metrics: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._last_flush = time.monotonic()
        self._unsent: list[_Job] = []
        self._unsent_metrics = 0
        self._lock = threading.Lock()  # the buffer: handed over from any thread
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlflow-xai-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ handing over

    def log(self, metrics: Iterable[Metric] = (), tags: Mapping[str, str] | None = None) -> None:
        """Buffer metrics and tags; they go out at the next due flush (every ``flush_every_s``).

        A flush sends the buffer ordered by step, so that each ``log_batch`` call carries
        whole steps, whoever handed their values over.
        """
        with self._lock:
            self._metrics.extend(metrics)
            if tags:
                self._tags.update(tags)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def log_image(self, image: Any, key: str, step: int, convert: Callable[[Any], Any] | None = None) -> None:
        """Queue one image (a PIL image or an array MLflow takes) as ``images/<key>`` at ``step``.

        ``convert``, if given, is applied to the image on the writer's thread first (the
        monitor's palette conversion).
        """
        self._put(_Job(lambda c, r: c.log_image(r, convert(image) if convert else image, key=key, step=step),
                       kind="image"))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue a text artifact (the training page)."""
        self._put(_Job(lambda c, r: c.log_text(r, text, artifact_file), kind="text"))

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered metrics and tags to the thread now; with ``wait``, until all is sent."""
        with self._lock:
            metrics, tags, self._metrics, self._tags = self._metrics, self._tags, [], {}
            self._last_flush = time.monotonic()
        if metrics or tags:
            metrics.sort(key=lambda m: m.step)  # stable: a step's values together, in the order given
            tag_rows = [RunTag(k, str(v)) for k, v in tags.items()]
            for i, chunk in enumerate(chunks_by_step(metrics) or [[]]):
                self._put(_Job(lambda c, r, m=chunk, t=(tag_rows if i == 0 else []): c.log_batch(r, metrics=m, tags=t),
                               metrics=len(chunk)))
        if wait:
            self._jobs.join()

    def close(self, raise_on_failure: bool = False) -> None:
        """Send everything, then give what failed one more try; end the thread.

        Args:
            raise_on_failure: Raise the last try's error instead of keeping it in
                :attr:`error`.
        """
        self.flush(wait=True)
        self._jobs.put(None)
        self._thread.join()
        self.retry_unsent(raise_on_failure)

    def retry_unsent(self, raise_on_failure: bool = False) -> None:
        """After a failure: try what was not sent once more, in order (on this thread)."""
        if self.error is None:
            return
        while self._unsent:
            job = self._unsent[0]
            try:
                self._send(job)
            except Exception as exc:
                self.error = exc
                if raise_on_failure:
                    raise
                return
            self._unsent.pop(0)
            self._unsent_metrics -= job.metrics
        self.error = None

    # ------------------------------------------------------------------ the thread

    def _put(self, job: _Job) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is not None:
                    self._keep(job)
                    continue
                try:
                    self._send(job)
                except Exception as exc:  # noqa: BLE001 - any store failure: keep it, go on
                    self.error = exc
                    self._keep(job)
            finally:
                self._jobs.task_done()

    def _send(self, job: _Job) -> None:
        started = time.thread_time()
        try:
            for attempt in range(CUT_RETRIES + 1):
                try:
                    job.send(self.client, self.run_id)
                    self.rows += job.metrics
                    self.images += job.kind == "image"
                    return
                except Exception as exc:
                    if attempt == CUT_RETRIES or not answer_cut_off(exc):
                        raise
                    time.sleep(2.0**attempt)
        finally:
            self.cpu_seconds[job.kind] += time.thread_time() - started

    def _keep(self, job: _Job) -> None:
        self._unsent.append(job)
        self._unsent_metrics += job.metrics
        while self._unsent_metrics > MAX_UNSENT_METRICS and len(self._unsent) > 1:
            gone = self._unsent.pop(0)
            self._unsent_metrics -= gone.metrics
            self.dropped += gone.metrics


_SHARED: dict[tuple[str, str], tuple[RunWriter, int]] = {}
_SHARED_LOCK = threading.Lock()


def shared_writer(client: MlflowClient, run_id: str) -> RunWriter:
    """The writer of ``run_id`` in this process, started on first use; pair with :func:`release`.

    The epoch metrics and the monitor of one training ask for the same run and get one
    writer, one thread and batches that carry both.
    """
    key = (str(client.tracking_uri), run_id)
    with _SHARED_LOCK:
        writer, users = _SHARED.get(key, (None, 0))
        if writer is None:
            writer = RunWriter(client, run_id)
        _SHARED[key] = (writer, users + 1)
        return writer


def release(writer: RunWriter, raise_on_failure: bool = False) -> None:
    """Give back a writer from :func:`shared_writer`; the last user closes it (see :meth:`RunWriter.close`).

    A user that is not the last flushes what it handed over and waits until it is sent.
    """
    key = (str(writer.client.tracking_uri), writer.run_id)
    with _SHARED_LOCK:
        held, users = _SHARED.get(key, (None, 0))
        last = held is not writer or users <= 1
        if held is writer:
            if last:
                del _SHARED[key]
            else:
                _SHARED[key] = (writer, users - 1)
    if last:
        writer.close(raise_on_failure)
    else:
        writer.flush(wait=True)
