"""The per-epoch losses of ``mlflow-xai train``, logged through the run's one writer."""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import mlflow
from lightning.pytorch.callbacks import Callback
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mlflow_xai.tracking.writer import RunWriter, release, shared_writer

if TYPE_CHECKING:
    import lightning as L


class EpochMetrics(Callback):
    """Logs ``train_loss`` and ``val_loss`` each epoch, step = epoch, to the active run.

    The values go to the run's :class:`~mlflow_xai.tracking.writer.RunWriter` (shared
    with the monitor), which sends them in batches off the training loop. A store that
    fails is warned about once; training goes on, the values are kept, and
    ``flush(final=True)`` after the fit tries them once more and raises if that fails
    too. Every epoch's values reach the run whether training ends normally, by an
    exception or by Ctrl-C.
    """

    def __init__(self) -> None:
        active = mlflow.active_run()  # none in a DDP worker, which logs nothing
        self.run_id = active.info.run_id if active is not None else ""
        self.writer: RunWriter | None = None
        self._warned = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.run_id and trainer.is_global_zero and self.writer is None:
            self.writer = shared_writer(MlflowClient(), self.run_id)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads callback_metrics: under DDP the first read all-reduces the
        # epoch's losses (sync_dist), a collective that rank 0 alone would enter out of
        # step with the others' next one (the monitor's) and deadlock or abort.
        values = trainer.callback_metrics
        if self.writer is None or trainer.sanity_checking:
            return
        now = int(time.time() * 1000)
        self.writer.log(Metric(key, float(values[key]), now, trainer.current_epoch)
                        for key in ("train_loss", "val_loss") if key in values)
        self._warn_failure()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.flush(final=True, raise_on_failure=False)

    def flush(self, final: bool = False, raise_on_failure: bool = True) -> None:
        """Send what is buffered; ``final``: end the writer, trying what failed once more.

        Args:
            final: The fit is over: release the writer (its last user closes it).
            raise_on_failure: With ``final``, raise when the last try fails.
        """
        writer = self.writer
        if writer is None:
            return
        if not final:
            writer.flush()
            return
        self.writer = None
        release(writer, raise_on_failure=raise_on_failure)

    def _warn_failure(self) -> None:
        error = self.writer.error if self.writer is not None else None
        if error is not None and not self._warned:
            self._warned = True
            warnings.warn(f"mlflow-xai: logging train_loss/val_loss to MLflow failed ({str(error)[:200]}); "
                          "training goes on, the values are kept and logged at the end", stacklevel=2)


def epoch_metrics_callback() -> EpochMetrics:
    """A Lightning callback logging ``train_loss`` and ``val_loss`` each epoch (:class:`EpochMetrics`)."""
    return EpochMetrics()
