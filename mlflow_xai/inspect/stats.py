"""Summary statistics and histograms of one tensor, computed with torch on its device.

Both functions work over the *finite* values only: NaN and +/-Inf are counted in
:class:`~mlflow_xai.inspect.results.TensorStats` and never binned, so one bad value
cannot turn every moment into NaN or stretch a histogram to infinity.

The tensor is read in fixed-size chunks, each cast to float64 into a reused buffer:
the moments of a 13M-value float32 matrix keep full precision, no temporary is ever
larger than one chunk (the 500M-parameter budget has no room for a float64 copy of a
weight matrix), and there is no sort and no Python loop over elements. Two passes:
moments, min/max and the near-zero count first, then the histogram over that range.

Per chunk the mean is a float64 sum and the spread a BLAS dot product of the centred
values (exact two-pass variance, cheaper than ``torch.var_mean``); on the CPU the
histogram is ``bincount`` of the bin index computed as ``torch.histc`` computes it
(same operations in the same order, so the same counts), cheaper than ``histc``.
On the CPU the passes run on one torch thread, restored afterwards.
``benchmarks/bench_explain.py`` measures what these cost in ``explain``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.results import Histogram, TensorStats

__all__ = [
    "accumulation_dtype",
    "bin_range",
    "histogram",
    "histogram_rows",
    "l2_norm",
    "moment_sums",
    "one_thread",
    "stats_and_histogram",
    "tensor_stats",
]

# CPU: 128K values = 1 MB as float64, cache-resident across the reductions run on it.
# The passes run on one intra-op thread (see one_thread), where small chunks are the
# fastest; with several threads they collapsed whenever other processes took a core.
_CHUNK = 1 << 17
# GPU: 16M values = 128 MB; each chunk costs kernel launches and host syncs, so fewer
# and larger chunks win, and the temporaries still stay far below the memory budget.
_CHUNK_ACCEL = 1 << 24

_NAN = float("nan")


@contextlib.contextmanager
def one_thread(t: torch.Tensor) -> Iterator[None]:
    """Run the CPU passes over ``t`` on one torch intra-op thread; the thread count is restored after.

    For statistics: each pass is a handful of memory-bound operations on one small chunk: a second
    thread adds little bandwidth but a barrier per operation, and when another process
    holds a core that barrier waits for a descheduled thread, several times over the
    whole single-thread cost. Accelerator tensors are left alone. The thread count is
    process-wide: torch work running at the same time in another Python thread runs on
    one thread too until the block ends.
    """
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Moments:
    """Running totals over the chunks; merged with Chan's parallel variance update."""

    numel: int = 0
    finite: int = 0
    nan: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    lo: float = math.inf
    hi: float = -math.inf
    near_zero: int = 0

    def add(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.finite + n
        delta = mean - self.mean
        # Chan et al.: exact merge of two (count, mean, M2) summaries, stable in float64.
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.finite * n / total
        self.finite = total


class _Scratch:
    """Chunk-sized float64 (and, for the histogram, int64) buffers reused across chunks and passes.

    Fresh temporaries per chunk cost more in page faults than the arithmetic;
    reusing two buffers keeps each pass at memory speed. When the tensor fits in one
    chunk, the histogram pass reuses the float64 values the moments pass converted.
    """

    def __init__(self, t: torch.Tensor) -> None:
        if t.is_complex():
            raise XAIError(f"complex tensors are not supported (dtype {t.dtype}); pass t.abs() or t.real")
        flat = t.detach().reshape(-1)  # a view for contiguous tensors, so no full copy
        step = _CHUNK if flat.device.type == "cpu" else _CHUNK_ACCEL
        self.chunks = [flat[i : i + step] for i in range(0, flat.numel(), step)]
        size = min(flat.numel(), step)
        self._f64 = None if t.dtype == torch.float64 else torch.empty(size, dtype=torch.float64, device=t.device)
        self._tmp = torch.empty(size, dtype=torch.float64, device=t.device)
        self._index: torch.Tensor | None = None  # int64 bin indices, allocated on first use
        self._holds: int | None = None  # index of the chunk now in _f64

    def f64(self, i: int) -> torch.Tensor:
        """Chunk ``i`` as float64: a view for float64 tensors, else the shared buffer."""
        raw = self.chunks[i]
        if self._f64 is None:
            return raw
        out = self._f64[: raw.numel()]
        if self._holds != i:
            out.copy_(raw)
            self._holds = i
        return out

    def near_zero(self, c: torch.Tensor, eps: float) -> int:
        """Values with ``abs(v) <= eps``, compared in place in the scratch buffer."""
        buf = self._tmp[: c.numel()]
        return int(torch.count_nonzero(torch.abs(c, out=buf).le_(eps)).item())

    def mean_m2(self, c: torch.Tensor) -> tuple[float, float]:
        """Mean and sum of squared deviations of a float64 chunk: a sum, then a dot product
        of the centred values (in the scratch buffer). NaN/Inf when the chunk holds any."""
        n = c.numel()
        mean = c.sum().item() / n
        if not math.isfinite(mean):
            return mean, mean
        centred = torch.sub(c, mean, out=self._tmp[:n])
        return mean, torch.dot(centred, centred).item()

    def bin_counts(self, c: torch.Tensor, bins: int, lo: float, hi: float) -> np.ndarray:
        """``torch.histc(c, bins, lo, hi)`` for a chunk of finite values within ``[lo, hi]``.

        The bin index is ``(v - lo) * bins / (hi - lo)``, truncated, the last edge folded
        into the last bin: histc's own arithmetic, step by step in float64, so the counts
        are the same; ``bincount`` then does in one pass what histc does slowly on a CPU.
        """
        n = c.numel()
        if self._index is None:
            self._index = torch.empty(self._tmp.numel(), dtype=torch.int64, device=c.device)
        pos = torch.sub(c, lo, out=self._tmp[:n]).mul_(bins).div_(hi - lo)
        index = self._index[:n]
        index.copy_(pos)  # float -> int truncates toward zero: the floor, as pos >= 0
        index.clamp_(max=bins - 1)  # v == hi
        return torch.bincount(index, minlength=bins).numpy()


def _moments(scratch: _Scratch, numel: int, near_zero_eps: float) -> _Moments:
    acc = _Moments(numel=numel)
    for i in range(len(scratch.chunks)):
        c = scratch.f64(i)
        mean, m2 = scratch.mean_m2(c)
        if not (math.isfinite(mean) and math.isfinite(m2)):
            # Slow path, only for chunks that hold NaN/Inf (or overflow float64).
            acc.nan += int(torch.isnan(c).sum().item())
            c = c[torch.isfinite(c)]
            if c.numel() == 0:
                continue
            var, mean_t = torch.var_mean(c, correction=0)
            mean, m2 = mean_t.item(), var.item() * c.numel()
        n = c.numel()
        lo, hi = torch.aminmax(c)
        acc.lo = min(acc.lo, lo.item())
        acc.hi = max(acc.hi, hi.item())
        acc.near_zero += scratch.near_zero(c, near_zero_eps)
        acc.add(n, mean, m2)
    return acc


def _stats_from(acc: _Moments) -> TensorStats:
    inf = acc.numel - acc.finite - acc.nan
    if acc.finite == 0:
        return TensorStats(acc.numel, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, acc.nan, inf)
    var = max(acc.m2 / acc.finite, 0.0)
    # sum(x^2) = n * (var + mean^2): exact in float64, saves a further pass over the data.
    l2 = math.sqrt(acc.finite * (var + acc.mean * acc.mean))
    return TensorStats(
        numel=acc.numel,
        mean=acc.mean,
        std=math.sqrt(var),
        min=acc.lo,
        max=acc.hi,
        l2_norm=l2,
        near_zero_share=acc.near_zero / acc.finite,
        nan_count=acc.nan,
        inf_count=inf,
    )


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise XAIError(f"bins must be a positive integer, got {bins!r}")


def bin_range(lo: float, hi: float) -> tuple[float, float]:
    """Bin range from the finite min/max; widened around a constant so edges increase.

    Example:
        >>> bin_range(2.0, 2.0), bin_range(math.inf, -math.inf)
        ((1.5, 2.5), (-0.5, 0.5))
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):  # no finite value at all
        return -0.5, 0.5
    if lo == hi:
        return lo - 0.5, hi + 0.5
    return lo, hi


def _histogram(scratch: _Scratch, bins: int, lo: float, hi: float, all_finite: bool = False) -> Histogram:
    lo, hi = bin_range(lo, hi)
    counts = np.zeros(bins, dtype=np.int64)
    # The bincount path needs every value finite (NaN has no bin) and a finite scale.
    fast = (
        all_finite
        and bool(scratch.chunks)
        and scratch.chunks[0].device.type == "cpu"
        and math.isfinite((hi - lo) * bins)
    )
    # Later chunks first: the buffer still holds the last chunk the moments pass read.
    for i in reversed(range(len(scratch.chunks))):
        if fast:
            counts += scratch.bin_counts(scratch.f64(i), bins, lo, hi)
            continue
        # histc skips NaN and values outside [lo, hi], so +/-Inf are never binned.
        counts += torch.histc(scratch.f64(i), bins=bins, min=lo, max=hi).cpu().numpy().astype(np.int64)
    return Histogram(
        counts=counts,
        edges=np.linspace(lo, hi, bins + 1, dtype=np.float64),
    )


def tensor_stats(t: torch.Tensor, near_zero_eps: float = 1e-6) -> TensorStats:
    """Summary statistics of a tensor over its finite values.

    ``std`` is the population standard deviation (``ddof=0``, as ``numpy.std``).
    ``near_zero_share`` is the share of finite values with ``abs(v) <= near_zero_eps``.
    When no value is finite, every moment (and ``near_zero_share``) is NaN.

    Args:
        t: Any real tensor, on any device; it is not modified or copied whole.
        near_zero_eps: Half-width of the band around zero counted as "near zero".

    Returns:
        The :class:`TensorStats` of ``t``.

    Example:
        >>> s = tensor_stats(torch.tensor([1.0, -1.0, float("nan")]))
        >>> s.mean, s.std, s.nan_count
        (0.0, 1.0, 1)
    """
    with one_thread(t):
        return _stats_from(_moments(_Scratch(t), t.numel(), near_zero_eps))


def histogram(t: torch.Tensor, bins: int = 50) -> Histogram:
    """Equal-width histogram of the finite values of a tensor.

    The bins span the finite min to max; a constant tensor gets one unit-wide range
    centred on its value, and a tensor without finite values gets empty counts on
    ``[-0.5, 0.5]``, so the edges always increase strictly.

    Args:
        t: Any real tensor, on any device.
        bins: Number of bins.

    Returns:
        A :class:`Histogram` with ``bins`` counts and ``bins + 1`` edges.

    Example:
        >>> h = histogram(torch.tensor([0.0, 1.0, 1.0]), bins=2)
        >>> h.counts.tolist(), h.edges.tolist()
        ([1, 2], [0.0, 0.5, 1.0])
    """
    _check_bins(bins)
    with one_thread(t):
        scratch = _Scratch(t)
        acc = _moments(scratch, t.numel(), 0.0)
        return _histogram(scratch, bins, acc.lo, acc.hi, acc.finite == acc.numel)


def stats_and_histogram(
    t: torch.Tensor, bins: int = 50, near_zero_eps: float = 1e-6
) -> tuple[TensorStats, Histogram]:
    """Both :func:`tensor_stats` and :func:`histogram`, sharing the min/max pass.

    Example:
        >>> s, h = stats_and_histogram(torch.arange(4.0), bins=4)
        >>> s.max, h.counts.tolist()
        (3.0, [1, 1, 1, 1])
    """
    _check_bins(bins)
    with one_thread(t):
        scratch = _Scratch(t)
        acc = _moments(scratch, t.numel(), near_zero_eps)
        return _stats_from(acc), _histogram(scratch, bins, acc.lo, acc.hi, acc.finite == acc.numel)


# --- The batched, on-device forms the training monitor uses: no host sync per tensor ---


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums are accumulated in on ``device``: float64 (a large batch's moments
    stay exact), float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of all values of ``t``, as a float32 0-d tensor on its device (no host sync).

    Accumulated in float32 at least (a float16 norm overflows at 65504); equal, up to
    float32 rounding, to :func:`tensor_stats`' ``l2_norm`` of a finite tensor.

    Example:
        >>> l2_norm(torch.tensor([3.0, 4.0])).item()
        5.0
    """
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(t.detach(), dtype=dtype).to(torch.float32)


def moment_sums(t: torch.Tensor) -> torch.Tensor:
    """``[n, sum, sum of squares]`` of all values of ``t``, on its device, accumulated in
    :func:`accumulation_dtype`: sums add up over calls and DDP ranks, and give the mean
    and the population std of :func:`tensor_stats` (of a finite tensor).

    Example:
        >>> moment_sums(torch.tensor([1.0, -1.0])).tolist()
        [2.0, 0.0, 2.0]
    """
    a = t.detach().to(accumulation_dtype(t.device))
    return torch.stack([a.new_tensor(float(t.numel())), a.sum(), (a * a).sum()])


def histogram_rows(tensors: Sequence[torch.Tensor], bins: int = 50) -> np.ndarray:
    """:func:`histogram` of several tensors at once, binned on their device.

    The bins and counts are :func:`histogram`'s (finite min to max, :func:`bin_range`,
    ``torch.histc`` on the values in :func:`accumulation_dtype`); the moments need no
    host round trip per tensor. Returns one row per tensor: ``bins`` counts, then the
    finite min and max, the number of finite values, their sum and sum of squares, and
    numel. Two transfers in all, of a few numbers per tensor: the ranges (``histc`` takes
    them as Python numbers), then the counts. NaN and Inf are not binned.

    Example:
        >>> histogram_rows([torch.tensor([0.0, 1.0, 1.0, float("nan")])], bins=2).tolist()
        [[1.0, 2.0, 0.0, 1.0, 3.0, 2.0, 2.0, 4.0]]
    """
    _check_bins(bins)
    heads: list[torch.Tensor] = []
    with torch.no_grad():
        flats = [t.detach().reshape(-1) for t in tensors]
        for f in flats:
            acc = accumulation_dtype(f.device)
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
        if not heads:
            return np.zeros((0, bins + 6))
        head = torch.stack([h.to("cpu", torch.float64) for h in heads])
        counts: list[torch.Tensor] = []
        for f, (lo, hi, n, *_rest) in zip(flats, head.tolist(), strict=False):
            if n == 0:
                counts.append(torch.zeros(bins, device=f.device))
                continue
            lo, hi = bin_range(lo, hi)
            # histc skips NaN and whatever lies outside [lo, hi] (the Infs); in the
            # accumulation dtype, as histogram() bins, so the counts are the same.
            counts.append(torch.histc(f.to(accumulation_dtype(f.device)), bins, lo, hi))
        return torch.cat([torch.stack([c.to("cpu", torch.float64) for c in counts]), head], dim=1).numpy()
