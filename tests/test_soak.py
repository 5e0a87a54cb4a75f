"""Load: 20 explains of a small model against one ``mlflow server``, in one process.

In-process (one import, like a notebook or a service calling ``explain_and_log`` in a
loop), ``attributions="none"``, a two-hidden-layer net: what is measured is the
explain -> HTTP -> artifacts path and whether memory keeps growing. The figures
(seconds and RSS per iteration) are printed and written to
``test-artifacts/soak.json``.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.mlflow_server import MlflowServer, use_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

N = 20
REPO = Path(__file__).resolve().parents[1]
FIGURES = Path(os.environ.get("MLFLOW_XAI_TEST_ARTIFACTS", REPO / "test-artifacts")) / "soak.json"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_twenty_explains_finish_with_a_flat_memory_footprint(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_xai.config import TunedConfig
    from mlflow_xai.jobs.explain import explain_and_log
    from mlflow_xai.jobs.train import train_and_log

    use_server(monkeypatch, mlflow_server.uri, tmp_path)
    cfg = TunedConfig.from_dict({"hidden_sizes": [16, 8], "epochs": 2, "batch_size": 32})
    train = train_and_log(cfg, experiment="soak", monitor=False, quiet=True)
    rows: list[dict[str, Any]] = []
    ids = []
    for i in range(N):
        t0 = time.perf_counter()
        out = explain_and_log(run_id=train.run_id, attributions="none", quiet=True)
        gc.collect()
        rows.append({"iteration": i + 1, "seconds": round(time.perf_counter() - t0, 3), "rss_mib": round(_rss_mib(), 1)})
        ids.append(out.run_id)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(rows, indent=1) + "\n")
    print("\nsoak:", " ".join(f"{r['iteration']}:{r['seconds']}s/{r['rss_mib']}MiB" for r in rows))

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([train.experiment_id], filter_string="tags.`mlflow_xai.role` = 'explain'",
                              max_results=100)
    assert {r.info.run_id for r in runs} == set(ids) and len(ids) == N
    assert all(r.info.status == "FINISHED" for r in runs)
    # Flat after warm-up (the first explains fill matplotlib's and torch's caches).
    rss = [r["rss_mib"] for r in rows]
    assert rss[-1] - rss[4] < 40, rss
    assert max(rss[10:]) - min(rss[10:]) < 30, rss
