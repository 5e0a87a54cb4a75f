"""The one MLflow writer of a training (tracking/writer.py), against a real sqlite store."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from mlflow_xai.tracking import writer as writer_module
from mlflow_xai.tracking.writer import RunWriter, chunks_by_step, release, shared_writer


def _metrics(steps: range, keys: tuple[str, ...]) -> list[Metric]:
    return [Metric(k, float(s), 1_000, s) for s in steps for k in keys]


def test_chunks_never_split_a_step_unless_the_step_alone_is_too_big() -> None:
    metrics = _metrics(range(400), ("a", "b", "c"))  # 1200 metrics, 3 a step
    chunks = chunks_by_step(metrics, 1000)
    assert [len(c) for c in chunks] == [999, 201]
    assert sum(chunks, []) == metrics
    assert not {m.step for m in chunks[0]} & {m.step for m in chunks[1]}
    wide = _metrics(range(2), tuple(f"k{i}" for i in range(7)))  # 7 a step, limit 5
    assert [len(c) for c in chunks_by_step(wide, 5)] == [5, 2, 5, 2]


class _Recording(MlflowClient):
    """A real client of the store that records the steps each log_batch call carried."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.calls: list[tuple[list[int], list[str], str]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):  # type: ignore[override]
        self.calls.append(([m.step for m in metrics], [t.key for t in tags], threading.current_thread().name))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags)


def test_two_users_share_one_writer_and_every_value_lands_once(store: str) -> None:
    client = _Recording(store)
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    epochs, monitor = shared_writer(client, run_id), shared_writer(client, run_id)
    assert epochs is monitor  # one thread, one queue, batches carrying both
    epochs.log(_metrics(range(300), ("train_loss",)))
    monitor.log(_metrics(range(300), ("grad_norm/l0", "weight_norm/l0", "dead_share/l0")), {"mlflow_xai.alert.x": "1"})
    monitor.log_text("<html></html>", "xai/training.html")
    assert client.calls == []  # buffered: nothing sent before a flush is due or asked for
    release(monitor)  # not the last user: flushes and waits, the thread stays
    assert epochs._thread.is_alive() and len(client.calls) >= 2
    epochs.log(_metrics(range(300, 310), ("train_loss",)))
    release(epochs, raise_on_failure=True)  # the last user closes it
    assert not epochs._thread.is_alive() and epochs.error is None
    assert epochs.rows == 1210 and epochs.cpu_seconds["batch"] > 0 and epochs.cpu_seconds["text"] > 0
    assert {name for _, _, name in client.calls} == {"mlflow-xai-writer"}  # off the caller's thread
    assert all(len(steps) <= 1000 for steps, _, _ in client.calls)
    calls_of_step: dict[int, int] = {}
    for steps, _, _ in client.calls:
        for step in set(steps):
            calls_of_step[step] = calls_of_step.get(step, 0) + 1
    assert set(calls_of_step.values()) == {1}  # a step's values, from both users, in one call
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(310))
    assert len(client.get_metric_history(run_id, "dead_share/l0")) == 300
    run = client.get_run(run_id)
    assert run.data.tags["mlflow_xai.alert.x"] == "1"
    assert [f.path for f in client.list_artifacts(run_id, "xai")] == ["xai/training.html"]
    assert shared_writer(client, run_id) is not epochs  # a closed writer is not handed out again
    release(shared_writer(client, run_id))


def test_a_failed_store_keeps_what_was_not_sent_and_the_last_try_sends_it(
        store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    failing = {"on": True}
    real = client.log_batch

    def log_batch(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failing["on"]:
            raise OSError("disk I/O error")  # what a sqlite store on a full disk raises
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "log_batch", log_batch)
    monkeypatch.setattr(writer_module, "MAX_UNSENT_METRICS", 250)
    writer = RunWriter(client, run_id)
    writer.log(_metrics(range(100), ("a",)))
    writer.flush(wait=True)
    assert isinstance(writer.error, OSError)
    writer.log(_metrics(range(100, 300), ("a",)))
    writer.flush(wait=True)  # not tried: the store already failed, training does not wait on it
    assert writer.dropped == 100  # the oldest call beyond the bound
    with pytest.raises(OSError):
        writer.retry_unsent(raise_on_failure=True)
    failing["on"] = False
    writer.close(raise_on_failure=True)
    assert writer.error is None
    assert [m.step for m in client.get_metric_history(run_id, "a")] == list(range(100, 300))


def test_a_bug_in_the_caller_is_not_retried_as_a_cut_answer(store: str) -> None:
    client = MlflowClient(store)
    writer = RunWriter(client, "no-such-run")
    writer.log(_metrics(range(3), ("a",)))
    started = time.monotonic()
    writer.close()
    assert writer.error is not None and "no-such-run" in str(writer.error)
    assert writer.rows == 0
    assert time.monotonic() - started < 3.0  # no resends 1, 2 and 4 s apart
