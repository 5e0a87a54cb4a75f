"""What the monitor measures, on the training device: norms, activation moments, alive
units and histogram rows. Only scalars and histogram counts leave the device.

The layer rules (which dim holds a layer's units, which activations have dead units)
are :mod:`mlflow_xai.inspect.modules`'s, so a layer's numbers while training and in the
explain run are computed alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlflow_xai.inspect.hooks import first_tensor
from mlflow_xai.inspect.modules import RELU_FAMILY, unit_dim

__all__ = ["HISTOGRAM_BINS", "ActStats", "acc_dtype", "hist_rows", "hooked", "norm"]

#: Equal-width bins of each per-layer histogram (finite values, min to max).
HISTOGRAM_BINS = 40


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 sums keep a large batch's moments exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def norm(t: Tensor) -> Tensor:
    """L2 norm of ``t`` as a float32 0-d tensor on its device (no host sync)."""
    # Accumulate in float32 at least: a float16 norm overflows at 65504.
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(t.detach(), dtype=dtype).to(torch.float32)


def hist_rows(tensors: Sequence[Tensor], bins: int = HISTOGRAM_BINS) -> np.ndarray:
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
            acc = acc_dtype(f.device)
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


@dataclass
class ActStats:
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


@contextmanager
def hooked(modules: Mapping[str, nn.Module], hook: Callable[[str, nn.Module, Any], None]) -> Iterator[None]:
    """Forward hooks on ``modules`` for the block, removed even if forward raises."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: hook(name, m, out)))
        yield
    finally:
        for h in handles:
            h.remove()
