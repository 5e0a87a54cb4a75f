"""Faults against a real ``mlflow server``: a server that restarts, one that is gone, a broken download.

Short HTTP timeouts and retries come from the environment (a user's own values win over
mlflow-xai's defaults, see tracking.HTTP_DEFAULTS), so each case takes seconds. The
restart and gone-for-good cases stop the session's server (and leave it running again);
the download case puts a breaking proxy in front of it.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from mlflow_xai.errors import XAIError
from tests.mlflow_server import MLFLOW, MlflowServer, snapshot, use_server

pytestmark = pytest.mark.server

# Long enough to stop the server after the first checkpoint and still be training.
LONG_CONFIG = {"l1": 1, "epochs": 20, "patience": 20, "batch_size": 8}


@pytest.fixture
def own_server(mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The session's server, for a test that stops it; running again (same store and port) afterwards."""
    try:
        yield mlflow_server
    finally:
        if not mlflow_server.healthy():
            mlflow_server.stop()
            mlflow_server.start()


def _when_training(work: Path, action: Any) -> threading.Thread:
    """Run ``action`` once the first checkpoint is on disk (training under way), in a thread."""
    def wait_then_act() -> None:
        deadline = time.monotonic() + 120
        while not list(work.glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def test_server_restarted_within_the_retry_window_loses_nothing(
        own_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_xai.jobs.train import train_and_log

    use_server(monkeypatch, own_server.uri, tmp_path)
    # Retries 0, 2, 4, 8, 16, 32 s apart: a window of about a minute for a ~10 s restart.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    outage: dict[str, float] = {}

    def restart() -> None:
        outage["down"] = time.monotonic()
        own_server.kill()
        time.sleep(1.0)
        own_server.start()
        outage["up"] = time.monotonic()

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(LONG_CONFIG))
    thread = _when_training(tmp_path / "work", restart)
    out = train_and_log(cfg, monitor_every_n_steps=10, quiet=True)
    finished = time.monotonic()
    thread.join(timeout=120)
    assert "down" in outage and "up" in outage and outage["down"] < finished  # the outage hit the job

    client = MlflowClient(own_server.uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    epochs = int(run.data.metrics["epochs_run"])
    for key in ("train_loss", "val_loss"):
        assert [m.step for m in client.get_metric_history(out.run_id, key)] == list(range(epochs)), key
    assert {"test_loss", "test_rmse", "test_mae", "test_r2"} <= set(run.data.metrics)
    grad_steps = [m.step for m in client.get_metric_history(out.run_id, "grad_norm/layers.0")]
    assert grad_steps == sorted(set(grad_steps)) and grad_steps[-1] >= (epochs - 1) * 17  # to the last epoch
    arts = snapshot(client, out.run_id)["artifacts"]
    assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= arts
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in arts)
    local = tmp_path / "work" / out.run_id / "checkpoints" / "last.ckpt"
    assert run.data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(local)
    assert own_server.log.read_text().count("Started server process") >= 2  # it did restart


def test_the_monitor_sends_again_a_call_whose_answer_was_cut_off(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server restarted while it answers cuts the answer off; MLflow's retries do not cover that."""
    from mlflow_xai.monitor import XAIMonitor, XAIMonitorWarning
    from tests.test_monitor import TinyNet, loader, trainer

    use_server(monkeypatch, mlflow_server.uri, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"cut-{tmp_path.name}")).info.run_id
    with BreakingProxy(mlflow_server.uri, "cut", method="POST", target="/runs/log-batch", times=2) as proxy:
        monitor = XAIMonitor(run_id=run_id, tracking_uri=proxy.uri, log_every_n_steps=1, histogram_every_n_epochs=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", XAIMonitorWarning)  # "stopped logging" would fail the fit
            warnings.filterwarnings("ignore", module="lightning")
            trainer(monitor, epochs=3).fit(TinyNet(), loader())
    assert proxy.broken == 2  # both cut answers were sent again (the store had already written them)
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm/net.0")] == list(range(12))  # each once
    images = {Path(f.path).name for f in client.list_artifacts(run_id, "images")}
    assert {key for key in ("xai_weights", "xai_gradients", "xai_activations")
            if any(name.startswith(key) for name in images)} == {"xai_weights", "xai_gradients", "xai_activations"}


def test_the_writer_keeps_what_a_dead_server_missed_and_sends_it_when_back(
        own_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server gone longer than MLflow's retries: nothing more is tried until the end, then all of it lands."""
    from mlflow.entities import Metric

    from mlflow_xai.tracking.writer import RunWriter

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    client = MlflowClient(own_server.uri)
    run_id = client.create_run(client.create_experiment(f"gone-{time.time_ns()}")).info.run_id
    writer = RunWriter(client, run_id)
    writer.log([Metric("loss", 1.0, 1000, 0)])
    writer.flush(wait=True)
    own_server.kill()
    for step in range(1, 40):
        writer.log([Metric("loss", float(step), 1000, step)], {"mlflow_xai.alert.nan": "true"} if step == 7 else None)
        writer.flush(wait=True)
    assert writer.error is not None  # the first call failed; the next 38 were kept, not tried
    own_server.start()
    writer.close(raise_on_failure=True)
    assert writer.error is None
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(40))
    assert client.get_run(run_id).data.tags["mlflow_xai.alert.nan"] == "true"


def test_an_error_that_is_not_a_cut_off_answer_is_not_sent_again() -> None:
    import requests
    from mlflow.exceptions import MlflowException
    from urllib3.exceptions import MaxRetryError

    from mlflow_xai.monitor import answer_cut_off

    def raised(inner: BaseException) -> MlflowException:
        outer = MlflowException(f"API request failed with exception {inner}")
        outer.__context__ = inner  # as mlflow's http_request raises it, inside its `except`
        return outer

    assert answer_cut_off(raised(requests.exceptions.ChunkedEncodingError("IncompleteRead")))
    assert answer_cut_off(raised(requests.exceptions.ConnectionError("Connection aborted.")))
    assert not answer_cut_off(raised(requests.exceptions.ConnectionError(MaxRetryError(None, "/x", "refused"))))
    assert not answer_cut_off(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))
    assert not answer_cut_off(ValueError("a bug in a job"))


def test_server_gone_for_good_keeps_everything_local_and_says_how_to_upload(
        own_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mlflow_xai.cli import main

    use_server(monkeypatch, own_server.uri, tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    (tmp_path / "cfg.json").write_text(json.dumps(LONG_CONFIG))
    thread = _when_training(tmp_path / "work", own_server.kill)
    try:
        result = CliRunner().invoke(main, ["train", "--quiet", "--config", "cfg.json"])
    finally:
        thread.join(timeout=60)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("mlflow-xai: error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    line = errors[0]
    match = re.search(r"of run ([0-9a-f]{32}) are in (\S+); upload them when the server is back with `(.+)`$", line)
    assert match and "stopped answering" in line, line
    run_id, local = match[1], Path(match[2])
    assert local == (tmp_path / "work" / run_id).resolve()
    assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= {
        str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert list(local.glob("tensorboard/events.out.tfevents*"))

    # Back up: what was logged before the server went is still there, and the printed
    # command uploads the rest into the same run.
    own_server.start()
    client = MlflowClient(own_server.uri)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow_xai.role"] == "train"
    assert run.data.params["epochs"] == str(LONG_CONFIG["epochs"]) and run.data.params["data"] == "diabetes"
    env_part, command = match[3].split(" ", 1)
    argv = shlex.split(command)
    assert argv[:3] == ["mlflow", "artifacts", "log-artifacts"]
    upload = subprocess.run([str(MLFLOW), *argv[1:]], env={**_plain_env(), env_part.split("=")[0]:
                                                            env_part.split("=", 1)[1]},
                            capture_output=True, text=True, timeout=120)
    assert upload.returncode == 0, upload.stderr[-2000:]
    arts = snapshot(client, run_id)["artifacts"]
    assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= arts
    assert any(a.startswith("tensorboard/events.out.tfevents") for a in arts)


def _plain_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}


# ------------------------------------------------------------- broken downloads

class BreakingProxy:
    """Forwards every request to ``upstream``; a GET of a ``last.ckpt`` artifact gets half its bytes.

    ``method``/``target`` choose other requests to break (the path's ending), ``times`` only
    the first so many of them (each after the server has done what was asked).

    ``mode="cut"``: the full Content-Length is announced, half the body sent, the connection closed
    (the client sees a broken transfer). ``mode="intact"``: passed through unchanged. ``mode="short"``: no Content-Length, half the body, then
    close (a shorter file that looks complete). ``mode="garble"``: the full length, second half zeros.
    """

    def __init__(self, upstream: str, mode: str, method: str = "GET", target: str = "/last.ckpt",
                 times: int | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.mode, self.method, self.target, self.times = mode, method, target, times
        self.broken = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                # The file itself, not a listing whose query names it.
                with lock:
                    breaking = (self.command == proxy.method and resp.status == 200
                                and urlsplit(self.path).path.endswith(proxy.target)
                                and proxy.mode != "intact"
                                and (proxy.times is None or proxy.broken < proxy.times))
                    proxy.broken += breaking
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if breaking and proxy.mode == "garble":
                    # Same length, second half zeroed: a transfer corrupted on the way.
                    data = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
                elif breaking:
                    if proxy.mode == "cut":
                        self.send_header("Content-Length", str(len(data)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BreakingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("mode", "expect"), [
    ("cut", "downloading checkpoints/last.ckpt of run .* failed"),      # the transfer breaks half-way
    ("short", "does not match its recorded sha256"),                    # half the file, ends as if complete
    ("garble", "does not match its recorded sha256"),                   # full length, second half zeros
])
def test_a_broken_download_is_never_loaded(mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, mode: str, expect: str) -> None:
    import mlflow_xai.checkpoint as checkpoint
    from mlflow_xai.jobs.explain import explain_and_log

    loads: list[Path] = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k))
    with BreakingProxy(mlflow_server.uri, mode) as proxy:
        use_server(monkeypatch, proxy.uri, tmp_path)
        with pytest.raises(XAIError, match=expect) as caught:
            explain_and_log(run_id=served["train_run_id"], attributions="none", quiet=True)
    assert proxy.broken >= 1 and loads == []
    assert "\n" not in str(caught.value)
    client = MlflowClient(mlflow_server.uri)
    failed = client.search_runs([client.get_run(served["train_run_id"]).info.experiment_id],
                                filter_string="tags.`mlflow_xai.role` = 'explain' and attributes.status = 'FAILED'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert failed and re.search(expect, failed[0].data.tags["mlflow_xai.error"])
    assert snapshot(client, served["train_run_id"]) == served["train_before"]


def test_the_load_spy_above_sees_an_intact_download(mlflow_server: MlflowServer, served: dict[str, Any],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The broken-download test asserts the spy saw no load: through the same proxy, with
    # nothing broken, the same spy sees the one load, so that assertion can fail.
    import mlflow_xai.checkpoint as checkpoint
    from mlflow_xai.jobs.explain import explain_and_log

    loads: list[Path] = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k))
    with BreakingProxy(mlflow_server.uri, "intact") as proxy:
        use_server(monkeypatch, proxy.uri, tmp_path)
        explain_and_log(run_id=served["train_run_id"], attributions="none", quiet=True)
    assert proxy.broken == 0 and len(loads) == 1 and Path(loads[0]).name == "last.ckpt"


def test_no_server_at_start_is_one_line_and_nothing_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mlflow_xai.cli import main
    from tests.mlflow_server import free_port

    use_server(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "cfg.json").write_text(json.dumps(LONG_CONFIG))
    result = CliRunner().invoke(main, ["train", "--quiet", "--config", "cfg.json"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-xai: error: the tracking server http://127.0.0.1:")
    assert "does not answer" in lines[0] and "start it or fix MLFLOW_TRACKING_URI" in lines[0]
    assert not (tmp_path / "work").exists()  # nothing trained
