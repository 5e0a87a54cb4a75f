"""What the monitor measures on the monitoring batch and the weights, on the training
device: activation moments, alive units, histogram rows. Only scalars and histogram
counts leave the device.

Every statistic and rule is :mod:`mlflow_xai.inspect`'s (``stats``: moments, norms,
histogram rows; ``modules``: which dim holds a layer's units, which units are dead), so
a layer's numbers while training and in the explain run are computed alike; this module
only gathers them from hooks into one vector that DDP ranks can sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlflow_xai.inspect.hooks import first_tensor
from mlflow_xai.inspect.modules import RELU_FAMILY, dead_units, unit_dim
from mlflow_xai.inspect.stats import histogram_rows, moment_sums

__all__ = ["HISTOGRAM_BINS", "ActStats", "NonFiniteWatch", "hist_rows"]

#: Equal-width bins of each per-layer histogram (finite values, min to max).
HISTOGRAM_BINS = 40


def hist_rows(tensors: Sequence[Tensor], bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The monitor's histogram rows: :func:`mlflow_xai.inspect.stats.histogram_rows` with
    :data:`HISTOGRAM_BINS` bins (explain's bins and counts at that bin count)."""
    return histogram_rows(tensors, bins)


@dataclass
class ActStats:
    """Activation statistics of one monitoring forward, gathered by forward hooks.

    Each hook reduces its module's output on the spot, before a later in-place op
    (``ReLU(inplace=True)``) could change it, to ``n, sum, sum of squares``
    (:func:`~mlflow_xai.inspect.stats.moment_sums`) and, for the ReLU family, one number
    per unit: 1 unless the unit is dead by :func:`~mlflow_xai.inspect.modules.dead_units`
    (explain's rule, on the units :func:`~mlflow_xai.inspect.modules.unit_dim` picks).
    :meth:`finish` lays them out as one vector to sum over DDP ranks, after which a unit
    is dead when its number is 0. A module called twice adds up both calls.
    """

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
        m = moment_sums(t)
        self.moments[name] = self.moments[name] + m if name in self.moments else m
        if isinstance(module, RELU_FAMILY):
            alive = (~dead_units(t, dim)).to(m.dtype)
            old = self.alive.get(name)
            self.alive[name] = alive if old is None or old.shape != alive.shape else torch.maximum(old, alive)
        if self.keep_outputs:
            self.outputs[name] = t.clone()

    def finish(self) -> ActStats | None:
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
            self.hist = hist_rows(list(self.outputs.values()))
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


class NonFiniteWatch:
    """Watches the loss of every step for NaN/Inf, without a host sync per step.

    On an accelerator, reading the loss each step would wait for the step to finish; the
    watch keeps, on the device, the index of the first bad step since the last check,
    and :meth:`first_step` reads it once, when the monitor measures anyway. A CPU loss
    costs nothing to read and is checked at once. Either way :meth:`first_step` names the
    first step whose loss was not finite.

    Example:
        >>> watch = NonFiniteWatch(on_device=True)
        >>> for step, loss in enumerate([1.0, float("nan"), float("inf")]):
        ...     watch.update(torch.tensor(loss), step)
        >>> watch.first_step()
        1
    """

    def __init__(self, on_device: bool | None = None) -> None:
        self._on_device = on_device  # None: by the loss's device; True: always accumulate
        self._first: int | None = None
        self._index: Tensor | None = None  # first bad position in _steps, -1 for none
        self._count: Tensor | None = None  # positions seen since the last check
        self._steps: list[int] = []

    def update(self, loss: Tensor, step: int) -> None:
        """Look at ``step``'s loss."""
        if self._first is not None:
            return
        if not (self._on_device or (self._on_device is None and loss.device.type != "cpu")):
            # Reading a CPU number costs no sync; .item() is the cheapest way for a scalar.
            finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all())
            if not finite:
                self._first = step
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if self._index is None or self._count is None:
            self._index = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._count = torch.zeros((), dtype=torch.int64, device=loss.device)
        self._index = torch.where(bad & (self._index < 0), self._count, self._index)
        self._count += 1
        self._steps.append(step)

    def first_step(self) -> int | None:
        """The first step with a NaN/Inf loss seen so far, or None (one host sync)."""
        if self._first is None and self._index is not None and self._steps:
            i = int(self._index.item())
            if i >= 0:
                self._first = self._steps[i]
            else:
                self._count.zero_()  # type: ignore[union-attr]
                self._steps = []
        return self._first
