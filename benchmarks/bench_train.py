"""What ``mlflow-xai train`` costs over a plain Lightning fit of the same config.

The variants of one tuned config (default: the built-in diabetes config with
``epochs=30, patience=30``, so early stopping never fires and every variant runs
exactly 30 epochs) run alternately in one process (imports warm), ``--repeats`` times:

* ``plain``: the same ``mlflow_xai.train.XAIModule`` and ``mlflow_xai.train.loaders``
  in a bare ``lightning.Trainer`` (same ``max_epochs``, the same EarlyStopping on
  ``val_loss``, no logger, no checkpointing, no progress bar, no model summary);
  the data loading and split are timed too, as ``train_and_log`` does them;
* ``lightning defaults``: ``plain`` with what a ``Trainer`` does out of the box: its
  default ModelCheckpoint (the latest epoch) and TensorBoardLogger;
* ``same trainer``: the Trainer mlflow-xai fits with (``mlflow_xai.train.build_trainer``:
  EarlyStopping, ModelCheckpoint last + best, TensorBoardLogger), without MLflow: what
  the cookbook's Lightning workflow does, so ``mlflow-xai`` over it is MLflow's own cost;
* ``mlflow-xai``: ``mlflow_xai.jobs.train.train_and_log(..., monitor=False, quiet=True)``:
  the fit with last/best checkpoints, TensorBoard and per-epoch metrics, then the
  artifacts (config, checkpoints, event files), the test metrics and the MLflow model
  (torch.export ``pt2``, with signature and input example);
* ``+monitor``: the same with ``monitor=True`` (XAIMonitor with the pipeline's
  defaults, as ``mlflow-xai train`` runs it);
* ``+monitor hist/K`` (``--monitor-hist K``): ``monitor=True`` with histogram images
  every K epochs;
* ``plain+ckpt``, ``plain+tb``, ``plain+metrics`` (``--parts``): ``plain`` plus one of
  the fit's extra pieces (ModelCheckpoint last+best, TensorBoardLogger, the per-epoch
  MLflow metrics callback), to attribute the fit's share of the overhead.

Everything logs to a sqlite store and an artifact folder in a temporary directory.
The table shows the median wall time and its ratio to ``plain``; the breakdown shows
where the time of each mlflow-xai variant goes (median seconds per stage), measured
by wrapping the stages the pipeline calls (``train.fit``, ``tracking.log_*``, ...):
``fit`` is the Lightning fit with mlflow-xai's callbacks, everything else is logging.

Target: ``mlflow-xai`` <= 1.15 x plain Lightning on the default config. Both
baselines are printed: ``plain`` (nothing kept, the strictest) and ``lightning
defaults`` (what "plain Lightning" gives a user who changes nothing). A fixed ~0.45 s of
the difference is ``torch.export`` tracing the model for the ``pt2`` format, the price
of a logged model that loads without unpickling code.

Run: ``.venv/bin/python benchmarks/bench_train.py [--repeats 5] [--epochs 30] [--l1 16]
[--parts] [--no-monitor] [--monitor-hist K] [--threads 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import torch
import torch.export
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from mlflow_xai import checkpoint as ckpt_mod
from mlflow_xai import tracking
from mlflow_xai import train as train_mod
from mlflow_xai.config import TrainerOptions, TunedConfig
from mlflow_xai.data import load_dataset, split_dataset
from mlflow_xai.jobs import train as train_job
from mlflow_xai.train import XAIModule

FIT_TARGET = 1.05  # the fit with the monitor against the same Trainer without MLflow
PROCESS_TARGET = 1.05  # mlflow-xai train against the autolog script, whole processes

# Stages of train_and_log, timed by wrapping the module attributes the pipeline calls.
STAGES: dict[str, list[tuple[Any, str]]] = {
    "fit": [(train_mod, "fit")],
    "log model (pt2)": [(tracking, "log_pytorch_model")],
    "  pt2 export": [(torch.export, "export"), (torch.export, "save")],
    "artifacts": [(tracking, "log_artifact"), (tracking, "log_artifacts")],
    "sha256": [(ckpt_mod, "sha256_file")],
    "params/tags/metrics": [(tracking, "log_params"), (tracking, "set_tags"), (tracking, "log_metrics")],
    "test metrics": [(train_job, "test_metrics")],
}


class StageTimer:
    """Wall time per stage of the current run, by wrapping module-level functions."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.epochs_run: int | None = None
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for stage, targets in STAGES.items():
            for mod, attr in targets:
                orig = getattr(mod, attr)
                self._saved.append((mod, attr, orig))
                setattr(mod, attr, self._wrap(stage, orig))
        try:
            yield
        finally:
            for mod, attr, orig in reversed(self._saved):
                setattr(mod, attr, orig)
            self._saved.clear()

    def _wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.times[stage] += time.perf_counter() - start
            if stage == "fit":
                self.epochs_run = result.epochs_run  # trainer.current_epoch: epochs completed
            return result

        return timed

    def reset(self) -> None:
        self.times = defaultdict(float)
        self.epochs_run = None


def plain_fit(cfg: TunedConfig, part: str | None = None, tmp: Path | None = None) -> tuple[float, int]:
    """The same module, loaders, max_epochs and EarlyStopping in a bare Trainer.

    ``part`` adds one of mlflow-xai's in-fit pieces, to attribute the fit's overhead:
    ``ckpt`` (ModelCheckpoint: last + best), ``tb`` (TensorBoardLogger) or ``metrics``
    (the per-epoch MLflow metrics callback, in a fresh run).
    """
    callbacks: list[Any] = []
    logger: Any = False
    root: str | None = None
    stack = contextlib.ExitStack()
    if part == "defaults":
        # What a Trainer does out of the box: a ModelCheckpoint of the latest epoch and a
        # TensorBoardLogger (tensorboard is installed), both under default_root_dir.
        assert tmp is not None
        logger, root = True, str(tmp / "parts" / str(time.monotonic_ns()))
    elif part == "ckpt":
        assert tmp is not None
        callbacks.append(ModelCheckpoint(dirpath=tmp / "parts" / str(time.monotonic_ns()), filename="best",
                                         monitor="val_loss", mode="min", save_top_k=1, save_last=True))
    elif part == "tb":
        assert tmp is not None
        logger = TensorBoardLogger(save_dir=str(tmp / "parts" / str(time.monotonic_ns())), name="tensorboard",
                                   version="")
    elif part == "metrics":
        # The run is started before the clock (train_and_log's run start is "other"); ending
        # it, which waits for any queued metrics, is timed.
        exp = mlflow.get_experiment_by_name("bench-train")
        stack.enter_context(mlflow.start_run(experiment_id=exp.experiment_id if exp else None))
    start = time.perf_counter()
    ds = load_dataset("diabetes")
    split = split_dataset(ds)
    meta = train_mod.checkpoint_meta(cfg, ds, split, "diabetes")
    L.seed_everything(split.seed, workers=True, verbose=False)
    module = XAIModule(cfg, ds.X.shape[1], ds.n_out, ds.task, meta)
    train_dl, val_dl = train_mod.loaders(split, ds.task, cfg.batch_size)
    with stack:
        if part == "metrics":
            callbacks.append(tracking.epoch_metrics_callback())
        if part == "same":  # mlflow-xai's own Trainer, nothing of MLflow
            assert tmp is not None
            trainer, _ = train_mod.build_trainer(cfg, tmp / "parts" / str(time.monotonic_ns()),
                                                 TrainerOptions(quiet=True))
        else:
            trainer = L.Trainer(
                max_epochs=cfg.epochs,
                accelerator="auto",
                callbacks=[EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience), *callbacks],
                logger=logger,
                default_root_dir=root,
                enable_checkpointing=part in ("ckpt", "defaults"),
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                log_every_n_steps=1,
            )
        trainer.fit(module, train_dl, val_dl)
    return time.perf_counter() - start, int(trainer.current_epoch)


def xai_fit(cfg: TunedConfig, experiment: str, workdir: Path, timer: StageTimer, **kwargs: Any) -> tuple[float, int]:
    timer.reset()
    start = time.perf_counter()
    train_job.train_and_log(cfg, experiment=experiment, workdir=workdir, quiet=True, **kwargs)
    total = time.perf_counter() - start
    timer.times["total"] = total
    return total, timer.epochs_run or -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--l1", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps a shared machine's load from swamping the timings")
    parser.add_argument("--no-monitor", action="store_true", help="skip the monitor=True variant")
    parser.add_argument("--monitor-hist", type=int, default=None, metavar="K",
                        help="add monitor=True with histogram images every K epochs (the default: ~10 per fit)")
    parser.add_argument("--parts", action="store_true",
                        help="add plain fits with one of mlflow-xai's in-fit pieces each: ModelCheckpoint, "
                             "TensorBoardLogger, the per-epoch metrics callback")
    parser.add_argument("--processes", type=int, default=0, metavar="N",
                        help="also time N alternating whole processes: mlflow-xai train (default config, monitor "
                             "on) against the same fit under mlflow.pytorch.autolog()")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process of --processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # Lightning's per-fit info lines, for every variant alike
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

    cfg = replace(TunedConfig(), l1=args.l1, epochs=args.epochs, patience=args.epochs)
    n_params = cfg.parameter_count(10, 1)
    timer = StageTimer()
    variants: dict[str, dict[str, Any] | str | None] = {
        "plain": None, "lightning defaults": "defaults", "same trainer": "same", "mlflow-xai": {"monitor": False}}
    if not args.no_monitor:
        variants["+monitor"] = {"monitor": True}
    if args.monitor_hist is not None:
        variants[f"+monitor hist/{args.monitor_hist}"] = {
            "monitor": True, "monitor_histograms_every_n_epochs": args.monitor_hist}
    if args.parts:
        variants.update({"plain+ckpt": "ckpt", "plain+tb": "tb", "plain+metrics": "metrics"})

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, timer.installed():
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        # The experiment's artifacts go under tmp too (sqlite's default would be ./mlruns).
        mlflow.MlflowClient(uri).create_experiment("bench-train", artifact_location=f"{tmp}/artifacts")

        def run(name: str, c: TunedConfig) -> tuple[float, int]:
            kw = variants[name]
            if kw is None or isinstance(kw, str):
                return plain_fit(c, kw, Path(tmp))
            return xai_fit(c, "bench-train", Path(tmp) / "work", timer, **kw)

        warm = replace(cfg, epochs=2, patience=2)
        for name in variants:  # warm-up: imports, sqlite schema, torch.export, allocator
            run(name, warm)
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        stages: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name in variants:
                cpu0 = time.process_time()
                secs, epochs = run(name, cfg)
                cpus[name].append(time.process_time() - cpu0)
                if epochs != args.epochs:
                    raise SystemExit(f"{name} ran {epochs} epochs, not {args.epochs}: the work differs")
                times[name].append(secs)
                if isinstance(variants[name], dict):
                    stages[name].append(dict(timer.times))

    print(f"train overhead: TunedConfig(l1={args.l1}, epochs={args.epochs}, patience={args.epochs}) "
          f"on diabetes ({n_params:,} params, 141 fit rows, batch {cfg.batch_size}), "
          f"median of {args.repeats} alternating runs")
    print(f"torch {torch.__version__}, lightning {L.__version__}, mlflow {mlflow.__version__}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}")
    print("wall: median wall seconds; min: the fastest run (least disturbed by other load); "
          "cpu: median CPU seconds of this process, all threads (steadier on a shared machine)")
    plain, plain_min, plain_cpu = (statistics.median(times["plain"]), min(times["plain"]),
                                   statistics.median(cpus["plain"]))
    defaults_cpu = statistics.median(cpus["lightning defaults"])
    print(f"{'variant':<18} {'wall s':>7} {'ratio':>6} {'min s':>7} {'ratio':>6} {'cpu s':>7} {'ratio':>6}"
          f" {'cpu/def':>7}   wall of each run")
    for name, ts in times.items():
        med, cpu = statistics.median(ts), statistics.median(cpus[name])
        print(f"{name:<18} {med:>7.3f} {med / plain:>6.3f} {min(ts):>7.3f} {min(ts) / plain_min:>6.3f} "
              f"{cpu:>7.3f} {cpu / plain_cpu:>6.3f} {cpu / defaults_cpu:>7.3f}   "
              + " ".join(f"{t:.2f}" for t in ts))
    print("ratio: against 'plain' (no checkpoint, no logger); cpu/def: CPU time against 'lightning "
          "defaults' (a Trainer as it comes: latest-epoch checkpoint, TensorBoard)")
    same, same_cpu = statistics.median(times["same trainer"]), statistics.median(cpus["same trainer"])
    xai, xai_cpu = statistics.median(times["mlflow-xai"]), statistics.median(cpus["mlflow-xai"])
    print(f"mlflow-xai against 'same trainer' (mlflow_xai.train.build_trainer without MLflow: early "
          f"stopping, last+best checkpoints, TensorBoard): wall {xai / same:.3f}, cpu {xai_cpu / same_cpu:.3f}")

    print("\nbreakdown (median s per stage; fit = Lightning fit with checkpoints, TensorBoard, "
          "per-epoch metrics[, monitor])")
    names = [n for n in variants if isinstance(variants[n], dict)]
    print(f"{'stage':<22}" + "".join(f" {n:>17}" for n in names))
    for stage in [*STAGES, "other (run, data)", "total", "logging = total-fit"]:
        row = f"{stage:<22}"
        for n in names:
            vals = []
            for d in stages[n]:
                if stage == "other (run, data)":
                    vals.append(d["total"] - sum(d.get(s, 0.0) for s in STAGES if not s.startswith(" ")))
                elif stage == "logging = total-fit":
                    vals.append(d["total"] - d.get("fit", 0.0))
                else:
                    vals.append(d.get(stage, 0.0))
            row += f" {statistics.median(vals):>17.3f}"
        print(row)
    row = f"{'fit / plain':<22}"
    for n in names:
        row += f" {statistics.median(d['fit'] for d in stages[n]) / plain:>17.3f}"
    print(row)
    row = f"{'fit / same trainer':<22}"
    for n in names:
        row += f" {statistics.median(d['fit'] for d in stages[n]) / same:>17.3f}"
    print(row + f"   (target <= {FIT_TARGET:g} for +monitor)")
    export = [d.get("  pt2 export", 0.0) for n in names for d in stages[n]]
    print(f"pt2 export (torch.export.export + torch.export.save, inside log_model): median {statistics.median(export):.3f} s")
    if args.processes:
        print()
        compare_processes(args.processes, args.timeout)


def compare_processes(repeats: int, timeout: float) -> None:
    """``mlflow-xai train`` (monitor on, default config) against the same fit under
    ``mlflow.pytorch.autolog()``: whole processes, alternately, in one sqlite store.

    The autolog script is ``bench_demo.py``'s (``--_autolog``): the same module, loaders,
    ``max_epochs`` and EarlyStopping in a bare Trainer, inside ``mlflow.pytorch.autolog()``
    and a run (params, per-epoch metrics, the pickled model). ``autolog fit 1t`` is the same
    on one torch intra-op thread, as ``mlflow-xai train`` fits a network this small.
    """
    import json
    import subprocess
    import sys

    demo = Path(__file__).resolve().parent / "bench_demo.py"
    times: dict[str, list[float]] = {"mlflow-xai train": [], "autolog fit": [], "autolog fit 1t": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-proc-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "config.json").write_text(json.dumps(TunedConfig().to_dict()))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONWARNINGS": "ignore"}
        env.pop("MLFLOW_RUN_ID", None)
        cmds = {"mlflow-xai train": [sys.executable, "-m", "mlflow_xai", "train", "--quiet", "--config", "config.json"],
                "autolog fit": [sys.executable, str(demo), "--_autolog", "config.json", str(tmp)],
                "autolog fit 1t": [sys.executable, str(demo), "--_autolog", "config.json", str(tmp)]}

        def run(name: str) -> float:
            cmd = cmds[name]
            one = {"BENCH_FLOOR_THREADS": "1"} if name.endswith(" 1t") else {}
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, env={**env, **one}, capture_output=True, text=True,
                                  timeout=timeout)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd[:5])}... failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
            return time.perf_counter() - start

        for name in cmds:  # warm-up: page cache, .pyc files, the sqlite schema
            run(name)
        for _ in range(repeats):
            for name in cmds:
                times[name].append(run(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"whole processes, default config (monitor on), median of {repeats} alternating runs:")
    for name, ts in times.items():
        print(f"  {name:<18} {med[name]:6.2f} s   " + " ".join(f"{t:.2f}" for t in ts))
    print(f"  mlflow-xai train / autolog fit: {med['mlflow-xai train'] / med['autolog fit']:.3f}x "
          f"(target <= {PROCESS_TARGET:g}x); against 'autolog fit 1t' (the same on one torch thread, as "
          f"mlflow-xai fits a network this small): {med['mlflow-xai train'] / med['autolog fit 1t']:.3f}x")


if __name__ == "__main__":
    main()
