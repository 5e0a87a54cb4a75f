"""``mlflow-xai explain`` time and peak memory against the network's parameter count.

For each network (the cookbook MLP for the diabetes data, ``TunedConfig(l1=...)`` with
10 inputs, and optionally one of >= 500M parameters from explicit ``hidden_sizes``),
the benchmark writes a train-run-like checkpoint without training: a Lightning-style
dict ``{"state_dict": {"net." + k: v}, "optimizer_states": [Adam's exp_avg and
exp_avg_sq for every parameter], "mlflow_xai": checkpoint_meta(...)}``, so the file is
about three times the weights, as a real ``last.ckpt`` is. It goes into a fresh train
run (tag ``mlflow_xai.role=train``, ``mlflow_xai.checkpoint_sha256``, the config's
params) of a sqlite MLflow store in a temporary folder, as ``checkpoints/last.ckpt``.

Then, alternately, ``--repeats`` times each:

* ``explain``: the whole default ``mlflow-xai explain --run-id ID --quiet`` process
  (start-up, imports, download, sha256, load, statistics, figures, diagram, every
  attribution method and every hidden layer's conductance, report, logging), wall time
  and peak RSS (GNU ``/usr/bin/time``'s maximum resident set size of the command: see
  :func:`run_child` for why not ``wait4``); and the same with ``--attributions none``;
* ``floor``: a separate Python process that imports torch, loads the same checkpoint
  (``torch.load(weights_only=True, mmap=True)``, as explain does), runs one forward and
  one backward pass on the same 16 test rows, and reads every parameter once
  (``p.abs().sum()``): the least any explanation of the weights and gradients costs.

The headline rows are the default explain (every attribution method on); rows marked
``-attr`` run it with ``--attributions none`` (at the ``--none-sizes``).

Targets, at the 51M-parameter network (l1=256): the default explain <= 6x the floor,
``--attributions none`` <= 4x, and peak RSS <= 2 x the weights' bytes + 1.5 GB; the
>= 500M network must complete within that memory too (no out-of-memory kill).

Run: ``.venv/bin/python benchmarks/bench_explain.py [--sizes 16,64,256] [--big/--no-big]
[--repeats 3] [--none-sizes 16,64,256] [--profile 256]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

N_IN = 10
TIME_TARGET = 6.0  # the default explain / floor at l1=256
TIME_TARGET_NONE = 4.0  # explain --attributions none / floor at l1=256
BATCH_ROWS = 16
GB = 1 << 30
MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mlflow_xai"]


# --------------------------------------------------------------------------- the floor
def floor_main(ckpt: str, batch: str) -> None:
    """Child process: load the weights, forward + backward on the batch, one pass over them.

    Imports torch only; the network is run functionally from the state dict (its hidden
    layers are Linear -> ReLU, dropout is the identity in eval mode).
    """
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    t1 = time.perf_counter()
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    data = torch.load(batch, weights_only=True)
    linears = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")},
                     key=lambda n: int(n.rsplit(".", 1)[1]))
    params = []
    for name in linears:
        w, b = state[name + ".weight"], state[name + ".bias"]
        params += [w.requires_grad_(), b.requires_grad_()]
    t2 = time.perf_counter()
    x = data["X"]
    for i in range(0, len(params) - 2, 2):
        x = F.relu(F.linear(x, params[i], params[i + 1]))
    out = F.linear(x, params[-2], params[-1])
    loss = F.mse_loss(out.squeeze(-1), data["y"])
    grads = torch.autograd.grad(loss, params)
    t3 = time.perf_counter()
    total = sum(float(p.detach().abs().sum()) for p in params) + sum(float(g.abs().sum()) for g in grads)
    t4 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "load": t2 - t1, "fwd_bwd": t3 - t2, "pass": t4 - t3,
                      "check": total}))


# --------------------------------------------------------------------------- setup
@dataclass
class Net:
    label: str
    cfg: Any  # TunedConfig
    n_params: int = 0
    weight_bytes: int = 0
    run_id: str = ""
    ckpt: Path | None = None
    ckpt_bytes: int = 0
    floor: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    explain: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def make_train_run(net: Net, exp_id: str, tmp: Path) -> None:
    """A train-run-like checkpoint, written straight into a new run's artifact folder."""
    import mlflow
    import torch
    from mlflow.entities import RunStatus

    from mlflow_xai import tracking
    from mlflow_xai.checkpoint import sha256_file
    from mlflow_xai.data import load_dataset, split_dataset
    from mlflow_xai.nets import MLP, NET_PREFIX
    from mlflow_xai.train import checkpoint_meta

    cfg = net.cfg
    ds = load_dataset("diabetes")
    split = split_dataset(ds)
    meta = checkpoint_meta(cfg, ds, split, "diabetes")
    torch.manual_seed(0)
    model = MLP(cfg, N_IN, 1)
    params = list(model.parameters())
    net.n_params = sum(p.numel() for p in params)
    net.weight_bytes = sum(p.numel() * p.element_size() for p in params)
    # Adam's state as Lightning saves it: exp_avg, exp_avg_sq per parameter.
    optimizer_state = {
        "state": {i: {"step": torch.tensor(100.0), "exp_avg": torch.zeros_like(p),
                      "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
        "param_groups": [{"lr": cfg.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                          "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                          "differentiable": False, "fused": None, "params": list(range(len(params)))}],
    }
    ckpt = {
        "epoch": 9, "global_step": 90, "pytorch-lightning_version": "2.6.6",
        "state_dict": {NET_PREFIX + k: v for k, v in model.state_dict().items()},
        "loops": {}, "callbacks": {}, "optimizer_states": [optimizer_state], "lr_schedulers": [],
        "mlflow_xai": meta,
    }
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=f"bench-{net.label}", tags={tracking.ROLE_TAG: "train"})
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    path = art / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    del ckpt, optimizer_state, model, params
    params_logged = {**cfg.to_dict(), "learning_rate": cfg.learning_rate, "data": "diabetes",
                     "target": "target", "task": "regression", "n_features": N_IN, "test_size": 0.4,
                     "seed": 42, "val_fraction": 0.2}
    if cfg.hidden_sizes is not None:
        params_logged["hidden_sizes"] = json.dumps(list(cfg.hidden_sizes))
    for k, v in params_logged.items():
        client.log_param(run.info.run_id, k, "" if v is None else str(v))
    client.set_tag(run.info.run_id, tracking.CHECKSUM_TAG, sha256_file(path))
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    net.run_id, net.ckpt, net.ckpt_bytes = run.info.run_id, path, path.stat().st_size
    batch = tmp / "batch.pt"
    if not batch.exists():
        torch.save({"X": torch.as_tensor(split.X_test[:BATCH_ROWS]),
                    "y": torch.as_tensor(split.y_test[:BATCH_ROWS])}, batch)


# --------------------------------------------------------------------------- measuring
TIME = "/usr/bin/time"  # GNU time: the peak RSS of the command itself


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, int, int, str]:
    """Wall seconds, return code, peak RSS in bytes (the command and its own children), stdout.

    The peak comes from GNU time wrapped around the command. ``os.wait4``'s
    ``ru_maxrss`` of a direct child is not usable here: Linux carries the high-water
    mark of the memory a child shared with its parent before ``exec`` into the child's
    figure, so every row would read at least this process's own peak (6 GB after
    writing the 500M network's checkpoint). Without GNU time that upper bound is what
    is reported.
    """
    use_time = os.access(TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        full = [TIME, "-f", "%M", "-o", rss_file.name, *cmd] if use_time else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=out, stderr=err, cwd=REPO, start_new_session=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, 9)  # the whole session: time and the command under it
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss * 1024
        if use_time:
            lines = [ln.strip() for ln in rss_file.read().splitlines() if ln.strip()]
            if lines and lines[-1].isdigit():
                rss = int(lines[-1]) * 1024
            if lines and lines[0].startswith("Command terminated by signal"):
                proc.returncode = -int(lines[0].rsplit(" ", 1)[-1])
            elif lines and lines[0].startswith("Command exited with non-zero status"):
                proc.returncode = int(lines[0].rsplit(" ", 1)[-1])
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if proc.returncode != 0:
            text += "\n" + err.read().decode(errors="replace")[-2000:]
        return wall, proc.returncode, rss, text


def measure_floor(net: Net, tmp: Path, env: dict[str, str], timeout: float) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_floor", str(net.ckpt), str(tmp / "batch.pt")]
    wall, rc, rss, out = run_child(cmd, env, timeout)
    if rc != 0:
        net.errors.append(f"floor rc={rc}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        return
    net.floor.append((wall, rss, json.loads(out.strip().splitlines()[-1])))


def explain_cmd(net: Net, attributions: str) -> list[str]:
    return [*CLI, "explain", "--run-id", net.run_id, "--attributions", attributions, "--quiet"]


def measure_explain(net: Net, attributions: str, env: dict[str, str], timeout: float) -> None:
    wall, rc, rss, out = run_child(explain_cmd(net, attributions), env, timeout)
    if rc != 0:
        why = "killed (timeout or out of memory)" if rc in (-9, 137) else f"rc={rc}"
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        net.errors.append(f"explain --attributions {attributions}: {why} after {wall:.0f}s, "
                          f"peak RSS {rss / GB:.2f} GB: {tail}")
        return
    net.explain.setdefault(attributions, []).append((wall, rss))


def profile_explain(net: Net, env: dict[str, str], tmp: Path, timeout: float) -> None:
    """cProfile the explain process; print the stages and the heaviest functions."""
    import pstats

    prof = tmp / f"explain-{net.label}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "mlflow_xai",
           *explain_cmd(net, "all")[3:]]
    wall, rc, rss, out = run_child(cmd, env, timeout)
    print(f"\nprofile of explain {net.label} ({net.n_params:,} params): {wall:.1f}s wall, "
          f"peak RSS {rss / GB:.2f} GB, rc={rc}")
    if rc != 0:
        print(out[-2000:])
        return
    stats = pstats.Stats(str(prof))
    print(f"{'stage (cumulative s under cProfile; imports inside a stage count in both)':<75} {'s':>7}")
    for label, pattern in PROFILE_STAGES:
        total = sum(v[3] for k, v in stats.stats.items()  # type: ignore[attr-defined]
                    if re.search(pattern, f"{k[0]}:{k[2]}"))
        print(f"  {label:<73} {total:>7.2f}")
    stats.sort_stats("tottime").print_stats(12)


# (label, regex on "file:function") for the explain profile; cumulative times.
PROFILE_STAGES: list[tuple[str, str]] = [
    ("whole command (cli.explain)", r"mlflow_xai/cli\.py:explain$"),
    ("all imports (outermost _find_and_load)", r"<frozen importlib._bootstrap>:_find_and_load$"),
    ("resolve the source run (store init, get_run)", r"mlflow_xai/tracking\.py:resolve_source$"),
    ("start/end the explain run (run_context)", r"mlflow_xai/tracking\.py:run_context$"),
    ("download the checkpoint", r"mlflow_xai/tracking\.py:download_checkpoint$"),
    ("verify sha256", r"mlflow_xai/checkpoint\.py:verify_checksum$"),
    ("load the checkpoint (torch.load mmap, rebuild)", r"mlflow_xai/checkpoint\.py:load_checkpoint$"),
    ("load the data (sklearn)", r"mlflow_xai/jobs/common\.py:explain_data$"),
    ("inspect.explain (fwd, bwd, statistics)", r"mlflow_xai/inspect/core\.py:explain$"),
    ("  of which stats_and_histogram", r"mlflow_xai/inspect/stats\.py:stats_and_histogram$"),
    ("figures: heatmaps (build)", r"mlflow_xai/figures/layers\.py:heatmap$"),
    ("figures: distribution grids + mean activations (build)",
     r"mlflow_xai/figures/layers\.py:(distribution_grid|mean_activation_map)$"),
    ("figures: PNG encoding (figure_to_png, attribution figures too)", r"mlflow_xai/figures/style\.py:figure_to_png$"),
    ("architecture diagram (torchviz + dot)", r"mlflow_xai/figures/diagram\.py:(architecture_dot|render_all)$"),
    ("attributions + conductance (with their figures)", r"mlflow_xai/jobs/explain\.py:_attributions_stage$"),
    ("  integrated_gradients (captum)", r"captum/attr/_core/integrated_gradients\.py:attribute$"),
    ("  deep_lift (captum)", r"captum/attr/_core/deep_lift\.py:attribute$"),
    ("  gradient_shap (captum)", r"captum/attr/_core/gradient_shap\.py:attribute$"),
    ("  feature_ablation (captum)", r"captum/attr/_core/feature_ablation\.py:attribute$"),
    ("  conductance of every hidden layer (one path)", r"mlflow_xai/inspect/attributions\.py:conductances$"),
    ("  conductance figures (build)",
     r"mlflow_xai/figures/attributions\.py:(conductance_figure|weights_vs_conductance)$"),
    ("summary + report", r"mlflow_xai/(inspect/summary\.py:summary_dict|reports/explain\.py:render_report)$"),
    ("log the artifacts", r"mlflow_xai/tracking\.py:log_artifacts$"),
]


# --------------------------------------------------------------------------- report
def fmt_gb(b: float) -> str:
    return f"{b / GB:.2f}"


def print_table(nets: list[Net], none_labels: set[str]) -> None:
    head = (f"{'network':<22} {'params':>12} {'weights MB':>10} {'ckpt MB':>8} {'floor s':>8} {'explain s':>9} "
            f"{'ratio':>6} {'floor GB':>8} {'explain GB':>10} {'target GB':>9}  {'time':<4} {'mem':<4}")
    print(head)
    print("-" * len(head))
    for net in nets:
        if not net.floor:
            print(f"{net.label:<22} {net.n_params:>12,} floor failed: {'; '.join(net.errors)}")
            continue
        floor_s = statistics.median(w for w, _, _ in net.floor)
        floor_rss = max(r for _, r, _ in net.floor)
        target_mem = 2 * net.weight_bytes + 1.5 * GB
        for attributions in ("all", "none"):
            if attributions == "none" and net.label not in none_labels:
                continue
            runs = net.explain.get(attributions, [])
            label = net.label + (" -attr" if attributions == "none" else "")
            if not runs:
                print(f"{label:<22} {net.n_params:>12,} {net.weight_bytes / MB:>10.1f} {net.ckpt_bytes / MB:>8.0f} "
                      f"{floor_s:>8.2f}    FAILED")
                continue
            ex_s = statistics.median(w for w, _ in runs)
            ex_rss = max(r for _, r in runs)
            ratio = ex_s / floor_s
            mem_ok = "ok" if ex_rss <= target_mem else "OVER"
            # The time targets are set at the 51M network; smaller ones are all start-up
            # cost, and the big one has to complete.
            if net.label == "l1=256":
                target = TIME_TARGET if attributions == "all" else TIME_TARGET_NONE
                time_ok = "ok" if ratio <= target else "OVER"
            else:
                time_ok = "done" if net.label.startswith("big") else "-"
            print(f"{label:<22} {net.n_params:>12,} {net.weight_bytes / MB:>10.1f} {net.ckpt_bytes / MB:>8.0f} "
                  f"{floor_s:>8.2f} {ex_s:>9.2f} {ratio:>6.2f} {fmt_gb(floor_rss):>8} {fmt_gb(ex_rss):>10} "
                  f"{fmt_gb(target_mem):>9}  {time_ok:<4} {mem_ok:<4}")
    print(f"time: explain/floor <= {TIME_TARGET:g} (default) and <= {TIME_TARGET_NONE:g} (-attr: "
          "--attributions none) at l1=256 (51M); mem: explain peak RSS <= target GB "
          "= 2 x weights + 1.5 GB; floor/explain GB: peak RSS of the process")
    print("\nfloor stages (median s inside the floor process): import torch / load / fwd+bwd / pass; "
          "explain runs (wall s)")
    for net in nets:
        if net.floor:
            parts = {k: statistics.median(d[k] for _, _, d in net.floor) for k in ("import", "load", "fwd_bwd", "pass")}
            runs = "; ".join(f"{a}: " + " ".join(f"{w:.1f}" for w, _ in r) for a, r in net.explain.items())
            print(f"  {net.label:<20} " + " / ".join(f"{v:.3f}" for v in parts.values()) + f"   [{runs}]")
    for net in nets:
        for e in net.errors:
            print(f"  {net.label}: {e}")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--_floor":
        floor_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="cookbook l1 values (comma-separated)")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                        help="also the >= 500M-parameter network")
    parser.add_argument("--big-hidden", default="16000,16000,16000",
                        help="hidden_sizes of the big network (16000 x3: 512M params)")
    parser.add_argument("--none-sizes", default="16,64,256",
                        help="l1 values that also get a row with --attributions none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=540, help="seconds per child process")
    parser.add_argument("--profile", default="",
                        help="l1 values (or 'big') whose explain is also run under cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store (prints its path)")
    parser.add_argument("--setup-only", action="store_true",
                        help="only write the train runs (implies --keep): a store to profile by hand")
    args = parser.parse_args()
    args.keep = args.keep or args.setup_only

    import mlflow
    import torch

    from mlflow_xai.config import TunedConfig

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    none_sizes = {int(s) for s in args.none_sizes.split(",") if s.strip()}
    profile = {s.strip() for s in args.profile.split(",") if s.strip()}
    nets = [Net(f"l1={l1}", TunedConfig(l1=l1)) for l1 in sizes]
    if args.big:
        hidden = tuple(int(h) for h in args.big_hidden.split(","))
        nets.append(Net("big " + "x".join(str(h) for h in hidden), TunedConfig(hidden_sizes=hidden)))
    none_labels = {f"l1={l1}" for l1 in none_sizes}

    tmp = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    try:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        exp_id = mlflow.MlflowClient().create_experiment("bench-explain", artifact_location=str(tmp / "artifacts"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "PYTHONWARNINGS": "ignore"}
        env.pop("MLFLOW_RUN_ID", None)
        print(f"torch {torch.__version__}, mlflow {mlflow.__version__}, {os.cpu_count()} cores, "
              f"store {tmp}; median of {args.repeats} alternating runs "
              f"({args.big_repeats} for the big network)", flush=True)
        if args.setup_only:
            for net in nets:
                make_train_run(net, exp_id, tmp)
                print(f"{net.label}: run {net.run_id}, {net.n_params:,} params, {net.ckpt}")
            print(f"MLFLOW_TRACKING_URI={uri}")
            return
        # Warm-up on a tiny network: page cache, .pyc files, sqlite schema are no row's cost.
        warm = Net("warm-up", TunedConfig(l1=1))
        make_train_run(warm, exp_id, tmp)
        run_child([sys.executable, str(Path(__file__).resolve()), "--_floor", str(warm.ckpt),
                   str(tmp / "batch.pt")], env, args.timeout)
        run_child(explain_cmd(warm, "all"), env, args.timeout)
        for net in nets:
            t = time.perf_counter()
            make_train_run(net, exp_id, tmp)
            print(f"{net.label}: {net.n_params:,} params, checkpoint {net.ckpt_bytes / MB:.0f} MB, "
                  f"written in {time.perf_counter() - t:.1f}s", flush=True)
            big = net.label.startswith("big")
            repeats = args.big_repeats if big else args.repeats
            for _ in range(repeats):
                measure_floor(net, tmp, env, args.timeout)
                measure_explain(net, "all", env, args.timeout)
                if net.label in none_labels:
                    measure_explain(net, "none", env, args.timeout)
            done = net.explain.get("all", [])
            print(f"  floor {[round(w, 2) for w, _, _ in net.floor]} s, explain {[round(w, 2) for w, _ in done]} s"
                  + (f"; errors: {net.errors}" if net.errors else ""), flush=True)
            key = "big" if big else net.label.removeprefix("l1=")
            if key in profile:
                profile_explain(net, env, tmp, args.timeout)
            if net.ckpt is not None and not args.keep:  # free the disk before the next network
                net.ckpt.unlink(missing_ok=True)
        print()
        print_table(nets, none_labels)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
