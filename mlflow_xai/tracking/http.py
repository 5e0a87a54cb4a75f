"""Talking to a tracking server: MLflow's HTTP settings, and what a server that went away looks like.

mlflow-xai sets MLflow's HTTP retry settings where the user did not, recognizes a
failure that is the server not answering (as opposed to a refusal of the request), and
turns one into a single line that says what was kept locally and how to upload it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from mlflow_xai.errors import XAIError


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
def short_http_budget() -> Iterator[None]:
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


def cause(exc: BaseException) -> str:
    """A few words for why the server did not answer, instead of MLflow's long request dump."""
    text = str(exc)
    for needle, words in _CAUSES:
        if needle in text:
            return f"{words}, after {os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '?')} retries"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def unreachable_error(exc: BaseException, run_id: str) -> ServerUnreachable:
    uri, first = tracking_uri(), cause(exc)
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




#: Times a call is made again after its answer was cut off half-way (1, 2, 4 s apart);
#: each try has MLflow's own retries for a refused or reset connection.
CUT_RETRIES = 3


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
