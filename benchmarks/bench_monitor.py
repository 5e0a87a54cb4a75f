"""What XAIMonitor costs a training: the same fit with the monitor off and on.

The network is the spotpython cookbook's diabetes default shape (10 inputs, l1=16:
hidden sizes [320, 160, 320, 160, 160, 80, 80], ReLU after each, a Linear head),
trained with Adam on 442 random-ish rows in batches of 32 (14 steps per epoch) for 30
epochs, in a plain ``lightning.Trainer`` (no logger, no checkpointing, no progress
bar). The variants run alternately in one process, each ``--repeats`` times, and the
table shows the median wall time of ``trainer.fit``, its ratio to "off", and the median
of each repeat's ratio to the "off" run before it (``paired``: steadier when the
machine's speed drifts):

* ``off``: no callback;
* ``scalars only``: the monitor with ``histogram_every_n_epochs=0``: step scalars and
  epoch-end statistics at the default cadence (the budget below), alerts, the page;
* ``no page``: ``XAIMonitor(training_page=False)``: the defaults below without the
  training page;
* ``defaults``: ``XAIMonitor()``: by default the monitor's own cost (its time in the
  loop, and its writer thread's CPU time for its rows and images) stays within
  ``schedule.BUDGET`` (3%) of the fit's wall time: step scalars, epoch-end statistics and
  images each as often as a third of it allows; the first and the last epoch's ends
  always; the training page at the end. ``defaults`` against ``no page`` is the page's cost;
* ``hist/epoch``: histogram images after every epoch (``histogram_every_n_epochs=1``).

For ``defaults`` the table's last line also gives what the monitor counted against its
budget (its own accounting, independent of the machine's load): seconds spent per kind
over the fit's wall time, and what it measured.

The monitor logs to a fresh run in a sqlite store in a temporary folder (``--server``:
in a real ``mlflow server`` process on 127.0.0.1, the team set-up, where the store's
work happens in the server); creating the run is not timed, writing to it is (``fit``
returns once everything is written).

Target: <= 1.05 x ``off`` with the defaults, on sqlite and against a server. What the
budget cannot remove is fixed per fit: the first and the last epoch's statistics, and the
final write (the last rows and ``xai/training.html``) that ``fit`` waits for, a few
tens of milliseconds on sqlite, which a sub-second fit cannot hide.

Run: ``.venv/bin/python benchmarks/bench_monitor.py [--repeats 3] [--epochs 30] [--server]
[--profile [VARIANT]]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import mlflow
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlflow_xai.config import TunedConfig
from mlflow_xai.monitor import XAIMonitor

N_FEATURES, L1, ROWS, BATCH = 10, 16, 442, 32


class CookbookMLP(L.LightningModule):
    """The cookbook's regression MLP for ``n`` inputs and width ``l1``."""

    def __init__(self, l1: int = L1, n: int = N_FEATURES, lr: float = 1e-3) -> None:
        super().__init__()
        # the cookbook's width rule, from the one place that defines it
        sizes = [n, *TunedConfig(l1=l1).hidden_layer_sizes(n)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.layers = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, N_FEATURES, generator=g)
    y = x @ torch.randn(N_FEATURES, 1, generator=g) + 0.3 * torch.randn(ROWS, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=g)


#: The monitor of the last timed fit, for its own accounting.
LAST: list[XAIMonitor] = []


def fit_seconds(epochs: int, monitor: Callable[[], XAIMonitor] | None) -> tuple[float, float]:
    """Wall and CPU time (this process, all threads) of one ``trainer.fit``; with a
    monitor, inside a fresh MLflow run."""
    torch.manual_seed(0)
    model, loader = CookbookMLP(), data()
    callbacks = [monitor()] if monitor is not None else []
    LAST[:] = callbacks
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    with mlflow.start_run() if monitor is not None else contextlib.nullcontext():
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, loader)
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps a shared machine's load from swamping the timings")
    parser.add_argument("--server", action="store_true",
                        help="log to a real `mlflow server` process on 127.0.0.1 (sqlite behind it) "
                             "instead of a sqlite store in this process")
    parser.add_argument("--profile", nargs="?", const="defaults", default=None, metavar="VARIANT",
                        help="profile one fit of VARIANT (default: 'defaults') instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.server:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from mlflow_server import MlflowServer  # the tests' server helper

            server = MlflowServer(Path(tmp))
            server.start()
            stack.callback(server.stop)
            uri = server.uri
            exp_id = mlflow.MlflowClient(uri).create_experiment("bench")
        else:
            uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            exp_id = mlflow.MlflowClient(uri).create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=exp_id)

        variants: dict[str, Callable[[], XAIMonitor] | None] = {
            "off": None,
            "scalars only": lambda: XAIMonitor(histogram_every_n_epochs=0),
            "no page": lambda: XAIMonitor(training_page=False),
            "defaults": lambda: XAIMonitor(),
            "hist/epoch": lambda: XAIMonitor(histogram_every_n_epochs=1),
        }
        if args.profile:
            fit_seconds(2, variants[args.profile])  # warm-up
            prof = cProfile.Profile()
            prof.runcall(fit_seconds, args.epochs, variants[args.profile])
            pstats.Stats(prof).sort_stats("cumulative").print_stats("mlflow_xai|log_batch|log_image|draw", 30)
            return

        for fn in variants.values():  # warm-up: imports, sqlite schema, allocator
            fit_seconds(2, fn)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        accounted: list[tuple[dict[str, float], float]] = []  # defaults: (spent per kind, wall)
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(fit_seconds(args.epochs, fn))
                if name == "defaults":
                    accounted.append((dict(LAST[0]._spent), times[name][-1][0]))

    steps = args.epochs * math.ceil(ROWS / BATCH)
    print(f"XAIMonitor overhead: cookbook MLP l1={L1}, {ROWS} rows, batch {BATCH}, "
          f"{args.epochs} epochs ({steps} steps), median of {args.repeats} alternating runs")
    print("wall: trainer.fit's elapsed time (median); paired: the median of each run's wall over the "
          "`off` run before it; cpu: CPU time of this process, all its threads (median); best: the fastest run")
    print(f"torch {torch.__version__}, lightning {L.__version__}, mlflow {mlflow.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; store: "
          + ("a local `mlflow server` process (HTTP)" if args.server else "sqlite in this process"))
    # The median is the headline; the best run (least disturbed by other load on the
    # machine) is the steadier estimate of the cost itself.
    off_wall = statistics.median(w for w, _ in times["off"])
    off_cpu = statistics.median(c for _, c in times["off"])
    off_best = min(w for w, _ in times["off"])
    print(f"{'variant':<13} {'wall s':>7} {'ratio':>6} {'paired':>6} {'cpu s':>7} {'ratio':>6} {'best s':>7} "
          f"{'ratio':>6}   wall of each run")
    for name, ts in times.items():
        wall = statistics.median(w for w, _ in ts)
        cpu = statistics.median(c for _, c in ts)
        best = min(w for w, _ in ts)
        # Each run against the `off` run just before it: the machine's drift cancels.
        paired = statistics.median(w / o for (w, _), (o, _) in zip(ts, times["off"], strict=True))
        print(f"{name:<13} {wall:>7.3f} {wall / off_wall:>6.3f} {paired:>6.3f} {cpu:>7.3f} {cpu / off_cpu:>6.3f} "
              f"{best:>7.3f} {best / off_best:>6.3f}   " + " ".join(f"{w:.2f}" for w, _ in ts))
    page = statistics.median(w for w, _ in times["defaults"]) / statistics.median(w for w, _ in times["no page"])
    page_best = min(w for w, _ in times["defaults"]) / min(w for w, _ in times["no page"])
    print(f"training page (defaults / no page): {page:.3f} median, {page_best:.3f} best")
    shares = {kind: statistics.median(spent[kind] / wall for spent, wall in accounted) for kind in accounted[0][0]}
    print("defaults, the monitor's own accounting (median share of the fit's wall time): "
          + ", ".join(f"{kind} {share:.1%}" for kind, share in shares.items())
          + f"; total {sum(shares.values()):.1%} (budget 3%, of which the first and last epoch are fixed)")


if __name__ == "__main__":
    main()
