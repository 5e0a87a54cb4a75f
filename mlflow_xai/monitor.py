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

* every ``log_every_n_steps`` optimizer steps, and on the last batch of each epoch, for
  each layer with a ``weight`` parameter: ``weight_norm/<layer>`` (L2 norm of the
  weight the gradient was computed on), ``grad_norm/<layer>`` (L2 norm of its gradient,
  before any clipping) and ``update_ratio/<layer>`` (``||w_after - w_before|| /
  ||w_before||`` of that optimizer step);
* at each epoch end, on a fixed monitoring batch (the first training batch unless
  ``monitor_batch`` is given; forward in eval mode without gradients, each module's
  training flag restored): ``act_mean/<layer>`` and ``act_std/<layer>`` of the
  activation modules' outputs (of the weight layers' outputs in a network whose
  activations are functional), and ``dead_share/<layer>`` (share of units <= 0 for every
  sample) for ``ReLU``/``ReLU6``;
* every ``histogram_every_n_epochs`` epochs (counted from the first) and after the last
  epoch; by default after the first epoch, after the last, and in between as often as
  :data:`HISTOGRAM_BUDGET` of the training time allows (at most about
  :data:`HISTOGRAM_SNAPSHOTS` per fit): an image per kind under the keys ``xai_weights``, ``xai_gradients`` (the epoch's last
  measured gradient) and ``xai_activations`` with ``step = epoch``, which the MLflow UI's
  image view steps through, and the same histograms in every ``TensorBoardLogger`` of
  the trainer as ``weights/<layer>``, ``gradients/<layer>``, ``activations/<layer>``;
* alerts (thresholds below): the metric ``alert/<kind>`` = 1 at each step where the
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
leave it, once per measured step. Metrics are buffered and written with ``log_batch``
calls that each carry whole steps (never one call per metric), every
:data:`FLUSH_EVERY_S` seconds, when an alert fires, and when training ends; the MLflow
calls run on one background thread, so a slow or remote tracking server does not stall
training, and ``fit`` returns only after everything is written. The histogram snapshots
are the expensive part (three images drawn with Pillow, ~5 ms each, and stored as palette PNGs, ~15 ms
each with a local store): the default spaces them by their measured cost, so that they
take about :data:`HISTOGRAM_BUDGET` of the training time, however short the epochs.

DDP: every rank computes the statistics and takes part in one all-reduce per measured
step and one per epoch end (weights, gradients and updates are replicated, so their mean
is their value; the activation statistics are pooled over the ranks' monitoring
batches); only global rank 0 logs. Activation histograms show rank 0's batch. Sharded
strategies (FSDP, DeepSpeed) are not supported: the norms would be of a shard.
"""

from __future__ import annotations

import functools
import math
import queue
import re
import statistics
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.hooks import LayerSelection, first_tensor, is_leaf, resolve_layers
from mlflow_xai.inspect.modules import RELU_FAMILY, eval_mode, has_weight, unit_dim
from mlflow_xai.reports.training import PAGE_MAX_SNAPSHOTS, TrainingRecord, render_training_page

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from PIL.Image import Image as PILImage

__all__ = [
    "ALERT_KINDS",
    "DEAD_SHARE_ALERT",
    "EXPLODING_FACTOR",
    "EXPLODING_GRAD_NORM",
    "FLUSH_EVERY_S",
    "HISTOGRAM_BINS",
    "HISTOGRAM_BUDGET",
    "HISTOGRAM_SNAPSHOTS",
    "HISTORY_LENGTH",
    "HISTORY_MIN",
    "TRAINING_PAGE_PATH",
    "VANISHING_GRAD_NORM",
    "XAIMonitor",
    "XAIMonitorWarning",
]

# --- Alert thresholds: module level, so a user can read (or deliberately patch) them ---

#: A layer's gradient L2 norm above this is exploding: 1000x the usual clipping norm
#: (1.0). A loss on unscaled regression targets (diabetes targets are ~150) legitimately
#: reaches the hundreds, so the bar sits above that. The explain pass uses the same value.
EXPLODING_GRAD_NORM = 1e3
#: ... or above this multiple of the running median of the layer's own recent gradient
#: norms: a 100x jump within :data:`HISTORY_LENGTH` measurements is divergence, not noise.
EXPLODING_FACTOR = 100.0
#: A layer's gradient L2 norm below this, while its weight norm is > 0, is vanishing:
#: float32's resolution (eps = 1.2e-7) for unit-scale weights, so no learning rate moves
#: them. A layer behind all-dead ReLUs lands here (exactly 0). Same as the explain pass.
VANISHING_GRAD_NORM = 1e-7
#: A ReLU layer with at least this share of dead units (<= 0 on the whole monitoring
#: batch) has lost most of its capacity. The explain pass flags from 0.5; while training,
#: units still revive, so the alert waits for a nearly dead layer.
DEAD_SHARE_ALERT = 0.9
#: Gradient norms kept per layer for the running median of the relative test.
HISTORY_LENGTH = 50
#: Measurements a layer needs before the relative test applies: the first steps move
#: gradient norms by orders of magnitude and have no history to compare with.
HISTORY_MIN = 5
#: NaN/Inf in a weight, a gradient, the loss or an activation raises ``nan``. The first
#: layer named is the first in ``named_modules()`` order with a non-finite weight, else
#: with a non-finite activation (epoch end) or gradient (measured step), else ``loss``:
#: a weight is where a NaN settles, the gradients of all layers before it follow from it.
ALERT_KINDS = ("exploding_gradients", "vanishing_gradients", "dead_units", "nan")

# --- Logging ---

#: Equal-width bins of each per-layer histogram (finite values, min to max).
HISTOGRAM_BINS = 40
#: Histogram snapshots per fit with ``histogram_every_n_epochs=None``. Three images per
#: snapshot cost ~0.3 s; one per epoch of a 500-epoch cookbook run would add minutes and
#: 3000 artifact files, while ten already show how the distributions move.
HISTOGRAM_SNAPSHOTS = 10
#: With ``histogram_every_n_epochs=None``, the share of training time the snapshots
#: between the first and the last epoch may take: the next one waits until the training
#: time since the previous one is ``cost / HISTOGRAM_BUDGET``, ``cost`` being what the
#: previous snapshot took (drawing, histograms, storing). A fit of sub-second epochs gets
#: its first and last snapshot; a fit of minute-long epochs gets ten.
HISTOGRAM_BUDGET = 0.02
#: Buffered metrics go out at most this many seconds after they were measured (and at
#: alerts and at the end of training): a sqlite store costs ~25 ms per call plus ~0.2 ms
#: per metric, an HTTP server a round trip per call, so a few large calls are cheapest.
#: Not fewer: a tracking server writes a batch while training goes on, but whatever is
#: still buffered when training ends is written while ``fit`` waits.
FLUSH_EVERY_S = 2.0
#: Times a writer call is made again after its answer was cut off half-way (1, 2, 4 s
#: apart); each try has MLflow's own retries for a refused or reset connection.
CUT_RETRIES = 3
# MLflow's limit on metrics in one log_batch call (mlflow.utils.validation).
_MAX_METRICS_PER_CALL = 1000
# Characters MLflow accepts in a metric name; others in a layer name become "_".
_BAD_METRIC_CHARS = re.compile(r"[^/\w.\- ]")
_TAG_PREFIX = "mlflow_xai.alert."
#: Artifact path of the training page in the run.
TRAINING_PAGE_PATH = "xai/training.html"
_IMAGE_KEYS = {"weights": "xai_weights", "gradients": "xai_gradients", "activations": "xai_activations"}


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
            optimizer steps (and on each epoch's last batch).
        histogram_every_n_epochs: Log histogram images every this many epochs, counted
            from the first, and after the last; 0 turns histograms off. ``None``: after
            the first and the last epoch, and in between at most every
            ``ceil(max_epochs / 10)`` epochs (10 when ``max_epochs`` is unbounded) and no
            more often than :data:`HISTOGRAM_BUDGET` of the training time allows.
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
        log_every_n_steps: int = 50,
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
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise XAIError(f"log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
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
            import mlflow  # the caller uses MLflow already; resolve now, in this process

            tracking_uri = mlflow.get_tracking_uri()
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
        self._writer: _Writer | None = None
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
        self._history: dict[str, deque[float]] = {}
        self._weight_norm_step = -1  # the step whose weight_norm is already logged
        self._last_epoch = -1  # the last epoch whose end the monitor saw
        self._histogram_logged_epoch = -1
        self._snapshot_done = 0.0  # perf_counter when the last snapshot's drawing ended
        self._snapshot_cost = 0.0  # its seconds in the loop, plus the writer's storing
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._last_flush = 0.0
        self._flush_soon = False  # an alert fired: write at the end of this step
        self._failure_warned = False
        self._record: TrainingRecord | None = None  # the training page's data (rank 0)

    def __getstate__(self) -> dict[str, Any]:
        # DDP spawn pickles callbacks into the workers; a thread cannot travel.
        state = self.__dict__.copy()
        state["_writer"] = None
        return state

    # ------------------------------------------------------------- lifecycle

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Pick the layers, find the run (rank 0), start the writer."""
        if stage != "fit":
            return
        self._close_writer()
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
            acts = [(n, m) for n, m in chosen if _is_activation(m)] or chosen
        self._weight_layers = [(n, m.weight) for n, m in chosen if has_weight(m)]
        self._act_modules = dict(acts)
        # Every leaf is hooked for its output's layout only, so a unit's dim follows the
        # rule explain uses (an activation inherits it from the module called before it).
        self._layout_modules = {n: m for n, m in root.named_modules() if n and is_leaf(m)} | self._act_modules
        self._keys = {n: _BAD_METRIC_CHARS.sub("_", n) for n, _ in chosen}
        self._history = {n: deque(maxlen=HISTORY_LENGTH) for n, _ in self._weight_layers}
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
        found: tuple[MlflowClient, str] | None = None
        error: str | None = None
        if self._logs:
            try:
                found = self._resolve_run(trainer)
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
            self._writer = _Writer(client, self.run_id)
            self._last_flush = time.monotonic()
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

    def _resolve_run(self, trainer: Trainer) -> tuple[MlflowClient, str]:
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow.exceptions import MlflowException

        if self._given_run_id is not None:
            client, run_id, where = mlflow.MlflowClient(self.tracking_uri), self._given_run_id, "run_id"
        elif (active := mlflow.active_run()) is not None:
            client, run_id, where = mlflow.MlflowClient(), active.info.run_id, "the active run"
        else:
            logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
            if logger is None:
                raise XAIError(
                    "XAIMonitor has no MLflow run to log to: pass XAIMonitor(run_id=...), "
                    "train inside `with mlflow.start_run():`, or add an MLFlowLogger to the "
                    "Trainer's loggers"
                )
            client, run_id, where = logger.experiment, str(logger.run_id), "the MLFlowLogger's run"
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise XAIError(
                f"XAIMonitor cannot use {where} {run_id!r} at {client.tracking_uri!r}: "
                f"{(str(e).splitlines() or [''])[0]}; pass the id of an existing run and its "
                "tracking_uri"
            ) from e
        if run.info.lifecycle_stage != "active":
            raise XAIError(
                f"XAIMonitor cannot log to run {run_id!r}: it is {run.info.lifecycle_stage}; "
                "restore it with MlflowClient().restore_run(run_id) or use another run"
            )
        return client, run_id

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        if self._x is None:
            self._capture_batch(batch)
        self._last_grads = []  # training goes on: the last snapshot will not need them
        n = trainer.num_training_batches
        # The last batch of an epoch is always measured, so every epoch has gradient
        # statistics (and its gradient histogram) even when it is shorter than N steps.
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
        step = trainer.global_step
        if step % self.log_every_n_steps != 0 and not self._is_last_batch:
            return
        params = [p for _, p in self._weight_layers]
        with torch.no_grad():
            w_norm = torch.stack([_norm(p) for p in params])
            nan = w_norm.new_tensor(math.nan)
            g_norm = torch.stack([_norm(p.grad) if p.grad is not None else nan for p in params])
            # Copies of only the trainable weights, only on measured steps: the update
            # size needs the weights before the step, which the optimizer changes in place.
            before = [p.detach().clone() if p.requires_grad else None for p in params]
        self._pending = _Pending(step, w_norm, g_norm, [p.grad is not None for p in params], before)
        self._measured_last_batch = self._is_last_batch
        if self._is_last_batch and self._logs and (self._every(trainer) != 0 or self._record is not None):
            # References, not copies: before validation Lightning sets .grad to None
            # (on_validation_model_zero_grad), and if this epoch turns out to be the last,
            # the snapshot at on_train_end still has its gradients. Dropped when the next
            # batch starts, so they never coexist with the next step's gradients.
            self._last_grads = [(n, p.grad) for n, p in self._weight_layers if p.grad is not None]
        if self._logs and (self._histogram_epoch(trainer) or self._page_epoch(trainer)) and (
            self._is_last_batch or trainer.num_training_batches == float("inf")
        ):
            # Bin the epoch's gradients now, while they exist (the next zero_grad drops
            # them); only the counts leave the device.
            grads = [(n, p.grad) for n, p in self._weight_layers if p.grad is not None]
            if grads:
                self._grad_hist = ([n for n, _ in grads], _hist_rows([g for _, g in grads]))

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Finish a measured step: the update size, the loss check, one transfer, log."""
        pending, self._pending = self._pending, None
        if pending is None:
            return  # unmeasured steps cost nothing but the checks above
        params = [p for _, p in self._weight_layers]
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        with torch.no_grad():
            nan = pending.w_norm.new_tensor(math.nan)
            u_norm = torch.stack(
                [_norm(p.detach() - b) if b is not None else nan for p, b in zip(params, pending.before, strict=False)]
            )
            loss_bad = (
                (~torch.isfinite(loss.detach())).any().to(u_norm.device, torch.float32).reshape(1)
                if isinstance(loss, Tensor)
                else u_norm.new_zeros(1)
            )
            vec = self._reduce(trainer, torch.cat([pending.w_norm, pending.g_norm, u_norm, loss_bad]), "mean")
        if not self._logs:
            return
        values = vec.tolist()  # the one device-to-host transfer of this step
        n = len(params)
        self._log_step(pending, values[:n], values[n : 2 * n], values[2 * n : 3 * n], values[-1] > 0)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Activation statistics on the monitoring batch, histograms, a due flush."""
        if not self._active:
            return
        self._pending = None  # a measured step whose batch end never came
        step, epoch = trainer.global_step, trainer.current_epoch
        histograms = self._logs and self._histogram_epoch(trainer)
        page = self._logs and self._page_epoch(trainer)
        # Weight norms belong to the measured steps; only an epoch whose last batch was
        # not measured (an iterable loader of unknown length) gets them here.
        w_norm: Tensor | None = None
        if not self._measured_last_batch and self._weight_layers:
            with torch.no_grad():
                w_norm = torch.stack([_norm(p) for _, p in self._weight_layers])
        self._measured_last_batch = False
        acts = self._activation_stats(trainer, pl_module, keep_outputs=histograms or page)
        vec = self._reduce(trainer, acts.vector, "sum") if acts is not None and acts.vector is not None else None
        if not self._logs:
            return
        parts = [t for t in (w_norm, vec) if t is not None]
        acc = _acc_dtype(parts[0].device) if parts else torch.float64
        values = torch.cat([t.to(acc) for t in parts]).tolist() if parts else []  # one transfer
        n = 0 if w_norm is None else len(self._weight_layers)
        self._log_epoch_end(step, values[:n], values[n:], acts)
        if self._record is not None:
            _record_losses(self._record, trainer, epoch, step)
        if histograms or page:
            started = time.perf_counter()
            kinds = self._histogram_kinds(acts)
            if page and self._record is not None:
                self._record.add_histograms(epoch, step, kinds)
            if histograms:
                self._log_histograms(trainer, epoch, step, kinds, started)
        self._last_epoch = epoch
        self._flush_if_due()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A last histogram snapshot when the last epoch (early stopping, say) had none."""
        epoch = self._last_epoch
        if not self._logs or epoch < 0:
            return
        images = self._every(trainer) != 0 and epoch != self._histogram_logged_epoch
        page = self._record is not None and not self._record.has_snapshot(epoch)
        if not (images or page):
            return
        started = time.perf_counter()
        # The final step's gradients: still in .grad without a validation loop (zero_grad
        # runs before a step), else the references kept at the epoch's last batch.
        grads = [(n, p.grad) for n, p in self._weight_layers if p.grad is not None] or self._last_grads
        self._last_grads = []
        if grads:
            self._grad_hist = ([n for n, _ in grads], _hist_rows([g for _, g in grads]))
        # Rank 0 alone: this forward feeds only the activation histogram, no collective.
        acts = self._activation_stats(trainer, pl_module, keep_outputs=True)
        kinds = self._histogram_kinds(acts)
        if page and self._record is not None:
            self._record.add_histograms(epoch, trainer.global_step, kinds)
        if images:
            self._log_histograms(trainer, epoch, trainer.global_step, kinds, started)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_page()
        self.flush()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # What was measured up to a crash (a NaN, say) is what the user needs most.
        self._write_page()
        self.flush()
        self._close_writer()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.flush()
            self._close_writer()
            self._pending = None
            self._last_grads = []
            self._x = None  # a monitor kept after fit should not pin a device batch

    # ---------------------------------------------------------- measurement

    def _every(self, trainer: Trainer) -> int:
        if self.histogram_every_n_epochs is not None:
            return self.histogram_every_n_epochs
        return _auto_every(trainer.max_epochs)

    def _histogram_epoch(self, trainer: Trainer) -> bool:
        # Decided on rank 0 alone: it only changes what rank 0 keeps, no collective.
        every = self._every(trainer)
        epoch = trainer.current_epoch
        if every == 0:
            return False
        if self.histogram_every_n_epochs is not None or self._histogram_logged_epoch < 0:
            return epoch % every == 0
        if epoch - self._histogram_logged_epoch < every:
            return False
        cost = self._snapshot_cost + (self._writer.image_seconds if self._writer is not None else 0.0)
        return time.perf_counter() - self._snapshot_done >= cost / HISTOGRAM_BUDGET

    def _page_epoch(self, trainer: Trainer) -> bool:
        """An epoch whose histogram counts the training page keeps (rank 0 alone)."""
        if self._record is None:
            return False
        bounded = trainer.max_epochs is not None and trainer.max_epochs > 0
        # Unbounded: every epoch at first; the record halves itself (and doubles its
        # stride) past twice the page's cap, so a long fit keeps a bounded record.
        every = _auto_every(trainer.max_epochs, PAGE_MAX_SNAPSHOTS) if bounded else self._record.stride
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
    ) -> _ActStats | None:
        """Forward the monitoring batch in eval mode without gradients; hooks reduce."""
        if self._x is None or not self._act_modules:
            return None
        x = self._x if self._x.device == pl_module.device else self._x.to(pl_module.device)
        stats = _ActStats(_acc_dtype(x.device), keep_outputs, frozenset(self._act_modules))
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            with _hooked(self._layout_modules, stats.hook):
                pl_module(x)
        return stats.finish()

    # -------------------------------------------------------------- logging

    def _log_step(
        self, p: _Pending, w: list[float], g: list[float], u: list[float], loss_nonfinite: bool
    ) -> None:
        metrics: dict[str, float] = {}
        log_w = p.step != self._weight_norm_step
        self._weight_norm_step = p.step
        bad_weights: list[str] = []
        bad_grads: list[str] = []
        exploding: list[str] = []
        vanishing: list[str] = []
        for i, (name, _) in enumerate(self._weight_layers):
            key = self._keys[name]
            if log_w:
                metrics[f"weight_norm/{key}"] = w[i]
            if not math.isfinite(w[i]):
                bad_weights.append(name)
            if not p.has_grad[i]:
                continue
            metrics[f"grad_norm/{key}"] = g[i]
            if w[i] > 0 and math.isfinite(u[i]):
                metrics[f"update_ratio/{key}"] = u[i] / w[i]
            if not math.isfinite(g[i]):
                if not self._grads_may_overflow:
                    bad_grads.append(name)
                continue
            history = self._history[name]
            if g[i] > EXPLODING_GRAD_NORM or (
                len(history) >= HISTORY_MIN and g[i] > EXPLODING_FACTOR * statistics.median(history) > 0
            ):
                exploding.append(name)
            if g[i] < VANISHING_GRAD_NORM and w[i] > 0:
                vanishing.append(name)
            history.append(g[i])
        if bad_weights or bad_grads or loss_nonfinite:
            first = self._first(bad_weights) or self._first(bad_grads) or "loss"
            self._alert("nan", p.step, first, metrics, "NaN/Inf in weights, gradients or the loss")
        if "nan" not in self.alerts:  # after a NaN the other statistics mean nothing
            if exploding:
                self._alert("exploding_gradients", p.step, exploding[0], metrics,
                            f"gradient norm above {EXPLODING_GRAD_NORM:g} or "
                            f"{EXPLODING_FACTOR:g}x its running median")
            if vanishing:
                self._alert("vanishing_gradients", p.step, vanishing[0], metrics,
                            f"gradient norm below {VANISHING_GRAD_NORM:g} with a nonzero weight")
        self._emit(p.step, metrics)

    def _log_epoch_end(self, step: int, w: list[float], a: list[float], acts: _ActStats | None) -> None:
        metrics: dict[str, float] = {}
        bad_weights: list[str] = []
        if w and step != self._weight_norm_step:
            self._weight_norm_step = step
            for (name, _), value in zip(self._weight_layers, w, strict=False):
                metrics[f"weight_norm/{self._keys[name]}"] = value
                if not math.isfinite(value):
                    bad_weights.append(name)
        bad_acts: list[str] = []
        dead: list[str] = []
        if acts is not None:
            for name, (mean, std, dead_share) in acts.summarize(a).items():
                key = self._keys[name]
                metrics[f"act_mean/{key}"] = mean
                metrics[f"act_std/{key}"] = std
                if not math.isfinite(mean):
                    bad_acts.append(name)
                if dead_share is not None:
                    metrics[f"dead_share/{key}"] = dead_share
                    if dead_share >= DEAD_SHARE_ALERT:
                        dead.append(name)
        if bad_weights or bad_acts:
            first = self._first(bad_weights) or self._first(bad_acts) or ""
            self._alert("nan", step, first, metrics, "NaN/Inf in weights or activations")
        if dead and "nan" not in self.alerts:
            self._alert("dead_units", step, dead[0], metrics,
                        f"at least {DEAD_SHARE_ALERT:.0%} of the units are dead (<= 0 on the "
                        "whole monitoring batch)")
        self._emit(step, metrics)

    def _first(self, names: list[str]) -> str | None:
        """The name that comes first in ``named_modules()`` order; None for none."""
        return min(names, key=self._rank.__getitem__) if names else None

    def _alert(self, kind: str, step: int, layer: str, metrics: dict[str, float], what: str) -> None:
        metrics[f"alert/{kind}"] = 1.0
        if kind in self.alerts:
            return
        self.alerts[kind] = layer
        if self._record is not None:
            self._record.add_alert(kind, layer, step)
        self._tags.update(
            {
                f"{_TAG_PREFIX}{kind}": "true",
                f"{_TAG_PREFIX}{kind}.first_layer": layer,
                f"{_TAG_PREFIX}{kind}.first_step": str(step),
            }
        )
        self._flush_soon = True  # searchable while the run still trains
        if not self.quiet:
            # A warning, not a print: it can be filtered, escalated or captured.
            rank_zero_warn(
                f"XAIMonitor alert {kind} at step {step}, first in layer {layer!r}: {what}",
                category=XAIMonitorWarning,
            )

    def _emit(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self._record is not None:
            self._record.add_metrics(step, values)
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, v, now, step) for k, v in values.items())
        if self._flush_soon:
            self._flush_soon = False
            self.flush(wait=False)
        else:
            self._flush_if_due()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Hand the buffered metrics and tags to the writer; by default wait until written.

        Each ``log_batch`` call carries whole steps (up to MLflow's 1000 metrics per
        call), so a step's metrics never straddle two calls. A failing store is warned
        about once; training goes on. A no-op except on global rank 0 during a fit.

        Args:
            wait: Block until the writer has written everything handed to it so far.
        """
        writer = self._writer
        if writer is None:
            return
        self._last_flush = time.monotonic()
        if self._buffer or self._tags:
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in self._tags.items()]
            for i, chunk in enumerate(_chunks_by_step(self._buffer, _MAX_METRICS_PER_CALL) or [[]]):
                writer.submit(lambda c=chunk, t=(tags if i == 0 else []): writer.client.log_batch(
                    writer.run_id, metrics=c, tags=t))
            self._buffer, self._tags = [], {}
        if wait:
            writer.drain()
        self._warn_failure()

    def _warn_failure(self) -> None:
        writer = self._writer
        if writer is not None and writer.error is not None and not self._failure_warned:
            self._failure_warned = True
            first_line = (str(writer.error).splitlines() or [type(writer.error).__name__])[0]
            warnings.warn(
                f"XAIMonitor stopped logging to MLflow run {writer.run_id}: {first_line}",
                XAIMonitorWarning,
                stacklevel=3,
            )

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._warn_failure()
            self._writer = None

    def _write_page(self) -> None:
        """Hand ``xai/training.html`` to the writer, once per fit."""
        record, writer = self._record, self._writer
        if record is None or writer is None or writer.error is not None:
            return
        self._record = None  # written once, and the next fit starts a new record
        try:
            html = render_training_page(record)
        except Exception as e:  # noqa: BLE001 - a page bug must not fail a finished fit
            warnings.warn(f"XAIMonitor could not build xai/training.html: {type(e).__name__}: {e}",
                          XAIMonitorWarning, stacklevel=2)
            return
        writer.submit(functools.partial(writer.client.log_text, writer.run_id, html, TRAINING_PAGE_PATH))

    def _histogram_kinds(self, acts: _ActStats | None) -> dict[str, tuple[list[str], np.ndarray]]:
        """This snapshot's histogram rows per kind; the epoch's gradient rows are used up."""
        kinds: dict[str, tuple[list[str], np.ndarray]] = {}
        if self._weight_layers:
            kinds["weights"] = (
                [n for n, _ in self._weight_layers],
                _hist_rows([p for _, p in self._weight_layers]),
            )
        if self._grad_hist is not None:
            kinds["gradients"] = self._grad_hist
        if acts is not None and acts.hist is not None:
            kinds["activations"] = (acts.hist_names, acts.hist)
        self._grad_hist = None
        return kinds

    def _log_histograms(self, trainer: Trainer, epoch: int, step: int,
                        kinds: Mapping[str, tuple[list[str], np.ndarray]], started: float) -> None:
        self._histogram_logged_epoch = epoch
        if self.tensorboard:
            _tensorboard_histograms(trainer, kinds, step)
        writer = self._writer
        if writer is not None and writer.error is None:
            writer.image_seconds = 0.0
            for kind, (names, rows) in kinds.items():
                # Drawn here (CPU-bound Python: a thread would only contend for the GIL);
                # encoded and stored by the writer, off the training loop.
                image = _render_grid(f"{kind} - epoch {epoch}, step {step}", names, rows)
                writer.submit(functools.partial(writer.log_image, image, _IMAGE_KEYS[kind], epoch))
        self._snapshot_done = time.perf_counter()
        self._snapshot_cost = self._snapshot_done - started


class _Writer:
    """One daemon thread that makes the MLflow calls, in order, off the training loop.

    A call whose answer was cut off half-way (the server went away while answering,
    which MLflow's HTTP retries do not cover) is made again, up to :data:`CUT_RETRIES`
    times: every call the monitor makes may be repeated (a metric logged twice with the
    same step and timestamp is stored once). Any other failure, or one that outlasts the
    retries, is kept (and later calls dropped) for the monitor to warn about: a broken
    tracking store must not stop a training.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.error: BaseException | None = None
        self.image_seconds = 0.0  # what storing the last snapshot's images took
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="XAIMonitor-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    self._run(job)
            except Exception as e:  # noqa: BLE001 - any store failure: keep it, go on
                self.error = e
            finally:
                self._jobs.task_done()

    @staticmethod
    def _run(job: Callable[[], object]) -> None:
        for attempt in range(CUT_RETRIES + 1):
            try:
                job()
                return
            except Exception as e:
                if attempt == CUT_RETRIES or not answer_cut_off(e):
                    raise
                time.sleep(2.0**attempt)

    def submit(self, job: Callable[[], object]) -> None:
        if self.error is None:
            self._jobs.put(job)

    def log_image(self, image: PILImage, key: str, step: int) -> None:
        started = time.perf_counter()
        self.client.log_image(self.run_id, _paletted(image), key=key, step=step)
        self.image_seconds += time.perf_counter() - started

    def drain(self) -> None:
        self._jobs.join()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


# -------------------------------------------------------------------- helpers


def answer_cut_off(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server's answer broke off half-way.

    MLflow's HTTP client retries a refused or reset connection itself (and then says
    "Max retries exceeded"), but not an answer cut off after it began, as when a server
    is restarted while it answers: that shows as a broken transfer in the chain of
    causes of the ``MlflowException``.
    """
    import requests
    from urllib3.exceptions import MaxRetryError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.exceptions.ChunkedEncodingError):
            return True
        if isinstance(seen, requests.exceptions.ConnectionError):
            return not any(isinstance(a, MaxRetryError) for a in seen.args)
        seen = seen.__cause__ or seen.__context__
    return False


def _auto_every(max_epochs: int | None, snapshots: int = HISTOGRAM_SNAPSHOTS) -> int:
    """Epochs between histogram snapshots for about ``snapshots`` per fit.

    Example:
        >>> _auto_every(30), _auto_every(5), _auto_every(512), _auto_every(-1), _auto_every(512, 100)
        (3, 1, 52, 10, 6)
    """
    if max_epochs is None or max_epochs <= 0:  # unbounded: stopped by steps, time or a callback
        return snapshots
    return max(1, math.ceil(max_epochs / snapshots))


def _record_losses(record: TrainingRecord, trainer: Trainer, epoch: int, step: int) -> None:
    """The epoch's scalar losses Lightning holds (``train_loss``, ``val_loss``, ...)."""
    for name, value in trainer.callback_metrics.items():
        if "loss" in name and isinstance(value, Tensor) and value.numel() == 1:
            record.add_loss(name, epoch, step, float(value))


def _is_activation(module: nn.Module) -> bool:
    # torch.nn.modules.activation holds ReLU, GELU, Tanh, Sigmoid, Softmax, ... and
    # MultiheadAttention, which is a layer, not an activation.
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, nn.MultiheadAttention
    )


def _default_layer(module: nn.Module) -> bool:
    """The modules ``layers=None`` picks: those with a weight, and the activations."""
    return has_weight(module) or _is_activation(module)


def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 sums keep a large batch's moments exact; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _norm(t: Tensor) -> Tensor:
    # Accumulate in float32 at least: a float16 norm overflows at 65504.
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(t.detach(), dtype=dtype).to(torch.float32)


def _hist_rows(tensors: Sequence[Tensor], bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Histograms of several tensors, binned on their device by ``torch.histc``.

    Returns one row per tensor: ``bins`` counts, then the finite min and max, the number
    of finite values, their sum and sum of squares, and numel. Two transfers in all, of a
    few numbers per tensor: the ranges (``histc`` takes them as Python numbers), then the
    counts. NaN and Inf are not binned; ``numel`` minus the finite count says how many.
    """
    heads: list[Tensor] = []
    with torch.no_grad():
        flats = [t.detach().reshape(-1) for t in tensors]
        for f in flats:
            acc = _acc_dtype(f.device)
            if f.numel() == 0:
                heads.append(torch.tensor([math.inf, -math.inf, 0, 0, 0, 0], dtype=acc, device=f.device))
                continue
            finite = torch.isfinite(f)
            zeroed = torch.where(finite, f, 0).to(acc)
            heads.append(
                torch.stack(
                    [
                        torch.where(finite, f, math.inf).amin().to(acc),
                        torch.where(finite, f, -math.inf).amax().to(acc),
                        finite.sum().to(acc),
                        zeroed.sum(),
                        (zeroed * zeroed).sum(),
                        zeroed.new_tensor(float(f.numel())),
                    ]
                )
            )
        head = torch.stack([h.to("cpu", torch.float64) for h in heads])
        counts: list[Tensor] = []
        for f, (lo, hi, n, *_rest) in zip(flats, head.tolist(), strict=False):
            if n == 0:
                counts.append(torch.zeros(bins, device=f.device))
                continue
            if lo == hi:  # a constant tensor: a unit-wide range, as mlflow_xai.inspect does
                lo, hi = lo - 0.5, hi + 0.5
            # histc skips NaN and whatever lies outside [lo, hi] (the Infs).
            counts.append(torch.histc(f if f.dtype == torch.float32 else f.float(), bins, lo, hi))
        return torch.cat([torch.stack([c.to("cpu", torch.float64) for c in counts]), head], dim=1).numpy()


class _HistRow:
    """Named view on one row of :func:`_hist_rows`."""

    def __init__(self, row: np.ndarray) -> None:
        import numpy as np

        bins = len(row) - 6
        self.counts = row[:bins]
        self.lo, self.hi, n, self.total, self.sum_squares, numel = (float(v) for v in row[bins:])
        self.n_finite, self.numel = int(n), int(numel)
        lo, hi = (self.lo - 0.5, self.hi + 0.5) if self.lo == self.hi else (self.lo, self.hi)
        self.edges = np.linspace(lo, hi, bins + 1) if self.n_finite else np.zeros(bins + 1)


def _tensorboard_histograms(
    trainer: Trainer, kinds: Mapping[str, tuple[list[str], np.ndarray]], step: int
) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    for kind, (names, rows) in kinds.items():
        for name, row in zip(names, rows, strict=False):
            h = _HistRow(row)
            if h.n_finite == 0:
                continue  # TensorBoard refuses an empty histogram
            for writer in writers:
                # The raw form takes the counts binned on the device: add_histogram would
                # copy the whole tensor to the host and bin it again in numpy.
                writer.add_histogram_raw(
                    f"{kind}/{name}",
                    min=h.lo,
                    max=h.hi,
                    num=h.n_finite,
                    sum=h.total,
                    sum_squares=h.sum_squares,
                    bucket_limits=h.edges[1:].tolist(),
                    bucket_counts=h.counts.tolist(),
                    global_step=step,
                )


@dataclass
class _ActStats:
    """Activation statistics of one monitoring forward, gathered by forward hooks.

    Each hook reduces its module's output on the spot, before a later in-place op
    (``ReLU(inplace=True)``) could change it, to ``n, sum, sum of squares`` and, for the
    ReLU family, one number per unit: 1 if the unit is > 0 somewhere in the batch.
    :meth:`finish` lays them out as one vector to sum over DDP ranks, after which a unit
    is dead when its number is 0. A module called twice adds up both calls.
    """

    acc: torch.dtype
    keep_outputs: bool  # copies for the histograms (rank 0, histogram epochs only)
    measured: frozenset[str]  # the other hooked modules only give the layout (unit dims)
    moments: dict[str, Tensor] = field(default_factory=dict)
    alive: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    relu_units: dict[str, tuple[int, int]] = field(default_factory=dict)  # (offset, units)
    vector: Tensor | None = None
    hist: np.ndarray | None = None
    hist_names: list[str] = field(default_factory=list)
    _prev: tuple[torch.Size, int | None] | None = None

    def hook(self, name: str, module: nn.Module, output: Any) -> None:
        t = first_tensor(output)
        if t is None or t.numel() == 0:
            return
        dim = unit_dim(t, module, self._prev)
        self._prev = (t.shape, dim)
        if name not in self.measured:
            return
        t = t.detach()
        a = t.to(self.acc)
        m = torch.stack([a.new_tensor(float(t.numel())), a.sum(), (a * a).sum()])
        self.moments[name] = self.moments[name] + m if name in self.moments else m
        if isinstance(module, RELU_FAMILY) and t.dim() >= 2:
            reduce = tuple(d for d in range(t.dim()) if d != dim)
            alive = (torch.amax(t, dim=reduce).reshape(-1) > 0).to(self.acc)
            old = self.alive.get(name)
            self.alive[name] = alive if old is None or old.shape != alive.shape else torch.maximum(old, alive)
        if self.keep_outputs:
            self.outputs[name] = t.clone()

    def finish(self) -> _ActStats | None:
        """Lay out the vector and bin the kept outputs; None if no hook saw a tensor."""
        if not self.moments:
            return None
        self.names = list(self.moments)
        offset = 3 * len(self.names)
        for name, alive in self.alive.items():
            self.relu_units[name] = (offset, alive.numel())
            offset += alive.numel()
        self.vector = torch.cat([*self.moments.values(), *self.alive.values()])
        if self.outputs:
            self.hist_names = list(self.outputs)
            self.hist = _hist_rows(list(self.outputs.values()))
        self.outputs = {}  # free the copies
        return self

    def summarize(self, values: list[float]) -> dict[str, tuple[float, float, float | None]]:
        """``name -> (mean, std, dead share or None)`` from the reduced vector."""
        out: dict[str, tuple[float, float, float | None]] = {}
        for i, name in enumerate(self.names):
            n, s, ss = values[3 * i : 3 * i + 3]
            mean = s / n
            # Population std from pooled sums: exact over ranks of equal batch sizes.
            std = math.sqrt(max(ss / n - mean * mean, 0.0)) if math.isfinite(ss) else math.nan
            dead: float | None = None
            if name in self.relu_units:
                off, k = self.relu_units[name]
                dead = sum(1 for v in values[off : off + k] if v == 0) / k
            out[name] = (mean, std, dead)
        return out


@contextmanager
def _hooked(modules: Mapping[str, nn.Module], hook: Callable[[str, nn.Module, Any], None]) -> Iterator[None]:
    """Forward hooks on ``modules`` for the block, removed even if forward raises."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: hook(name, m, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def _chunks_by_step(metrics: list[Metric], limit: int) -> list[list[Metric]]:
    """Split into calls of at most ``limit`` metrics without splitting a step (unless a
    single step alone exceeds the limit: more than 333 layers)."""
    chunks: list[list[Metric]] = []
    current: list[Metric] = []
    i = 0
    while i < len(metrics):
        j = i
        while j < len(metrics) and metrics[j].step == metrics[i].step:
            j += 1
        block = metrics[i:j]
        if current and len(current) + len(block) > limit:
            chunks.append(current)
            current = []
        while len(block) > limit:
            chunks.append(block[:limit])
            block = block[limit:]
        current.extend(block)
        i = j
    if current:
        chunks.append(current)
    return chunks


def _render_grid(title: str, names: Sequence[str], rows: np.ndarray) -> PILImage:
    """Draw per-layer histograms as a grid of cells; return an RGB image.

    Drawn with Pillow straight onto pixels (one filled outline per layer, its name and
    value range, a mark at zero): ~5 ms an image, where a matplotlib figure of the same
    grid costs ~70 ms. The monitor draws three per snapshot inside the training loop,
    and these thumbnails need no axes machinery.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    n = len(names)
    cols = min(4, max(n, 1))
    nrows = max(1, math.ceil(n / cols))
    cell_w, cell_h, head = _CELL_W, _CELL_H, _TITLE_H
    img = Image.new("RGB", (cell_w * cols, head + cell_h * nrows), _PAPER)
    draw = ImageDraw.Draw(img)
    draw.text((cell_w * cols / 2, 6), title, fill=_INK, font=_font(13), anchor="mt")
    small = _font(11)
    for i, (name, row) in enumerate(zip(names, rows, strict=False)):
        h = _HistRow(row)
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + 10, head + r * cell_h
        width, base, top = cell_w - 20, y0 + cell_h - 8, cell_h - 40
        bad = h.numel - h.n_finite
        if h.n_finite:
            peak = max(float(h.counts.max()), 1.0)
            # x from the bin index, not the edges: hi - lo of diverged weights overflows.
            xs = x0 + width * np.linspace(0.0, 1.0, len(h.counts) + 1)
            ys = base - top * h.counts / peak
            px = np.concatenate([[xs[0]], np.repeat(xs, 2)[1:-1], [xs[-1]]])
            py = np.concatenate([[base], np.repeat(ys, 2), [base]])
            draw.polygon(list(zip(px.tolist(), py.tolist(), strict=False)), fill=_BAR, outline=_BAR_EDGE)
            span = h.edges[-1] - h.edges[0]
            if h.edges[0] < 0 < h.edges[-1] and math.isfinite(span):
                zx = x0 + width * (-h.edges[0]) / span  # where zero is: sign and skew at a glance
                draw.line([(zx, base), (zx, base - top - 4)], fill=_ZERO_MARK, width=1)
            label = f"{name}  [{h.lo:.3g}, {h.hi:.3g}]"
        else:
            label = f"{name}  no finite values"
        if bad:
            label += f"  NaN/Inf: {bad}"
        draw.line([(x0, base), (x0 + width, base)], fill=_AXIS)
        draw.text((c * cell_w + cell_w / 2, y0 + 6), label, fill=_BAD if bad else _INK,
                  font=small, anchor="mt")
    return img


# Pixel sizes of a histogram image: one cell per layer, four cells a row, a title line.
_CELL_W, _CELL_H, _TITLE_H = 240, 120, 24
# The drawing's colours (RGB), and the palette its PNGs are stored with.
_PAPER, _INK, _BAR, _BAR_EDGE = (255, 255, 255), (0, 0, 0), (0x4C, 0x72, 0xB0), (0x2A, 0x4D, 0x7F)
_ZERO_MARK, _AXIS, _BAD = (0x22, 0x22, 0x22), (0x99, 0x99, 0x99), (0xC0, 0x00, 0x7A)


@functools.lru_cache(maxsize=1)
def _palette() -> PILImage:
    """A palette of the drawing's colours, each with 8 shades towards the paper (the
    antialiased edges of text and lines), and a grey ramp: a histogram image maps onto
    it exactly where it is flat and within ~20 of 255 levels on the antialiased edges,
    and a palette PNG encodes ~4x faster than RGB (the monitor stores three per snapshot)."""
    from PIL import Image

    colours = {_PAPER}
    for c in (_INK, _BAR, _BAR_EDGE, _ZERO_MARK, _AXIS, _BAD):
        colours.update(tuple(round(v + (p - v) * t / 8) for v, p in zip(c, _PAPER, strict=True)) for t in range(8))
    colours.update((v, v, v) for v in range(0, 256, 8))
    flat = [v for c in sorted(colours) for v in c]
    image = Image.new("P", (1, 1))
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def _paletted(image: PILImage) -> PILImage:
    """``image`` (a :func:`_render_grid` drawing) on :func:`_palette`, without dithering."""
    from PIL import Image

    return image.quantize(palette=_palette(), dither=Image.Dither.NONE)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()
