"""The README's main job (``make demo``: train, then explain, the default config) against its compute floors.

Whole processes, alternately, ``--repeats`` times, each in the same temporary folder
with its own sqlite store:

* ``train``: ``mlflow-xai train --quiet`` (the default config on the embedded diabetes
  data: Lightning with early stopping, checkpoints, TensorBoard, the monitor, MLflow);
* ``explain``: ``mlflow-xai explain --quiet`` of that run (every figure and attribution);
* ``fit floor``: a process that fits the same network on the same rows in a bare
  Lightning ``Trainer`` (same module, loaders, ``max_epochs`` and EarlyStopping; no logger,
  no MLflow) and saves a checkpoint: what the cookbook's training costs at the least;
* ``explain floor``: ``bench_explain.py``'s floor on that checkpoint: import torch, load
  the weights, one forward and backward on the explained rows (the test part), one pass
  over every parameter;
* ``autolog fit``: what a user would run instead of ``mlflow-xai train``: the same bare fit
  inside ``mlflow.pytorch.autolog()`` and a run (params, per-epoch metrics, the model
  pickled), in the same sqlite store.

It prints the medians and two ratios, the targets of the issue "the README's main job in
seconds": ``explain / explain floor`` (at most 4x) and ``(train + explain) / (fit floor +
explain floor)`` (at most 2x), and ``train / autolog fit`` (the monitor issue's 1.05x).
The fits must stop at the same epoch (it is printed).

``--one-thread-floor`` adds the fit floor on one torch thread (as ``mlflow-xai train``
fits a network this small) and the demo ratio against it; ``--stages`` adds one train
process per repeat with its imports and stages timed (:func:`stages_main`).

Run: ``.venv/bin/python benchmarks/bench_demo.py [--repeats 3] [--l1 16] [--stages] [--one-thread-floor]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "mlflow_xai"]
EXPLAIN_TARGET = 4.0
DEMO_TARGET = 2.0


def fit_floor_main(config: str, out: str, autolog: bool = False) -> None:
    """Child process: the bare Lightning fit of the config, a checkpoint and the explained rows saved.

    With ``autolog`` the fit runs inside ``mlflow.pytorch.autolog()`` and a run instead
    (nothing saved by hand): what a user of MLflow and Lightning writes without mlflow-xai.
    """
    import contextlib

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from mlflow_xai import train as train_mod
    from mlflow_xai.config import load_config
    from mlflow_xai.data import load_dataset, split_dataset

    if os.environ.get("BENCH_FLOOR_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_FLOOR_THREADS"]))
    cfg = load_config(config)
    ds = load_dataset("diabetes")
    split = split_dataset(ds)
    L.seed_everything(split.seed, workers=True, verbose=False)
    module = train_mod.XAIModule(cfg, ds.X.shape[1], ds.n_out, ds.task,
                                 train_mod.checkpoint_meta(cfg, ds, split, "diabetes"))
    train_dl, val_dl = train_mod.loaders(split, ds.task, cfg.batch_size)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with contextlib.ExitStack() as stack:
        if autolog:
            import mlflow
            import mlflow.pytorch

            mlflow.set_experiment("autolog")
            mlflow.pytorch.autolog(log_models=True, silent=True)
            stack.enter_context(mlflow.start_run())
        trainer.fit(module, train_dl, val_dl)
    if autolog:
        print(json.dumps({"epochs": trainer.current_epoch}))
        return
    trainer.save_checkpoint(str(Path(out) / "floor.ckpt"))
    torch.save({"X": torch.as_tensor(split.X_test), "y": torch.as_tensor(split.y_test)}, Path(out) / "batch.pt")
    print(json.dumps({"epochs": trainer.current_epoch}))


#: The stages of one ``mlflow-xai train`` process (``--stages``): (label, module, attribute).
#: Each function is wrapped in the child before the command runs; a stage indented with
#: two spaces is a part of the one above it (counted there too).
TRAIN_STAGES: list[tuple[str, str, str]] = [
    ("run set-up (experiment, start_run)", "mlflow", "set_experiment"),
    ("run set-up (experiment, start_run)", "mlflow", "start_run"),
    ("params", "mlflow_xai.tracking", "log_params"),
    ("fit (Lightning, callbacks, monitor)", "mlflow_xai.train", "fit"),
    ("tags, metrics", "mlflow_xai.tracking", "set_tags"),
    ("tags, metrics", "mlflow_xai.tracking", "log_metrics"),
    ("artifacts (config, ckpts, tensorboard)", "mlflow_xai.tracking", "log_artifact"),
    ("artifacts (config, ckpts, tensorboard)", "mlflow_xai.tracking", "log_artifacts"),
    ("sha256", "mlflow_xai.checkpoint", "sha256_file"),
    ("test metrics", "mlflow_xai.jobs.train", "test_metrics"),
    ("model (pt2, log_model)", "mlflow_xai.tracking", "log_pytorch_model"),
    ("  torch.export", "torch.export", "export"),
    ("  torch.export.save", "torch.export", "save"),
    ("  signature inference", "mlflow.pytorch", "_infer_signature_from_input_example"),
    ("  requirement check", "mlflow.utils.environment", "warn_dependency_requirement_mismatches"),
    ("end run", "mlflow", "end_run"),
]


def stages_main(argv: list[str]) -> None:
    """Child process: ``mlflow-xai train ARGV`` with its imports and stages timed; prints JSON.

    The imports are done first, one group at a time, in the order the command needs them
    and as it does them (the garbage collector paused, then frozen); then the functions of :data:`TRAIN_STAGES` are wrapped and the command runs in this
    process. ``in-process`` is the clock from the first import to the command's return;
    the parent adds the interpreter's start-up and exit.
    """
    import functools
    import gc
    import importlib

    start = time.perf_counter()
    gc.disable()  # as the train command imports (mlflow_xai.cli._import_then_freeze)
    secs: dict[str, float] = {}

    def imp(label: str, *mods: str) -> None:
        t = time.perf_counter()
        for mod in mods:
            importlib.import_module(mod)
        secs[label] = secs.get(label, 0.0) + time.perf_counter() - t

    imp("import cli (click)", "mlflow_xai.cli")
    imp("import mlflow (tracking)", "mlflow_xai.tracking")
    imp("import torch, lightning", "mlflow_xai.train")
    imp("import the rest (monitor, mlflow.pytorch, jobs)", "mlflow_xai.monitor", "mlflow.pytorch",
        "mlflow_xai.jobs.train", "torch.export", "mlflow.utils.environment")
    gc.enable()
    gc.freeze()

    def wrap(label: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed_fn(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                secs[label] = secs.get(label, 0.0) + time.perf_counter() - t

        return timed_fn

    for label, mod_name, attr in TRAIN_STAGES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, attr):
            setattr(mod, attr, wrap(label, getattr(mod, attr)))
    from mlflow_xai.cli import main as cli_main

    t = time.perf_counter()
    try:
        cli_main(["train", *argv], standalone_mode=False)
    finally:
        secs["command"] = time.perf_counter() - t
        secs["in-process"] = time.perf_counter() - start
        print(json.dumps(secs))


def timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--_stages":
        stages_main(sys.argv[2:])
        return
    if len(sys.argv) >= 2 and sys.argv[1] in ("--_fit", "--_autolog"):
        fit_floor_main(sys.argv[2], sys.argv[3], autolog=sys.argv[1] == "--_autolog")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--l1", type=int, default=None, help="the config's l1 (default: the default config's)")
    parser.add_argument("--one-thread-floor", action="store_true",
                        help="add a 'fit floor 1t' row: the fit floor on one torch thread, as mlflow-xai train "
                             "fits a network this small (mlflow_xai.train.fit_threads)")
    parser.add_argument("--stages", action="store_true",
                        help="also run train once per repeat with its imports and stages timed (not in the ratios)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    args = parser.parse_args()

    from mlflow_xai.config import TunedConfig

    cfg = TunedConfig() if args.l1 is None else TunedConfig(l1=args.l1)
    times: dict[str, list[float]] = {k: [] for k in ("train", "explain", "fit floor", "explain floor",
                                                     "autolog fit")}
    if args.one_thread_floor:
        times["fit floor 1t"] = []
    stage_runs: list[dict[str, float]] = []
    epochs: dict[str, set[int]] = {"train": set(), "fit floor": set(), "autolog fit": set()}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONWARNINGS": "ignore"}
        env.pop("MLFLOW_RUN_ID", None)
        print(f"{os.cpu_count()} cores, config l1={cfg.l1}, epochs={cfg.epochs}; "
              f"median of {args.repeats} alternating runs", flush=True)
        # Warm-up (page cache, .pyc files, the sqlite schema): no row's cost.
        timed([*CLI, "train", "--quiet", "--config", "config.json"], tmp, env, args.timeout)
        for i in range(args.repeats):
            wall, out = timed([sys.executable, str(Path(__file__).resolve()), "--_fit", "config.json", str(tmp)],
                              tmp, env, args.timeout)
            times["fit floor"].append(wall)
            epochs["fit floor"].add(json.loads(out.strip().splitlines()[-1])["epochs"])
            if args.one_thread_floor:
                wall, _ = timed([sys.executable, str(Path(__file__).resolve()), "--_fit", "config.json", str(tmp)],
                                tmp, {**env, "BENCH_FLOOR_THREADS": "1"}, args.timeout)
                times["fit floor 1t"].append(wall)
            wall, _ = timed([sys.executable, str(HERE / "bench_explain.py"), "--_floor", str(tmp / "floor.ckpt"),
                             str(tmp / "batch.pt")], tmp, env, args.timeout)
            times["explain floor"].append(wall)
            wall, out = timed([sys.executable, str(Path(__file__).resolve()), "--_autolog", "config.json",
                               str(tmp)], tmp, env, args.timeout)
            times["autolog fit"].append(wall)
            epochs["autolog fit"].add(json.loads(out.strip().splitlines()[-1])["epochs"])
            wall, out = timed([*CLI, "train", "--quiet", "--config", "config.json"], tmp, env, args.timeout)
            times["train"].append(wall)
            wall, _ = timed([*CLI, "explain", "--quiet"], tmp, env, args.timeout)
            times["explain"].append(wall)
            if args.stages:
                wall, out = timed([sys.executable, str(Path(__file__).resolve()), "--_stages", "--quiet",
                                   "--config", "config.json"], tmp, env, args.timeout)
                stage_runs.append({**json.loads(out.strip().splitlines()[-1]), "process wall": wall})
            print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "tags.`mlflow_xai.role` = 'train'"):
            epochs["train"].add(int(run.data.metrics.get("epochs_run", -1)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"{'job':<16} {'median s':>9} {'runs':<30}")
    for k, v in times.items():
        print(f"{k:<16} {med[k]:>9.2f} {', '.join(f'{x:.1f}' for x in v):<30}")
    explain_ratio = med["explain"] / med["explain floor"]
    demo_ratio = (med["train"] + med["explain"]) / (med["fit floor"] + med["explain floor"])
    print()
    print(f"explain / explain floor:                      {explain_ratio:5.2f}x  (target <= {EXPLAIN_TARGET:g}x)")
    print(f"(train + explain) / (fit floor + explain floor): {demo_ratio:5.2f}x  (target <= {DEMO_TARGET:g}x)")
    if args.one_thread_floor:
        one = (med["train"] + med["explain"]) / (med["fit floor 1t"] + med["explain floor"])
        print(f"(train + explain) / (fit floor 1t + explain floor): {one:5.2f}x")
    print(f"train / autolog fit:                          {med['train'] / med['autolog fit']:5.2f}x  (target <= 1.05x)")
    print(f"epochs run: mlflow-xai train {sorted(epochs['train'])}, fit floor {sorted(epochs['fit floor'])}, "
          f"autolog fit {sorted(epochs['autolog fit'])}")
    if stage_runs:
        print_stages(stage_runs)


def print_stages(runs: list[dict[str, float]]) -> None:
    """The median seconds of each stage of the timed train processes (``--stages``)."""
    labels = list(dict.fromkeys(
        ["import cli (click)", "import mlflow (tracking)", "import torch, lightning",
         "import the rest (monitor, mlflow.pytorch, jobs)", *(label for label, _, _ in TRAIN_STAGES)]))
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in [*labels, "command", "in-process",
                                                                         "process wall"]}
    top = sum(med[k] for k in labels if not k.startswith(" "))
    print(f"\ntrain process stages (median of {len(runs)}, s; indented rows are parts of the row above):")
    for k in labels:
        print(f"  {k:<50} {med[k]:6.2f}")
    print(f"  {'other (the command: its imports, data, trainer)':<50} {med['in-process'] - top:6.2f}")
    print(f"  {'interpreter start-up and exit':<50} {med['process wall'] - med['in-process']:6.2f}")
    print(f"  {'process wall':<50} {med['process wall']:6.2f}")


if __name__ == "__main__":
    main()
