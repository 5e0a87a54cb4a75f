"""The fit: the LightningModule, the Trainer, and the fit on the cookbook's split.

The Trainer is built here and only here; Lightning is also imported by the monitor
(a callback) and by :mod:`mlflow_xai.tracking.epochs` (the epoch-metrics callback)
(``tests/test_layering.py`` states who may import it).

EarlyStopping on ``val_loss`` with the config's patience, ModelCheckpoint keeping the
last and the best checkpoint, a TensorBoardLogger, everything seeded; accelerator,
devices and strategy passed through to Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from mlflow_xai.checkpoint import CHECKPOINT_FORMAT, CheckpointMeta
from mlflow_xai.config import TrainerOptions, TunedConfig
from mlflow_xai.data import Dataset, Split
from mlflow_xai.nets import MLP, loss_for

__all__ = ["CHECKPOINT_FORMAT", "ONE_THREAD_PARAMETERS", "FitResult", "XAIModule", "build_trainer",
           "checkpoint_meta", "fit", "fit_threads"]

#: A CPU fit of a network with at most this many parameters runs on one torch intra-op
#: thread (unless ``OMP_NUM_THREADS`` says otherwise). Each operation of such a network on
#: a batch is a few microseconds of work: a second thread adds a barrier per operation,
#: not speed, and when another thread (the monitor's writer) or another process holds a
#: core, each barrier waits for a descheduled thread, several times over the whole
#: one-thread cost of the step. Larger networks keep torch's own thread count.
ONE_THREAD_PARAMETERS = 1_000_000


class XAIModule(L.LightningModule):
    """Trains an :class:`MLP` with the config's optimizer and learning rate.

    ``meta`` (config, task, feature names, standardization) is written into every
    checkpoint under ``mlflow_xai`` as plain Python types, so a checkpoint describes
    itself and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, cfg: TunedConfig, n_in: int, n_out: int, task: str, meta: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.meta = meta
        self.net = MLP(cfg, n_in, n_out)
        self.loss_fn = loss_for(task)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = self.net(x)
        if self.task == "regression":
            out = out.squeeze(-1)
        return self.loss_fn(out, y), out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        # sync_dist: under DDP the epoch value is the mean over every rank's batches (one
        # all-reduce per epoch), so the logged loss and early stopping see the whole data.
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch[0]),
                 sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt_cls = getattr(torch.optim, self.cfg.optimizer)
        return opt_cls(self.net.parameters(), lr=self.cfg.learning_rate)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mlflow_xai"] = self.meta


@dataclass
class FitResult:
    """What a fit left on disk and in memory."""

    module: XAIModule
    trainer: L.Trainer
    checkpoint_dir: Path
    tensorboard_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    epochs_run: int
    interrupted: bool


def build_trainer(
    cfg: TunedConfig,
    out_dir: Path,
    options: TrainerOptions | None = None,
    *,
    callbacks: Sequence[Callback] = (),
) -> tuple[L.Trainer, ModelCheckpoint]:
    """A Trainer with early stopping, last+best checkpoints and TensorBoard logs under ``out_dir``."""
    opts = options or TrainerOptions()
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="best",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_last=True,
    )
    early = EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)
    logger = TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="")
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=opts.accelerator,
        devices=opts.devices,
        strategy=opts.strategy,
        num_nodes=opts.num_nodes,
        callbacks=[early, checkpoint, *callbacks],
        logger=logger,
        # Lightning's bar when interactive; none under --quiet or when stderr is a file or pipe.
        enable_progress_bar=not opts.quiet and sys.stderr.isatty(),
        enable_model_summary=not opts.quiet,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=False,
    )
    return trainer, checkpoint


def loaders(split: Split, task: str, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Training loader over the fit rows (shuffled) and validation loader over the val rows."""
    return _loader(split.X_fit, split.y_fit, task, batch_size, shuffle=True), _loader(
        split.X_val, split.y_val, task, batch_size, shuffle=False
    )


def _loader(X: np.ndarray, y: np.ndarray, task: str, batch_size: int, shuffle: bool) -> DataLoader:
    yt = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
    return DataLoader(TensorDataset(torch.as_tensor(X), yt), batch_size=batch_size, shuffle=shuffle)


def checkpoint_meta(cfg: TunedConfig, ds: Dataset, split: Split, data_spec: str) -> dict[str, Any]:
    """What a checkpoint carries to describe itself (:class:`CheckpointMeta`'s stored form)."""
    return CheckpointMeta.describe(cfg, ds, split, data_spec).to_dict()


def fit(
    cfg: TunedConfig,
    ds: Dataset,
    split: Split,
    out_dir: Path,
    meta: dict[str, Any],
    options: TrainerOptions | None = None,
    *,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Seed everything, build the module and the Trainer, fit; Ctrl-C ends it gracefully.

    A small network on the CPU is fitted on one intra-op thread (:func:`fit_threads`).
    """
    options = options or TrainerOptions()
    if options.quiet:
        # Lightning's info lines (GPU available, tips, model summary) are noise under --quiet.
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    L.seed_everything(split.seed, workers=True, verbose=False)
    module = XAIModule(cfg, ds.X.shape[1], ds.n_out, ds.task, meta)
    trainer, ckpt = build_trainer(cfg, out_dir, options, callbacks=callbacks)
    train_dl, val_dl = loaders(split, ds.task, cfg.batch_size)
    interrupted = False
    n_parameters = sum(p.numel() for p in module.parameters())
    with warnings.catch_warnings(), fit_threads(n_parameters, options):
        # Small tabular data: Lightning's "few workers" and "small log interval" advice does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch/Lightning pytree deprecation
        try:
            trainer.fit(module, train_dl, val_dl)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown followed by sys.exit(1).
            if not trainer.interrupted:
                raise
            interrupted = True
    ckdir = out_dir / "checkpoints"
    last = ckdir / "last.ckpt"
    best = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    score = ckpt.best_model_score
    return FitResult(
        module=module,
        trainer=trainer,
        checkpoint_dir=ckdir,
        tensorboard_dir=out_dir / "tensorboard",
        last_checkpoint=last if last.is_file() else None,
        best_checkpoint=best if best is not None and best.is_file() else None,
        best_score=float(score) if score is not None else None,
        epochs_run=int(trainer.current_epoch),
        interrupted=interrupted,
    )


def _cpu_fit(options: TrainerOptions) -> bool:
    """Whether Lightning will fit on the CPU (``auto`` picks a GPU or MPS when there is one)."""
    if options.accelerator == "cpu":
        return True
    if options.accelerator != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


@contextlib.contextmanager
def fit_threads(n_parameters: int, options: TrainerOptions) -> Iterator[int]:
    """Torch's intra-op threads for a fit: one for a small network on the CPU
    (:data:`ONE_THREAD_PARAMETERS`), torch's own setting otherwise; restored afterwards.

    Yields the thread count the fit runs with. ``OMP_NUM_THREADS`` in the environment
    is the user's choice and is left alone.
    """
    threads = torch.get_num_threads()
    if (threads == 1 or "OMP_NUM_THREADS" in os.environ or n_parameters > ONE_THREAD_PARAMETERS
            or not _cpu_fit(options)):
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


def default_workdir(base: str | os.PathLike[str] | None = None) -> Path:
    """Where a train run keeps its local checkpoints and logs (``./mlflow-xai-runs`` by default)."""
    return Path(base or os.environ.get("MLFLOW_XAI_WORKDIR", "mlflow-xai-runs"))
