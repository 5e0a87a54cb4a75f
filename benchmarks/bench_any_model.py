"""Explaining a model mlflow-xai did not train (pt2) against explaining our own checkpoint of it.

For each cookbook network (``TunedConfig(l1=...)``, 10 inputs; l1=256 is about 51M
parameters), the same weights are stored twice in a sqlite store in a temporary folder:

* ``ours``: a train-run-like checkpoint, exactly as ``bench_explain.py`` writes it;
* ``pt2``: the plain ``nn.Module`` logged by user code with ``mlflow.pytorch.log_model``
  (torch.export's pt2 format, an input example of 4 rows, so the batch is dynamic).

Then, ``--repeats`` times each, alternately: the compute floor of ``bench_explain.py``
(a process that imports torch, loads the checkpoint, runs one forward and backward on
16 rows and reads every parameter once), ``mlflow-xai explain --run-id`` of ours, and
``mlflow-xai explain --model-uri models:/<id> --data rows.npz --rows 16`` of the pt2
model, both on the same 16 rows, both with ``--attributions`` as given (default: ``none``
and ``all``). It prints each median as a ratio over the floor's median, and the pt2
ratio over ours: the target is that the pt2 model is explained no slower, as a ratio,
than our own checkpoints (pt2 / ours <= 1.0 within the noise).

Run: ``.venv/bin/python benchmarks/bench_any_model.py [--sizes 256] [--repeats 3]
[--attributions none,all]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_explain as be  # noqa: E402 - the floor, the checkpoint writer and the child runner are shared


def log_pt2(net: be.Net, tmp: Path) -> str:
    """The same weights as ``net``'s checkpoint, logged as a user would: mlflow.pytorch.log_model."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    from mlflow_xai.nets import MLP, NET_PREFIX

    state = torch.load(net.ckpt, weights_only=True, mmap=True)["state_dict"]
    model = MLP(net.cfg, be.N_IN, 1)
    model.load_state_dict({k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)})
    model.eval()
    batch = torch.load(tmp / "batch.pt", weights_only=True)
    np.savez(tmp / "rows.npz", x=batch["X"].numpy(), y=batch["y"].numpy())
    with mlflow.start_run(run_name=f"user-pt2-{net.label}"):
        info = mlflow.pytorch.log_model(model, name="model", input_example=batch["X"][:4].numpy(),
                                        pip_requirements=["torch"])
    return info.model_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256", help="cookbook l1 values (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attributions", default="none,all", help="explain --attributions values to time")
    parser.add_argument("--timeout", type=float, default=540, help="seconds per child process")
    args = parser.parse_args()

    import mlflow

    from mlflow_xai.config import TunedConfig

    with tempfile.TemporaryDirectory(prefix="bench-any-model-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        exp_id = mlflow.set_experiment("bench-any-model").experiment_id
        modes = [m.strip() for m in args.attributions.split(",") if m.strip()]
        rows = []
        for l1 in [int(s) for s in args.sizes.split(",") if s.strip()]:
            net = be.Net(f"l1={l1}", TunedConfig(l1=l1))
            be.make_train_run(net, exp_id, tmp)
            pt2_uri = log_pt2(net, tmp)
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                be.measure_floor(net, tmp, env, args.timeout)
                for mode in modes:
                    for kind, cmd in (
                        ("ours", be.explain_cmd(net, mode)),
                        ("pt2", [*be.CLI, "explain", "--model-uri", pt2_uri, "--data", str(tmp / "rows.npz"),
                                 "--rows", str(be.BATCH_ROWS), "--attributions", mode, "--quiet"]),
                    ):
                        wall, rc, _rss, out = be.run_child(cmd, env, args.timeout)
                        if rc != 0:
                            sys.exit(f"{kind} explain of {net.label} failed (rc={rc}): {out.strip()[-500:]}")
                        times.setdefault(f"{kind}:{mode}", []).append(wall)
            if net.errors:
                sys.exit("; ".join(net.errors))
            floor = statistics.median(w for w, _, _ in net.floor)
            for mode in modes:
                ours, pt2 = statistics.median(times[f"ours:{mode}"]), statistics.median(times[f"pt2:{mode}"])
                rows.append((net.label, net.n_params, mode, floor, ours, pt2))
        print(f"\n{'network':<9} {'params':>11} {'attributions':>12} {'floor s':>8} {'ours s':>8} {'ours/floor':>10} "
              f"{'pt2 s':>8} {'pt2/floor':>9} {'pt2/ours':>8}")
        for label, n, mode, floor, ours, pt2 in rows:
            print(f"{label:<9} {n:>11,} {mode:>12} {floor:>8.2f} {ours:>8.2f} {ours / floor:>10.2f} "
                  f"{pt2:>8.2f} {pt2 / floor:>9.2f} {pt2 / ours:>8.2f}")
        print(f"\nmedians of {args.repeats} alternating runs; target: pt2/ours <= 1.0 (no slower than our checkpoints)")


if __name__ == "__main__":
    main()
