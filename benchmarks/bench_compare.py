"""``mlflow-xai compare`` time for two registered 51M-parameter versions, against a floor measured in the same run.

Two versions of the cookbook network for the diabetes data (``TunedConfig(l1=256)``,
51M parameters, 205 MB of weights each; B with another initialization, so every
layer differs) are written without training as ``bench_explain.py`` writes them
(``make_train_run``: a Lightning-style checkpoint with Adam's state, ~3x the weights,
in a train-run-like run of a sqlite store in a temporary folder) and registered as
``models:/big/1`` and ``models:/big/2``. Then, alternately, ``--repeats`` times each:

* ``compare``: the whole ``mlflow-xai compare models:/big/1 models:/big/2 --rows N
  --quiet`` process (start-up, imports, registry lookups, two downloads and sha256s,
  two loads, drift of every layer, activations and predictions, figures, report,
  logging), wall time and peak RSS;
* ``floor``: a Python process that imports torch, loads both checkpoints
  (``torch.load(weights_only=True, mmap=True)``, as compare does) and runs one forward
  pass of each network on the same N test rows: the least any comparison costs.

Prints the medians and their ratio. Run:
``.venv/bin/python benchmarks/bench_compare.py [--l1 256] [--rows 128] [--repeats 3] [--profile]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explain import GB, MB, Net, make_train_run, run_child  # noqa: E402

CLI = [sys.executable, "-m", "mlflow_xai"]


def floor_main(ckpt_a: str, ckpt_b: str, batch: str) -> None:
    """Child process: load both checkpoints' weights, one forward pass of each on the batch."""
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    t1 = time.perf_counter()
    x = torch.load(batch, weights_only=True)["X"]
    outs = []
    load = fwd = 0.0
    for path in (ckpt_a, ckpt_b):
        s = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        linears = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")},
                         key=lambda n: int(n.rsplit(".", 1)[1]))
        m = time.perf_counter()
        with torch.no_grad():
            h = x
            for i, name in enumerate(linears):
                h = F.linear(h, state[name + ".weight"], state[name + ".bias"])
                if i < len(linears) - 1:
                    h = F.relu(h)
        outs.append(h)
        e = time.perf_counter()
        load += m - s
        fwd += e - m
    print(json.dumps({"import": t1 - t0, "load": load, "forward": fwd,
                      "check": float((outs[1] - outs[0]).abs().sum())}))


def profile_compare(compare_cmd: list[str], env: dict[str, str], tmp: Path, timeout: float) -> None:
    """cProfile one compare process; print the stages (cumulative) and the heaviest functions."""
    import pstats
    import re

    prof = tmp / "compare.prof"
    wall, rc, _, out = run_child([sys.executable, "-m", "cProfile", "-o", str(prof), *compare_cmd[1:]], env, timeout)
    print(f"\nprofile of compare: {wall:.1f}s wall, rc={rc}")
    if rc != 0:
        print(out[-2000:])
        return
    stats = pstats.Stats(str(prof))
    for label, pattern in PROFILE_STAGES:
        total = sum(v[3] for k, v in stats.stats.items()  # type: ignore[attr-defined]
                    if re.search(pattern, f"{k[0]}:{k[2]}"))
        print(f"  {label:<60} {total:>7.2f}")
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats(r"mlflow_xai/(jobs|inspect|figures|tracking|sources|checkpoint)", 25)


# (label, regex on "file:function") for the compare profile; cumulative seconds.
PROFILE_STAGES: list[tuple[str, str]] = [
    ("whole command (cli.compare)", r"mlflow_xai/cli\.py:compare$"),
    ("all imports (outermost _find_and_load)", r"<frozen importlib._bootstrap>:_find_and_load$"),
    ("load both sides (download, sha256, load)", r"mlflow_xai/jobs/compare\.py:_load_side$"),
    ("weight drift", r"mlflow_xai/inspect/compare\.py:weight_drift$"),
    ("activation shift", r"mlflow_xai/inspect/compare\.py:compare_activations$"),
    ("figures: heatmaps of B - A (build)", r"mlflow_xai/figures/layers\.py:heatmap$"),
    ("figures: PNG encoding", r"mlflow_xai/figures/style\.py:figure_to_png$"),
    ("report", r"mlflow_xai/reports/compare\.py:render_compare_report$"),
    ("log the artifacts", r"mlflow_xai/tracking\.py:log_artifacts$"),
]


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--_floor":
        floor_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=int, default=256, help="cookbook width multiplier (256: 51M parameters)")
    parser.add_argument("--rows", type=int, default=128, help="test rows for activations and predictions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=540, help="seconds per child process")
    parser.add_argument("--profile", action="store_true",
                        help="also run compare once under cProfile and print where its time goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store (prints its path)")
    args = parser.parse_args()

    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlflow_xai.config import TunedConfig
    from mlflow_xai.data import load_dataset, split_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        exp_id = client.create_experiment("bench-compare", artifact_location=str(tmp / "artifacts"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "PYTHONWARNINGS": "ignore"}
        env.pop("MLFLOW_RUN_ID", None)
        print(f"torch {torch.__version__}, mlflow {mlflow.__version__}, {os.cpu_count()} cores, store {tmp}; "
              f"median of {args.repeats} alternating runs", flush=True)
        nets = [Net("A", TunedConfig(l1=args.l1)),
                Net("B", TunedConfig(l1=args.l1, initialization="kaiming_uniform"))]
        client.create_registered_model("big")
        for net in nets:
            t = time.perf_counter()
            make_train_run(net, exp_id, tmp)
            client.create_model_version("big", f"runs:/{net.run_id}/checkpoints", run_id=net.run_id)
            print(f"{net.label}: {net.n_params:,} params, {net.weight_bytes / MB:.0f} MB of weights, checkpoint "
                  f"{net.ckpt_bytes / MB:.0f} MB, written in {time.perf_counter() - t:.1f}s", flush=True)
        split = split_dataset(load_dataset("diabetes"))
        batch = tmp / "rows.pt"
        torch.save({"X": torch.as_tensor(split.X_test[:args.rows])}, batch)

        floor_cmd = [sys.executable, str(Path(__file__).resolve()), "--_floor", str(nets[0].ckpt),
                     str(nets[1].ckpt), str(batch)]
        compare_cmd = [*CLI, "compare", "models:/big/1", "models:/big/2", "--rows", str(args.rows), "--quiet"]
        run_child(floor_cmd, env, args.timeout)  # warm-up: page cache and .pyc files are no row's cost
        floors: list[tuple[float, int, dict[str, float]]] = []
        compares: list[tuple[float, int]] = []
        for _ in range(args.repeats):
            wall, rc, rss, out = run_child(floor_cmd, env, args.timeout)
            if rc != 0:
                raise SystemExit(f"floor failed (rc={rc}): {out[-2000:]}")
            floors.append((wall, rss, json.loads(out.strip().splitlines()[-1])))
            wall, rc, rss, out = run_child(compare_cmd, env, args.timeout)
            if rc != 0:
                raise SystemExit(f"compare failed (rc={rc}): {out[-2000:]}")
            compares.append((wall, rss))
            print(f"  floor {floors[-1][0]:.2f}s, compare {wall:.2f}s", flush=True)

        floor_s = statistics.median(w for w, _, _ in floors)
        compare_s = statistics.median(w for w, _ in compares)
        parts = {k: statistics.median(f[2][k] for f in floors) for k in ("import", "load", "forward")}
        n_params = nets[0].n_params + nets[1].n_params
        print()
        print(f"{'two versions':<16} {'params':>12} {'floor s':>8} {'compare s':>9} {'ratio':>6} "
              f"{'floor GB':>8} {'compare GB':>10}")
        print(f"{f'l1={args.l1} x2':<16} {n_params:>12,} {floor_s:>8.2f} {compare_s:>9.2f} "
              f"{compare_s / floor_s:>6.2f} {max(r for _, r, _ in floors) / GB:>8.2f} "
              f"{max(r for _, r in compares) / GB:>10.2f}")
        print(f"floor stages (median s): torch import {parts['import']:.2f}, load both {parts['load']:.2f}, "
              f"forward both {parts['forward']:.2f}")
        print(f"compare runs (s): {[round(w, 2) for w, _ in compares]}")
        if args.profile:
            profile_compare(compare_cmd, env, tmp, args.timeout)
    finally:
        if args.keep:
            print(f"kept {tmp} (MLFLOW_TRACKING_URI=sqlite:///{tmp / 'mlflow.db'})")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
