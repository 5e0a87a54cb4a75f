"""Jobs under concurrent load on a team's ``mlflow server``, against the same job alone on the same server.

A PostgreSQL (``tests/postgres.py``: Debian's ``postgresql``, a temporary data
directory, 127.0.0.1) backs an ``mlflow server`` with two workers and proxied local
artifacts (``--store sqlite`` uses an sqlite file instead). One small train run is
registered as ``bench@champion`` and a second trained, so the jobs have something to
explain and compare. Then:

* ``alone``: each job, as a whole ``mlflow-xai`` process (start-up, imports, HTTP,
  artifacts), run by itself ``--repeats`` times: ``explain --run-id ID --attributions
  none``, ``train`` of a small config, ``compare A B --rows 32``;
* ``load``: ``--rounds`` times, 8 explains (6 by run id, 2 by ``models:/bench@champion``),
  2 trains and a compare started at once, each process timed from its start to its exit.

Prints, per job, the median and the worst time under load, each as a ratio to the
median alone, and checks that every run it made is FINISHED. The machine's cores are
shared by the 11 processes, so on a 2-core machine a ratio well above 1 is the CPU
being shared, not the server: compare ``--store sqlite`` with the default to see the
backend's part. Run:
``.venv/bin/python benchmarks/bench_server.py [--repeats 2] [--rounds 1] [--store postgres|sqlite]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.mlflow_server import MlflowServer  # noqa: E402
from tests.postgres import missing, postgres_server  # noqa: E402

CLI = [sys.executable, "-m", "mlflow_xai"]
CONFIG = {"hidden_sizes": [8, 4], "epochs": 3, "batch_size": 64, "patience": 3}
N_EXPLAINS, N_TRAINS = 8, 2


def env_for(uri: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_XAI_WORKDIR=str(workdir), MLFLOW_DISABLE_TELEMETRY="true")
    return env


def run_id(kind: str, stdout: str) -> str:
    match = re.search(rf"{kind} run: ([0-9a-f]{{32}})", stdout)
    if not match:
        raise SystemExit(f"bench_server: no {kind} run id in the output:\n{stdout}")
    return match[1]


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.Popen[str]]:
    return time.perf_counter(), subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)


def finish(kind: str, started: float, proc: subprocess.Popen[str]) -> tuple[float, str]:
    stdout, stderr = proc.communicate(timeout=900)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench_server: {kind} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return seconds, run_id(kind, stdout)


@contextlib.contextmanager
def backend(store: str) -> Iterator[str | None]:
    if store == "sqlite":
        yield None
        return
    reason = missing()
    if reason:
        raise SystemExit(f"bench_server: {reason}; or run with --store sqlite")
    with postgres_server() as pg:
        yield pg.uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each job alone")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the concurrent load")
    ap.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    args = ap.parse_args()

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp, backend(args.store) as store_uri:
        root = Path(tmp)
        server = MlflowServer(root, store_uri=store_uri, workers=2)
        server.start(timeout=180)
        try:
            env = env_for(server.uri, root / "work")
            cfg = root / "config.json"
            cfg.write_text(json.dumps(CONFIG))
            train = [*CLI, "train", "--quiet", "--config", str(cfg), "--experiment", "bench"]
            _, a = finish("train", *start([*train, "--register-as", "bench", "--alias", "champion"], env, root))
            _, b = finish("train", *start(train, env, root))
            explain = [*CLI, "explain", "--quiet", "--attributions", "none", "--experiment", "bench"]
            jobs = {"explain": [*explain, "--run-id", a], "train": train,
                    "compare": [*CLI, "compare", "--quiet", "--rows", "32", "--experiment", "bench", a, b]}
            ids: list[str] = [a, b]

            alone: dict[str, list[float]] = {k: [] for k in jobs}
            for _ in range(args.repeats):
                for kind, cmd in jobs.items():
                    seconds, rid = finish(kind, *start(cmd, env, root))
                    alone[kind].append(seconds)
                    ids.append(rid)

            loaded: dict[str, list[float]] = {k: [] for k in jobs}
            wall: list[float] = []
            for _ in range(args.rounds):
                batch = ([("explain", jobs["explain"])] * (N_EXPLAINS - 2)
                         + [("explain", [*explain, "--model-uri", "models:/bench@champion"])] * 2
                         + [("train", train)] * N_TRAINS + [("compare", jobs["compare"])])
                t0 = time.perf_counter()
                procs = [(kind, *start(cmd, env, root)) for kind, cmd in batch]
                # One thread per process, so each one's time ends at its own exit, not when
                # the processes before it in the list were waited for.
                with ThreadPoolExecutor(len(procs)) as pool:
                    done = list(pool.map(lambda p: (p[0], *finish(*p)), procs))
                for kind, seconds, rid in done:
                    loaded[kind].append(seconds)
                    ids.append(rid)
                wall.append(time.perf_counter() - t0)

            client = MlflowClient(server.uri)
            statuses = {rid: client.get_run(rid).info.status for rid in ids}
            bad = {rid: s for rid, s in statuses.items() if s != "FINISHED"}
        finally:
            server.stop()

    print(f"mlflow server ({args.store} backend store, 2 workers, proxied artifacts); "
          f"{len(os.sched_getaffinity(0))} cores; alone x{args.repeats}, load x{args.rounds} "
          f"({N_EXPLAINS} explains + {N_TRAINS} trains + 1 compare at once)")
    print(f"{'job':<9}{'alone med s':>12}{'load med s':>12}{'ratio':>8}{'worst s':>10}{'ratio':>8}{'n':>4}")
    for kind in jobs:
        base = statistics.median(alone[kind])
        med, worst = statistics.median(loaded[kind]), max(loaded[kind])
        print(f"{kind:<9}{base:>12.1f}{med:>12.1f}{med / base:>7.2f}x{worst:>10.1f}{worst / base:>7.2f}x"
              f"{len(loaded[kind]):>4}")
    print(f"load round wall: {', '.join(f'{w:.1f} s' for w in wall)}; "
          f"sum of the jobs alone (serial): {sum(statistics.median(alone[k]) * n for k, n in (('explain', N_EXPLAINS), ('train', N_TRAINS), ('compare', 1))):.1f} s")
    print(f"runs: {len(statuses)}, all FINISHED: {not bad}" + (f"; not: {bad}" if bad else ""))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
