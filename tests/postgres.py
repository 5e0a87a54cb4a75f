"""A real PostgreSQL server for the tests that need a team's backend store.

``postgres_server()`` runs Debian's ``postgresql`` binaries (``initdb``, ``pg_ctl``) on
a data directory in a fresh temporary folder: a free port on 127.0.0.1, its unix
socket in that folder, trust authentication for local connections only, and one
database. It yields a ``PostgresServer`` whose ``uri`` is a ``postgresql+psycopg://``
URI for ``mlflow server --backend-store-uri``; at the end the server is stopped and the
folder removed. PostgreSQL refuses to run as root: as root, the binaries run as the
``postgres`` user (``runuser``) and the folder is handed to that user.

Where the binaries or the Python driver are missing, ``require_postgres()`` skips with
the reason (``.ci/run`` installs the server package; the driver is a test dependency).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port

DATABASE = "mlflow"


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest ``/usr/lib/postgresql/*/bin``."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent  # a link in /usr/local/bin leads to the real folder
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or ``None`` when it can."""
    if postgres_bindir() is None:
        return ("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
                "`apt-get install postgresql` (.ci/run does it where it can)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver psycopg is not installed: `pip install -e '.[test]'`"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user: PostgreSQL refuses to run as root"
        if shutil.which("runuser") is None:
            return "running as root without `runuser` to start PostgreSQL as the `postgres` user"
    return None


def require_postgres() -> None:
    """Skip the calling test (or module) with the reason when PostgreSQL cannot run here."""
    reason = missing()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class PostgresServer:
    root: Path
    port: int
    uri: str  # postgresql+psycopg://postgres@127.0.0.1:PORT/mlflow
    log: Path


def create_database(port: int, timeout: float) -> None:
    """``CREATE DATABASE mlflow`` over TCP; ``pg_ctl -w`` has waited, a retry covers a slow start."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[PostgresServer]:
    """A running PostgreSQL with an empty ``mlflow`` database; stopped and removed on exit."""
    bindir = postgres_bindir()
    assert bindir is not None, missing()
    # Not pytest's tmp_path: as root that is a 0700 folder the postgres user cannot enter.
    # Short, so the socket path stays under the 107-byte limit of unix sockets.
    root = Path(tempfile.mkdtemp(prefix="mlflow-xai-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "postgres.log", free_port()

    def pg(*args: str, timeout: float = timeout) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=root)
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}{tail}")
        return done

    started = False
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
           "--no-sync", "--locale=C")
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", str(int(timeout)),
           "start")
        started = True
        create_database(port, timeout)
        yield PostgresServer(root, port, f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DATABASE}", log)
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=timeout, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A team's ``mlflow server``: a PostgreSQL backend store, proxied local artifacts, two workers.

    Skipped with the reason where PostgreSQL cannot run here (``missing()``).
    """
    require_postgres()
    root = tmp_path_factory.mktemp("team-server")
    with postgres_server() as pg:
        server = MlflowServer(root, store_uri=pg.uri, workers=2)
        try:
            server.start(timeout=180)  # the first start creates MLflow's tables (migrations)
            yield server
        finally:
            server.stop()
