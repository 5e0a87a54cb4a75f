"""XAIMonitor: a Lightning callback that watches weights, gradients and activations
while a network trains, and logs what it sees to an MLflow run.

Works in any user's ``lightning.Trainer``::

    import mlflow
    from mlflow_xai import XAIMonitor

    with mlflow.start_run():
        trainer = lightning.Trainer(max_epochs=20, callbacks=[XAIMonitor()])
        trainer.fit(model, train_loader)

What goes to the run (``<layer>`` is a qualified module name such as ``layers.0``, in the
LightningModule, or in its submodule ``module`` when one is given; a metric's step is
``trainer.global_step``, the number of optimizer steps taken before):

* at measured optimizer steps (by default the first, then as often as the budget below
  allows; ``log_every_n_steps=N``: every N steps and the last batch of each epoch), for each layer with a ``weight`` parameter:
  ``weight_norm/<layer>`` (L2 norm of the weight the gradient was computed on),
  ``grad_norm/<layer>`` (L2 norm of its gradient, before any clipping) and
  ``update_ratio/<layer>`` (``||w_after - w_before|| / ||w_before||`` of that step);
* at measured epoch ends (the first and the last always, the others as the budget
  allows; every epoch with ``log_every_n_steps`` given), on a fixed monitoring batch (the
  first training batch unless ``monitor_batch`` is given; forward in eval mode without
  gradients, each module's training flag restored): ``act_mean/<layer>`` and
  ``act_std/<layer>`` of the activation modules' outputs (of the weight layers' outputs in
  a network whose activations are functional), and ``dead_share/<layer>`` (share of
  units <= 0 for every sample) for ``ReLU``/``ReLU6``: the numbers ``explain`` gives the
  same layer on the same batch (:mod:`mlflow_xai.inspect` computes both);
* every ``histogram_every_n_epochs`` epochs (counted from the first) and after the last
  epoch; by default as often as the budget allows, at most about
  :data:`~mlflow_xai.monitor.schedule.HISTOGRAM_SNAPSHOTS` per fit: an image per kind
  under the keys ``xai_weights``, ``xai_gradients`` (the epoch's last measured gradient)
  and ``xai_activations`` with ``step = epoch``, which the MLflow UI's image view steps
  through, and the same histograms in every ``TensorBoardLogger`` of the trainer as
  ``weights/<layer>``, ``gradients/<layer>``, ``activations/<layer>``;
* alerts (thresholds in :mod:`mlflow_xai.monitor.alerts`): the metric ``alert/<kind>`` = 1 at each step where the
  condition holds and, once, when first seen, a warning line and the run tags
  ``mlflow_xai.alert.<kind> = 'true'``, ``mlflow_xai.alert.<kind>.first_layer`` and
  ``mlflow_xai.alert.<kind>.first_step``, searchable with
  ``mlflow.search_runs(filter_string="tags.`mlflow_xai.alert.nan` = 'true'")``;
* at the end of the fit (also one that stopped on an exception), unless
  ``training_page=False``: ``xai/training.html``, one self-contained page to scrub
  through every layer's weight, gradient and activation histograms over the epochs,
  with the curves above, the alerts and the losses (:mod:`mlflow_xai.reports.training`).
  Its histograms are counts binned at every epoch while ``max_epochs`` <=
  :data:`~mlflow_xai.reports.training.PAGE_MAX_SNAPSHOTS`, else about that many times
  per fit, and after the last epoch (no drawing: a few small tensor ops per layer).

Cost: statistics are computed on the training device; only scalars and histogram counts
leave it, once per measurement; the loss is checked for NaN/Inf at every step without a
host sync on an accelerator (a device flag, read when the monitor measures anyway; the
alert names the first bad step). Metrics are buffered and written with ``log_batch``
calls that each carry whole steps (never one call per metric), every
:data:`~mlflow_xai.tracking.writer.FLUSH_EVERY_S` seconds, when an alert fires, and when
training ends; the MLflow calls run on the run's one writer thread (shared with the epoch
metrics, :mod:`mlflow_xai.tracking.writer`), so a slow or remote
tracking server does not stall training, and ``fit`` returns only after everything is
written. By default the monitor's whole cost (its time in the loop, and its writer's
CPU time for the rows and images it produced) stays within
:data:`~mlflow_xai.monitor.schedule.BUDGET` (3%) of the fit's wall time, however short
the epochs: :mod:`mlflow_xai.monitor.schedule` says when.

DDP: every rank computes the statistics and takes part in one all-reduce per measured
step and one per measured epoch end, and receives rank 0's budget decision (one
broadcast per measurement) (weights, gradients and updates are replicated, so their mean
is their value; the activation statistics are pooled over the ranks' monitoring
batches); only global rank 0 logs. Activation histograms show rank 0's batch. Sharded
strategies (FSDP, DeepSpeed) are not supported: the norms would be of a shard.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.hooks import LayerSelection, forward_hooks, is_leaf, resolve_layers
from mlflow_xai.inspect.modules import eval_mode, has_weight, is_activation
from mlflow_xai.inspect.stats import accumulation_dtype, l2_norm
from mlflow_xai.monitor import alerts as rules
from mlflow_xai.monitor import schedule
from mlflow_xai.monitor.measure import HISTOGRAM_BINS, ActStats, NonFiniteWatch, hist_rows
from mlflow_xai.monitor.render import render_grid
from mlflow_xai.monitor.sinks import (
    MlflowSink,
    TensorBoardSink,
    current_tracking_uri,
    metric_key,
    resolve_run,
)
from mlflow_xai.reports.training import PAGE_MAX_SNAPSHOTS, TrainingRecord, render_training_page

if TYPE_CHECKING:
    import numpy as np

__all__ = ["IMAGE_KEYS", "TRAINING_PAGE_PATH", "XAIMonitor", "XAIMonitorWarning"]

#: Artifact path of the training page in the run.
TRAINING_PAGE_PATH = "xai/training.html"
#: The MLflow image keys of the histogram snapshots, per kind.
IMAGE_KEYS = {"weights": "xai_weights", "gradients": "xai_gradients", "activations": "xai_activations"}


class XAIMonitorWarning(UserWarning):
    """Category of the monitor's warning lines, so a user can filter or escalate them."""


@dataclass
class _Pending:
    """One measured optimizer step, between the gradient hook and the batch end."""

    step: int
    w_norm: Tensor  # (n_weight_layers,) norms of the weights the gradient was taken on
    g_norm: Tensor  # (n_weight_layers,), NaN where a layer has no gradient
    has_grad: list[bool]
    before: list[Tensor | None]  # copies of the trainable weights, None for frozen ones


class XAIMonitor(Callback):
    """Log weight, gradient and activation statistics, histograms and alerts to MLflow.

    Args:
        run_id: MLflow run to log to. Default: the active run (``mlflow.active_run()``),
            else the run of an ``MLFlowLogger`` in ``trainer.loggers``.
        tracking_uri: Tracking URI of ``run_id``'s store. Default: the current
            ``mlflow.get_tracking_uri()``, read when the monitor is created (so spawned
            DDP processes log to the same store).
        log_every_n_steps: Measure gradients, weights and updates every this many
            optimizer steps and on each epoch's last batch, and the activation statistics
            at every epoch end. ``None``: as often as the budget allows (see below).
        histogram_every_n_epochs: Log histogram images every this many epochs, counted
            from the first, and after the last; 0 turns histograms off. ``None``: as
            often as the budget allows, at most every ``ceil(max_epochs / 10)`` epochs
            (10 when ``max_epochs`` is unbounded).

    The budget (the defaults): the monitor's own cost (its time in the training loop and
    the CPU time of its writer thread) stays within
    :data:`~mlflow_xai.monitor.schedule.BUDGET` (3%) of the fit's wall time: step
    scalars, epoch-end statistics and images each get a third, and the next measurement
    of a kind is taken once what the kind spent so far, plus what its last measurement
    cost, fits (:mod:`mlflow_xai.monitor.schedule`). The first and the last epoch's ends
    are always measured; the loss is checked for NaN/Inf at every step.
        monitor_batch: Inputs for the activation statistics, passed as
            ``pl_module(monitor_batch)``. Default: the inputs of the first training batch
            (a tensor batch, or the first element of a tuple/list batch).
        layers: ``None`` (every module with a ``weight`` parameter, and the activation
            modules for the activation statistics), qualified module names
            (``["layers.0", "layers.1"]``) or a predicate ``(name, module) -> bool``
            choosing among those.
        module: Qualified name of the submodule of the LightningModule that holds the
            network (``"net"`` for ``self.net = MLP(...)``): only its layers are watched,
            and named relative to it, as ``mlflow_xai.explain`` names the same network
            (``layers.0``, not ``net.layers.0``). ``None``: the whole LightningModule.
        tensorboard: Also write the histograms to the trainer's TensorBoard loggers.
        quiet: Do not print alert lines (they are still logged as metrics and tags).
        training_page: Write ``xai/training.html`` to the run at the end of the fit.

    Attributes:
        run_id: The run logged to (known after ``setup`` on global rank 0).
        alerts: Alert kind -> first layer, for the alerts raised so far (rank 0).

    Raises:
        XAIError: For a bad argument; at ``setup``, when there is no run to log to, the
            run does not exist or was deleted, or a layer name is unknown.

    Example:
        >>> monitor = XAIMonitor(log_every_n_steps=10, histogram_every_n_epochs=5)
        >>> monitor.alerts
        {}
    """

    def __init__(
        self,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        log_every_n_steps: int | None = None,
        histogram_every_n_epochs: int | None = None,
        monitor_batch: Tensor | None = None,
        layers: LayerSelection = None,
        tensorboard: bool = True,
        quiet: bool = False,
        module: str | None = None,
        training_page: bool = True,
    ) -> None:
        super().__init__()
        if module is not None and (not isinstance(module, str) or not module):
            raise XAIError(f"module must be a submodule's qualified name such as 'net', got {module!r}")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise XAIError(
                "log_every_n_steps must be None (as often as the budget allows) or an integer >= 1, "
                f"got {log_every_n_steps!r}"
            )
        if histogram_every_n_epochs is not None and (
            isinstance(histogram_every_n_epochs, bool)
            or not isinstance(histogram_every_n_epochs, int)
            or histogram_every_n_epochs < 0
        ):
            raise XAIError(
                "histogram_every_n_epochs must be None (about 10 per fit) or an integer >= 0 "
                f"(0 turns histograms off), got {histogram_every_n_epochs!r}"
            )
        if not isinstance(training_page, bool):
            raise XAIError(f"training_page must be True or False, got {training_page!r}")
        if monitor_batch is not None and not isinstance(monitor_batch, Tensor):
            raise XAIError(
                f"monitor_batch must be a torch.Tensor of inputs, got {type(monitor_batch).__name__}"
            )
        if run_id is not None and tracking_uri is None:
            tracking_uri = current_tracking_uri()  # resolve now, in this process
        self._given_run_id = run_id
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.monitor_batch = monitor_batch
        self.layers = layers
        self.module = module
        self.tensorboard = tensorboard
        self.quiet = quiet
        self.training_page = training_page
        self.alerts: dict[str, str] = {}
        self._sink: MlflowSink | None = None
        self._reset()

    def _reset(self) -> None:
        self._active = False  # something to monitor, in a fit
        self._logs = False  # ... and this is global rank 0
        self._weight_layers: list[tuple[str, nn.Parameter]] = []
        self._act_modules: dict[str, nn.Module] = {}
        self._layout_modules: dict[str, nn.Module] = {}
        self._rank: dict[str, int] = {}  # name -> position in named_modules()
        self._keys: dict[str, str] = {}  # name -> metric-safe name
        self._x: Tensor | None = None
        self._no_batch_warned = False
        self._is_last_batch = False
        self._measured_last_batch = False
        self._grads_may_overflow = False
        self._pending: _Pending | None = None
        self._grad_hist: tuple[list[str], np.ndarray] | None = None
        self._last_grads: list[tuple[str, Tensor]] = []  # the epoch's last measured gradients
        self._history = rules.GradHistory([])
        self._weight_norm_step = -1  # the step whose weight_norm is already logged
        self._last_epoch = -1  # the last epoch whose end the monitor saw
        self._histogram_logged_epoch = -1
        self._t0: float | None = None  # perf_counter when training started
        self._spent = {kind: 0.0 for kind in schedule.SHARES}  # seconds each kind has cost
        self._cost: dict[str, float | None] = {kind: None for kind in schedule.SHARES}  # the last one's
        self._step_due = 0  # the next step the budget affords (default cadence)
        self._epoch_due = 0  # ... and the next epoch end
        self._epoch_measured = False  # this epoch's end is measured
        self._images_decided = (-1, False)  # (epoch, whether it gets images)
        self._snapshots = 0  # histogram snapshots taken
        self._pending_seconds = 0.0  # the loop time of the pending step's first half
        self._loss_watch = NonFiniteWatch()
        self._batch_step = 0
        self._flush_soon = False  # an alert fired: write at the end of this step
        self._record: TrainingRecord | None = None  # the training page's data (rank 0)

    def __getstate__(self) -> dict[str, Any]:
        # DDP spawn pickles callbacks into the workers; a thread cannot travel.
        state = self.__dict__.copy()
        state["_sink"] = None
        return state

    # ------------------------------------------------------------- lifecycle

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Pick the layers, find the run (rank 0), start the writer."""
        if stage != "fit":
            return
        self._close_sink()
        self._reset()
        self.alerts = {}
        root = self._root(pl_module)
        self._rank = {n: i for i, (n, _) in enumerate(root.named_modules())}
        chosen = [(n, m) for n, m in resolve_layers(root, self.layers, default=_default_layer) if n]
        acts = chosen
        if self.layers is None or callable(self.layers):
            # "Activations" are the activation modules' outputs; the Linear/Conv outputs
            # before them are pre-activations that would double the metrics. A network
            # with functional activations (F.relu) has none: its layers' outputs then.
            acts = [(n, m) for n, m in chosen if is_activation(m)] or chosen
        self._weight_layers = [(n, m.weight) for n, m in chosen if has_weight(m)]
        self._act_modules = dict(acts)
        # Every leaf is hooked for its output's layout only, so a unit's dim follows the
        # rule explain uses (an activation inherits it from the module called before it).
        self._layout_modules = {n: m for n, m in root.named_modules() if n and is_leaf(m)} | self._act_modules
        self._keys = {n: metric_key(n) for n, _ in chosen}
        self._history = rules.GradHistory([n for n, _ in self._weight_layers])
        # fp16 AMP: an overflowing gradient is normal (the scaler skips that step).
        self._grads_may_overflow = str(trainer.precision) == "16-mixed"
        if not chosen:
            rank_zero_warn(
                "XAIMonitor: no layer to monitor (no module with a weight parameter or an "
                "activation module matches `layers`); it logs nothing",
                category=XAIMonitorWarning,
            )
            return
        self._active = True
        self._logs = trainer.is_global_zero
        found = None
        error: str | None = None
        if self._logs:
            try:
                found = resolve_run(trainer, self._given_run_id, self.tracking_uri)
            except XAIError as e:
                error = str(e)
        if trainer.world_size > 1:
            # Every rank fails with rank 0's message; otherwise the others would wait
            # at the first collective until the DDP timeout.
            error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise XAIError(error)
        if found is not None:
            client, self.run_id = found
            self._sink = MlflowSink(client, self.run_id, warning=XAIMonitorWarning)
            if self.training_page:
                self._record = TrainingRecord(bins=HISTOGRAM_BINS, title="Training dynamics",
                                              run_id=self.run_id, layer_keys=dict(self._keys))
        if self.monitor_batch is not None:
            self._x = self.monitor_batch.detach()

    def _root(self, pl_module: LightningModule) -> nn.Module:
        """The module whose layers are watched (and named from): ``module``, or the whole."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(repr(n) for n, _ in pl_module.named_children()) or "none"
            raise XAIError(
                f"XAIMonitor(module={self.module!r}): {type(pl_module).__name__} has no such submodule; "
                f"its direct submodules are {children}"
            ) from None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()  # the budget is a share of the wall time from here

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        epoch = trainer.current_epoch
        every = self.histogram_every_n_epochs
        # Decided alike on every rank (no clock read here): it decides the collectives.
        self._epoch_measured = schedule.epoch_due(
            epoch, explicit=self.log_every_n_steps is not None, last=self._is_last_epoch(trainer),
            images=bool(every) and (epoch % every == 0 or self._is_last_epoch(trainer)), due=self._epoch_due,
        )

    @staticmethod
    def _is_last_epoch(trainer: Trainer) -> bool:
        return trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        if self._x is None:
            self._capture_batch(batch)
        self._batch_step = trainer.global_step  # the step this batch's loss belongs to
        self._last_grads = []  # training goes on: the last snapshot will not need them
        n = trainer.num_training_batches
        # The last batch of an epoch: its gradients are the epoch's (histograms), and
        # with log_every_n_steps given it is measured, so every epoch has step statistics.
        self._is_last_batch = n != float("inf") and batch_idx + 1 >= n

    def _capture_batch(self, batch: Any) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(x, Tensor):
            # A copy: the loader (or the user) may reuse the batch's memory.
            self._x = x.detach().clone()
        elif not self._no_batch_warned:
            self._no_batch_warned = True
            rank_zero_warn(
                "XAIMonitor: cannot tell the inputs in a batch of type "
                f"{type(batch).__name__}; pass monitor_batch=... to get activation statistics",
                category=XAIMonitorWarning,
            )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Measure weights and gradients just before the optimizer changes the weights."""
        if not self._active or self._pending is not None or not self._weight_layers:
            return  # (a second optimizer on the same batch: measured once, on the first)
        if self._is_last_batch and self._logs and (self.histogram_every_n_epochs != 0 or self._record is not None):
            # References, not copies: before validation Lightning sets .grad to None
            # (on_validation_model_zero_grad), and if this epoch turns out to be the last
            # (early stopping), the snapshot at on_train_end still has its gradients.
            # Dropped when the next batch starts, so they never coexist with the next
            # step's gradients.
            self._last_grads = [(n, p.grad) for n, p in self._weight_layers if p.grad is not None]
        step = trainer.global_step
        if not schedule.step_due(step, every=self.log_every_n_steps, last_batch=self._is_last_batch,
                                 due=self._step_due):
            return
        started = time.perf_counter()
        params = [p for _, p in self._weight_layers]
        with torch.no_grad():
            w_norm = torch.stack([l2_norm(p) for p in params])
            nan = w_norm.new_tensor(math.nan)
            g_norm = torch.stack([l2_norm(p.grad) if p.grad is not None else nan for p in params])
            # Copies of only the trainable weights, only on measured steps: the update
            # size needs the weights before the step, which the optimizer changes in place.
            before = [p.detach().clone() if p.requires_grad else None for p in params]
        self._pending = _Pending(step, w_norm, g_norm, [p.grad is not None for p in params], before)
        self._measured_last_batch = self._is_last_batch
        if self._logs and self._epoch_measured and trainer.num_training_batches == float("inf") and (
            self._images_epoch(trainer) or self._page_epoch(trainer)
        ):
            # An epoch of unknown length: bin the gradients of each measured step now,
            # while they exist (the next zero_grad drops them); the epoch's last measured
            # one is the snapshot's. (An epoch of known length bins its last batch's at its end.)
            self._bin_gradients([(n, p.grad) for n, p in self._weight_layers if p.grad is not None])
        self._pending_seconds = time.perf_counter() - started

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Check the loss; finish a measured step: the update size, one transfer, log."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self._logs and isinstance(loss, Tensor):
            self._loss_watch.update(loss, self._batch_step)
        pending, self._pending = self._pending, None
        if pending is None:
            return  # unmeasured steps cost nothing but the checks above
        started = time.perf_counter()
        params = [p for _, p in self._weight_layers]
        with torch.no_grad():
            nan = pending.w_norm.new_tensor(math.nan)
            u_norm = torch.stack(
                [l2_norm(p.detach() - b) if b is not None else nan for p, b in zip(params, pending.before, strict=False)]
            )
            loss_bad = (
                (~torch.isfinite(loss.detach())).any().to(u_norm.device, torch.float32).reshape(1)
                if isinstance(loss, Tensor)
                else u_norm.new_zeros(1)
            )
            vec = self._reduce(trainer, torch.cat([pending.w_norm, pending.g_norm, u_norm, loss_bad]), "mean")
        if self._logs:
            values = vec.tolist()  # the one device-to-host transfer of this step
            n = len(params)
            rows = self._log_step(pending, values[:n], values[n : 2 * n], values[2 * n : 3 * n], values[-1] > 0)
            self._charge("step", self._pending_seconds + time.perf_counter() - started, rows)
        if self.log_every_n_steps is None:
            self._step_due = self._next_due(trainer, "step", pending.step + 1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Activation statistics on the monitoring batch, histograms, a due flush."""
        if not self._active:
            return
        self._pending = None  # a measured step whose batch end never came
        step, epoch = trainer.global_step, trainer.current_epoch
        if self._logs and self._record is not None:
            _record_losses(self._record, trainer, epoch, step)  # cheap: numbers Lightning holds
        self._last_epoch = epoch
        if self._logs:
            self._check_loss()
        measured, self._epoch_measured = self._epoch_measured, False
        if not measured:
            self._measured_last_batch = False
            return
        started = time.perf_counter()
        histograms = self._logs and self._images_epoch(trainer)
        page = self._logs and self._page_epoch(trainer)
        # Weight norms belong to the measured steps; only an epoch whose last batch was
        # not measured (an iterable loader of unknown length) gets them here.
        w_norm: Tensor | None = None
        if not self._measured_last_batch and trainer.num_training_batches == float("inf") and self._weight_layers:
            with torch.no_grad():
                w_norm = torch.stack([l2_norm(p) for _, p in self._weight_layers])
        self._measured_last_batch = False
        acts = self._activation_stats(trainer, pl_module, keep_outputs=histograms or page)
        vec = self._reduce(trainer, acts.vector, "sum") if acts is not None and acts.vector is not None else None
        if self._logs:
            parts = [t for t in (w_norm, vec) if t is not None]
            acc = accumulation_dtype(parts[0].device) if parts else torch.float64
            values = torch.cat([t.to(acc) for t in parts]).tolist() if parts else []  # one transfer
            n = 0 if w_norm is None else len(self._weight_layers)
            rows = self._log_epoch_end(step, values[:n], values[n:], acts)
            if (histograms or page) and self._last_grads:
                self._bin_gradients(self._last_grads)
            kinds = self._histogram_kinds(acts) if histograms or page else {}
            if page and self._record is not None:
                self._record.add_histograms(epoch, step, kinds)
            self._charge("epoch", time.perf_counter() - started, rows)
            if histograms:
                self._log_histograms(trainer, epoch, step, kinds)
            next_shares_step = schedule.step_due(
                step, every=self.log_every_n_steps, last_batch=trainer.num_training_batches == 1, due=self._step_due
            )
            if self._sink is not None and not next_shares_step:
                # (When the next batch's measurement has this step too, its rows go with
                # these, so that one call carries the whole step.) With the budget's
                # cadence, measured epochs are few: their rows go out now, while training
                # goes on, rather than at the end of the fit, which waits for them.
                if self.log_every_n_steps is None:
                    self._sink.flush(wait=False)
                else:
                    self._sink.flush_if_due()
        if self.log_every_n_steps is None:
            self._epoch_due = self._next_due(trainer, "epoch", epoch + 1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A last histogram snapshot when the last epoch (early stopping, say) had none."""
        epoch = self._last_epoch
        if not self._logs or epoch < 0:
            return
        self._check_loss()
        every = self.histogram_every_n_epochs
        if every is None:  # default images: the last epoch's too only as the budget allows
            images = epoch != self._histogram_logged_epoch and self._images_affordable(trainer, last=True)
        else:
            images = every != 0 and epoch != self._histogram_logged_epoch
        page = self._record is not None and not self._record.has_snapshot(epoch)
        if not (images or page):
            return
        # The final step's gradients: still in .grad without a validation loop (zero_grad
        # runs before a step), else the references kept at the epoch's last batch.
        self._bin_gradients([(n, p.grad) for n, p in self._weight_layers if p.grad is not None] or self._last_grads)
        self._last_grads = []
        # Rank 0 alone: this forward feeds only the activation histogram, no collective.
        acts = self._activation_stats(trainer, pl_module, keep_outputs=True)
        kinds = self._histogram_kinds(acts)
        if page and self._record is not None:
            self._record.add_histograms(epoch, trainer.global_step, kinds)
        if images:
            self._log_histograms(trainer, epoch, trainer.global_step, kinds)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_page()
        self.flush()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # What was measured up to a crash (a NaN, say) is what the user needs most.
        if self._logs:
            self._check_loss()
        self._write_page()
        self.flush()
        self._close_sink()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.flush()
            self._close_sink()
            self._pending = None
            self._last_grads = []
            self._x = None  # a monitor kept after fit should not pin a device batch

    # -------------------------------------------------------------- budget

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def _row_cost(self) -> float:
        return self._sink.row_cost() if self._sink is not None else 0.0

    def _charge(self, kind: str, loop_seconds: float, rows: int) -> None:
        """Count a measurement's cost: its seconds in the loop, and the writer's CPU
        seconds for its rows (measured per row, or :data:`schedule.ROW_COST_GUESS`)."""
        cost = loop_seconds + rows * self._row_cost()
        self._spent[kind] += cost
        self._cost[kind] = cost

    def _next_due(self, trainer: Trainer, kind: str, done: int) -> int:
        """The next step (or epoch) of ``kind`` the budget affords; rank 0's answer on every rank."""
        due = done
        if self._logs:
            due = schedule.next_due(done, self._spent[kind], self._cost[kind] or 0.0, self._elapsed(),
                                    share=schedule.SHARES[kind])
        if trainer.world_size > 1:
            # Once per measurement, which the budget makes rare: every rank must measure
            # the same steps, or their collectives would not meet.
            due = int(trainer.strategy.broadcast(due, src=0))
        return due

    def _images_epoch(self, trainer: Trainer) -> bool:
        """Whether this epoch gets histogram images; decided once per epoch, on rank 0
        alone (it only changes what rank 0 keeps, no collective)."""
        epoch = trainer.current_epoch
        if self._images_decided[0] != epoch:
            every = self.histogram_every_n_epochs
            if every is not None:
                due = every > 0 and (epoch % every == 0 or self._is_last_epoch(trainer))
            else:
                due = self._images_affordable(trainer, last=self._is_last_epoch(trainer))
            self._images_decided = (epoch, due)
        return self._images_decided[1]

    def _images_affordable(self, trainer: Trainer, last: bool) -> bool:
        sink = self._sink
        if sink is None or sink.error is not None:
            return False
        store = sink.image_cost()
        spent = self._spent["images"] + store * self._snapshots * len(IMAGE_KEYS)
        cost = None if self._cost["images"] is None else self._cost["images"] + store * len(IMAGE_KEYS)
        return schedule.images_due(
            trainer.current_epoch, every=None, last=last, last_logged=self._histogram_logged_epoch,
            spacing=schedule.auto_every(trainer.max_epochs), spent=spent, cost=cost, elapsed=self._elapsed(),
            share=schedule.SHARES["images"],
        )

    def _check_loss(self) -> None:
        """Alert on the first NaN/Inf loss since the last check, at the step it happened."""
        step = self._loss_watch.first_step()
        if step is None or "nan" in self.alerts:
            return
        metrics: dict[str, float] = {}
        self._alert(rules.Alert("nan", "loss", "NaN/Inf loss"), step, metrics)
        self._emit(step, metrics)

    # ---------------------------------------------------------- measurement

    def _page_epoch(self, trainer: Trainer) -> bool:
        """An epoch whose histogram counts the training page keeps (rank 0 alone)."""
        if self._record is None:
            return False
        bounded = trainer.max_epochs is not None and trainer.max_epochs > 0
        # Unbounded: every epoch at first; the record halves itself (and doubles its
        # stride) past twice the page's cap, so a long fit keeps a bounded record.
        every = schedule.auto_every(trainer.max_epochs, PAGE_MAX_SNAPSHOTS) if bounded else self._record.stride
        return trainer.current_epoch % every == 0

    @staticmethod
    def _reduce(trainer: Trainer, vec: Tensor, op: str) -> Tensor:
        # Every rank gets here at the same steps (the decision depends only on
        # global_step, batch_idx and the epoch), so the collective cannot hang.
        if trainer.world_size > 1:
            vec = trainer.strategy.reduce(vec, reduce_op=op)
        return vec

    def _activation_stats(
        self, trainer: Trainer, pl_module: LightningModule, keep_outputs: bool
    ) -> ActStats | None:
        """Forward the monitoring batch in eval mode without gradients; hooks reduce."""
        if self._x is None or not self._act_modules:
            return None
        x = self._x if self._x.device == pl_module.device else self._x.to(pl_module.device)
        stats = ActStats(keep_outputs, frozenset(self._act_modules))
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            with forward_hooks(self._layout_modules.items(), stats.hook):
                pl_module(x)
        return stats.finish()

    # -------------------------------------------------------------- logging

    def _log_step(
        self, p: _Pending, w: list[float], g: list[float], u: list[float], loss_nonfinite: bool
    ) -> int:
        """Log one measured step's metrics and alerts; returns the number of metric rows."""
        metrics: dict[str, float] = {}
        log_w = p.step != self._weight_norm_step
        self._weight_norm_step = p.step
        names = [n for n, _ in self._weight_layers]
        medians = {n: self._history.median(n) for n in names}
        for i, name in enumerate(names):
            key = self._keys[name]
            if log_w:
                metrics[f"weight_norm/{key}"] = w[i]
            if not p.has_grad[i]:
                continue
            metrics[f"grad_norm/{key}"] = g[i]
            if w[i] > 0 and math.isfinite(u[i]):
                metrics[f"update_ratio/{key}"] = u[i] / w[i]
            if math.isfinite(g[i]):
                self._history.add(name, g[i])
        first_bad_loss = self._loss_watch.first_step()
        if first_bad_loss is not None and first_bad_loss < p.step:
            self._check_loss()  # an earlier step's loss: alerted at that step
        events = rules.step_alerts(
            names, w, g, p.has_grad, medians, loss_nonfinite=loss_nonfinite or first_bad_loss == p.step,
            grads_may_overflow=self._grads_may_overflow, nan_seen="nan" in self.alerts, order=self._rank,
        )
        for event in events:
            self._alert(event, p.step, metrics)
        self._emit(p.step, metrics)
        return len(metrics)

    def _log_epoch_end(self, step: int, w: list[float], a: list[float], acts: ActStats | None) -> int:
        """Log one measured epoch end's metrics and alerts; returns the number of metric rows."""
        metrics: dict[str, float] = {}
        weights: dict[str, float] = {}
        if w and step != self._weight_norm_step:
            self._weight_norm_step = step
            weights = {name: value for (name, _), value in zip(self._weight_layers, w, strict=False)}
            for name, value in weights.items():
                metrics[f"weight_norm/{self._keys[name]}"] = value
        summary = acts.summarize(a) if acts is not None else {}
        for name, (mean, std, dead_share) in summary.items():
            key = self._keys[name]
            metrics[f"act_mean/{key}"] = mean
            metrics[f"act_std/{key}"] = std
            if dead_share is not None:
                metrics[f"dead_share/{key}"] = dead_share
        for event in rules.epoch_alerts(weights, summary, nan_seen="nan" in self.alerts, order=self._rank):
            self._alert(event, step, metrics)
        self._emit(step, metrics, timed_flush=False)  # the caller flushes when due
        return len(metrics)

    def _alert(self, event: rules.Alert, step: int, metrics: dict[str, float]) -> None:
        metrics[f"alert/{event.kind}"] = 1.0
        if event.kind in self.alerts:
            return
        self.alerts[event.kind] = event.layer
        if self._record is not None:
            self._record.add_alert(event.kind, event.layer, step)
        if self._sink is not None:
            self._sink.add_tags(rules.alert_tags(event.kind, event.layer, step))
        self._flush_soon = True  # searchable while the run still trains
        if not self.quiet:
            # A warning, not a print: it can be filtered, escalated or captured.
            rank_zero_warn(
                f"XAIMonitor alert {event.kind} at step {step}, first in layer {event.layer!r}: {event.what}",
                category=XAIMonitorWarning,
            )

    def _emit(self, step: int, values: dict[str, float], timed_flush: bool = True) -> None:
        if self._record is not None:
            self._record.add_metrics(step, values)
        if self._sink is None:
            return
        self._sink.add_metrics(step, values)
        if self._flush_soon:
            self._flush_soon = False
            self._sink.flush(wait=False)
        elif timed_flush:
            self._sink.flush_if_due()

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics and tags to the writer; by default wait until written.

        Each ``log_batch`` call carries whole steps (up to MLflow's 1000 metrics per
        call), so a step's metrics never straddle two calls. A failing store is warned
        about once; training goes on. A no-op except on global rank 0 during a fit.

        Args:
            wait: Block until the writer has written everything handed to it so far.
        """
        if self._sink is not None:
            self._sink.flush(wait=wait)

    def _close_sink(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _write_page(self) -> None:
        """Hand ``xai/training.html`` to the writer, once per fit (also after a store
        failure: the writer tries what it could not send once more when the fit ends)."""
        record, sink = self._record, self._sink
        if record is None or sink is None:
            return
        self._record = None  # written once, and the next fit starts a new record
        try:
            html = render_training_page(record)
        except Exception as e:  # noqa: BLE001 - a page bug must not fail a finished fit
            warnings.warn(f"XAIMonitor could not build xai/training.html: {type(e).__name__}: {e}",
                          XAIMonitorWarning, stacklevel=2)
            return
        sink.log_text(html, TRAINING_PAGE_PATH)

    def _bin_gradients(self, grads: list[tuple[str, Tensor]]) -> None:
        """The histogram rows of the epoch's gradients (only the counts leave the device)."""
        if grads:
            self._grad_hist = ([n for n, _ in grads], hist_rows([g for _, g in grads]))

    def _histogram_kinds(self, acts: ActStats | None) -> dict[str, tuple[list[str], np.ndarray]]:
        """This snapshot's histogram rows per kind; the epoch's gradient rows are used up."""
        kinds: dict[str, tuple[list[str], np.ndarray]] = {}
        if self._weight_layers:
            kinds["weights"] = (
                [n for n, _ in self._weight_layers],
                hist_rows([p for _, p in self._weight_layers]),
            )
        if self._grad_hist is not None:
            kinds["gradients"] = self._grad_hist
        if acts is not None and acts.hist is not None:
            kinds["activations"] = (acts.hist_names, acts.hist)
        self._grad_hist = None
        return kinds

    def _log_histograms(self, trainer: Trainer, epoch: int, step: int,
                        kinds: Mapping[str, tuple[list[str], np.ndarray]]) -> None:
        started = time.perf_counter()
        self._histogram_logged_epoch = epoch
        if self.tensorboard:
            TensorBoardSink(trainer).log_histograms(kinds, step)
        sink = self._sink
        if sink is not None and sink.error is None:
            for kind, (names, rows) in kinds.items():
                # Drawn here (CPU-bound Python: a thread would only contend for the GIL);
                # encoded and stored by the writer, off the training loop.
                sink.log_image(render_grid(f"{kind} - epoch {epoch}, step {step}", names, rows),
                               IMAGE_KEYS[kind], epoch)
        self._snapshots += 1
        self._charge("images", time.perf_counter() - started, 0)


def _record_losses(record: TrainingRecord, trainer: Trainer, epoch: int, step: int) -> None:
    """The epoch's scalar losses Lightning holds (``train_loss``, ``val_loss``, ...)."""
    for name, value in trainer.callback_metrics.items():
        if "loss" in name and isinstance(value, Tensor) and value.numel() == 1:
            record.add_loss(name, epoch, step, float(value))


def _default_layer(module: nn.Module) -> bool:
    """The modules ``layers=None`` picks: those with a weight, and the activations."""
    return has_weight(module) or is_activation(module)
