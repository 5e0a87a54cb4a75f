"""Compare two networks: weight drift per layer, and on one batch the shift of activations and predictions.

Layers are matched by qualified module name. A layer whose weight has the same shape
on both sides gets its drift; one present on one side only, or with another shape, is
listed. Networks with nothing in common still compare by their predictions, as long
as they take the same inputs and give outputs of the same width.

Pure computation: takes modules and tensors, returns frozen dataclasses of numpy
arrays; no I/O, no MLflow, no plotting.

Example:
    >>> import torch
    >>> a = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> b = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = a[0].weight.copy_(torch.eye(2)); _ = b[0].weight.copy_(2 * torch.eye(2))
    >>> cmp = compare(a, b, torch.ones(3, 2))
    >>> cmp.weights["0"].relative_l2, cmp.max_drift
    (1.0, ('0', 1.0))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.hooks import capture_activations, first_tensor, is_leaf
from mlflow_xai.inspect.modules import RELU_FAMILY, eval_mode
from mlflow_xai.inspect.results import Histogram, TensorStats
from mlflow_xai.inspect.stats import one_thread, tensor_stats

__all__ = [
    "ActivationShift",
    "Comparison",
    "LayerDrift",
    "PredictionShift",
    "compare",
    "compare_activations",
    "max_drift_layer",
    "prediction_shift",
    "weight_drift",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerDrift:
    """How a layer's weight moved from A to B.

    ``relative_l2`` is ``||W_b - W_a|| / ||W_a||`` (L2 over all entries): 0 for the same
    weights, 1 for a change as large as the weights themselves; ``inf`` when ``W_a`` is
    all zero and ``W_b`` is not. ``diff`` is ``W_b - W_a``; the histograms of A's and
    B's weights share their bin edges, so they can be drawn on top of each other.
    """

    name: str
    module_type: str
    shape: Shape
    relative_l2: float
    diff_l2: float
    max_abs_diff: float
    stats_a: TensorStats
    stats_b: TensorStats
    hist_a: Histogram
    hist_b: Histogram
    diff: np.ndarray
    bias_relative_l2: float | None = None


@dataclass(frozen=True)
class ActivationShift:
    """How a layer's output on the same batch moved from A to B.

    ``relative_l2`` is ``||act_b - act_a|| / ||act_a||`` over the batch (sample by
    sample, so it sees a change that leaves the distribution alone); ``wasserstein`` is
    the 1-D Wasserstein distance between the two value distributions (in the
    activation's units); ``mean_shift`` is ``mean_b - mean_a``.
    """

    name: str
    module_type: str
    shape: Shape
    relative_l2: float
    wasserstein: float
    mean_shift: float
    stats_a: TensorStats
    stats_b: TensorStats
    hist_a: Histogram
    hist_b: Histogram
    dead_share_a: float | None = None
    dead_share_b: float | None = None


@dataclass(frozen=True)
class PredictionShift:
    """How the predictions on the same batch moved from A to B.

    Regression: differences of the (single) output, row by row. Classification: the
    share of rows with the same predicted class (``agreement``) and the mean total
    variation distance between the predicted class probabilities (``mean_abs_diff``).
    """

    task: str
    rows: int
    pred_a: np.ndarray
    pred_b: np.ndarray
    mean_abs_diff: float
    max_abs_diff: float
    rmse_diff: float | None = None
    relative_l2: float | None = None
    correlation: float | None = None
    agreement: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        keys = ("task", "rows", "mean_abs_diff", "max_abs_diff", "rmse_diff", "relative_l2", "correlation",
                "agreement")
        out: dict[str, float | int | str | None] = {k: getattr(self, k) for k in keys}
        a, b = self.pred_a.astype(np.float64), self.pred_b.astype(np.float64)
        if self.task == "regression":
            out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), std_a=float(a.std()), std_b=float(b.std()))
        return out


@dataclass(frozen=True)
class Comparison:
    """Everything :func:`compare` finds; mappings keyed by qualified module name, in A's order."""

    weights: Mapping[str, LayerDrift]
    activations: Mapping[str, ActivationShift]
    predictions: PredictionShift | None
    only_in_a: tuple[str, ...] = ()
    only_in_b: tuple[str, ...] = ()
    mismatched: Mapping[str, tuple[Shape, Shape]] = field(default_factory=dict)

    @property
    def max_drift(self) -> tuple[str, float] | None:
        """The layer with the largest weight drift and that drift (NaN counts as largest)."""
        top = max_drift_layer(self.weights)
        return None if top is None else (top[0], top[1].relative_l2)


def max_drift_layer(drifts: Mapping[str, LayerDrift]) -> tuple[str, LayerDrift] | None:
    """The layer with the largest relative weight drift (a NaN drift counts as largest)."""
    def key(name: str) -> float:
        value = drifts[name].relative_l2
        return math.inf if math.isnan(value) else value

    if not drifts:
        return None
    name = max(drifts, key=key)
    return name, drifts[name]


def _relative(diff_l2: float, base_l2: float) -> float:
    if base_l2 > 0:
        return diff_l2 / base_l2
    return 0.0 if diff_l2 == 0 else math.inf


def _l2(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))


def _stats(t: torch.Tensor) -> TensorStats:
    """The statistics a comparison shows, in three fused passes when every value is finite.

    :func:`~mlflow_xai.inspect.stats.tensor_stats` reads the tensor in float64 chunks for
    exact moments and the near-zero share; a comparison of two 51M-parameter networks
    needs neither, and its two full passes per tensor were the largest part of the
    job. The L2 norm (the base of the drift) still accumulates in float64;
    ``near_zero_share`` is not computed (NaN). Tensors with NaN/Inf take the exact path.
    """
    t = t.detach()
    n = t.numel()
    if n == 0 or not t.is_floating_point():
        return tensor_stats(t)
    total = float(t.sum(dtype=torch.float64))
    if not math.isfinite(total):  # a NaN or Inf somewhere (or an overflow): count them exactly
        return tensor_stats(t)
    lo, hi = torch.aminmax(t)
    l2 = _l2(t)
    mean = total / n
    std = math.sqrt(max(l2 * l2 / n - mean * mean, 0.0))
    return TensorStats(n, mean, std, float(lo), float(hi), l2, math.nan, 0, 0)


def _common_histograms(a: torch.Tensor, b: torch.Tensor, stats_a: TensorStats, stats_b: TensorStats,
                       bins: int) -> tuple[Histogram, Histogram]:
    """Histograms of the finite values of ``a`` and ``b`` over one shared set of edges."""
    lows = [s.min for s in (stats_a, stats_b) if math.isfinite(s.min)]
    highs = [s.max for s in (stats_a, stats_b) if math.isfinite(s.max)]
    lo, hi = (min(lows), max(highs)) if lows else (-0.5, 0.5)

    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)

    def counts(t: torch.Tensor) -> np.ndarray:
        # histc skips NaN and the values outside [lo, hi] (so +-Inf): finite values only. On the
        # tensor's own dtype it measured 2x faster here than inspect.stats' float64 chunks.
        flat = t.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.double()
        return torch.histc(flat, bins=bins, min=lo, max=hi).cpu().numpy().astype(np.int64)

    return Histogram(counts(a), edges), Histogram(counts(b), edges)


def _max_abs_finite(diff: torch.Tensor, diff_l2: float) -> float:
    """The largest finite ``|diff|``; NaN when no value is finite.

    A finite L2 norm (accumulated in float64, where squares of float32 cannot overflow)
    means every value is finite, and then the min/max pass gives the answer without an
    ``abs`` copy of the whole difference.
    """
    if diff.numel() == 0:
        return math.nan
    if math.isfinite(diff_l2):
        lo, hi = torch.aminmax(diff)
        return max(-float(lo), float(hi))
    finite = diff[torch.isfinite(diff)]
    return float(finite.abs().max()) if finite.numel() else math.nan


def _weighted(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if n and isinstance(getattr(m, "weight", None), torch.Tensor)}


def weight_drift(a: nn.Module, b: nn.Module, *, bins: int = 50) -> tuple[
        dict[str, LayerDrift], tuple[str, ...], tuple[str, ...], dict[str, tuple[Shape, Shape]]]:
    """Weight drift of every layer (module with a ``weight``) present in both networks.

    Args:
        a: The reference network.
        b: The network compared with it.
        bins: Bins of the shared-edge histograms.

    Returns:
        ``(drifts, only_in_a, only_in_b, mismatched)``: the drift per layer in A's
        order, the layer names on one side only, and ``name -> (shape_a, shape_b)`` for
        layers of the same name whose weights differ in shape.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> drift, *_ = weight_drift(nn.Sequential(a), nn.Sequential(a))
        >>> drift["0"].relative_l2
        0.0
    """
    la, lb = _weighted(a), _weighted(b)
    drifts: dict[str, LayerDrift] = {}
    mismatched: dict[str, tuple[Shape, Shape]] = {}
    for name, ma in la.items():
        if name not in lb:
            continue
        mb = lb[name]
        wa, wb = ma.weight.detach(), mb.weight.detach()
        if wa.shape != wb.shape or type(ma) is not type(mb):
            mismatched[name] = (tuple(wa.shape), tuple(wb.shape))
            continue
        # Memory-bound passes: on one thread (see inspect.stats.one_thread).
        with torch.no_grad(), one_thread(wa):
            diff = wb.to(wa.device) - wa
            diff_l2 = _l2(diff)
            sa, sb = _stats(wa), _stats(wb)
            ha, hb = _common_histograms(wa, wb, sa, sb, bins)
            bias_rel = None
            ba, bb = getattr(ma, "bias", None), getattr(mb, "bias", None)
            if isinstance(ba, torch.Tensor) and isinstance(bb, torch.Tensor) and ba.shape == bb.shape:
                bias_rel = _relative(_l2(bb.to(ba.device) - ba), _l2(ba))
            max_abs = _max_abs_finite(diff, diff_l2)
        drifts[name] = LayerDrift(
            name=name, module_type=type(ma).__name__, shape=tuple(wa.shape),
            relative_l2=_relative(diff_l2, sa.l2_norm) if math.isfinite(diff_l2) else math.nan,
            diff_l2=diff_l2, max_abs_diff=max_abs, stats_a=sa, stats_b=sb, hist_a=ha, hist_b=hb,
            diff=diff.cpu().numpy(), bias_relative_l2=bias_rel,
        )
    only_a = tuple(n for n in la if n not in lb)
    only_b = tuple(n for n in lb if n not in la)
    return drifts, only_a, only_b, mismatched


def _activation_layers(_name: str, module: nn.Module) -> bool:
    # Dropout and Identity repeat the output before them in eval mode.
    return not isinstance(module, (nn.Dropout, nn.Identity))


def _forward(model: nn.Module, inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad(), capture_activations(model, _activation_layers) as acts:
        out = first_tensor(model(inputs.to(device)))
    if out is None:
        raise XAIError(f"{type(model).__name__} returned no tensor; compare needs a model that outputs one")
    return dict(acts), out


def _wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two equally sized samples: the mean distance of their sorted values."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    if not (bool(torch.isfinite(fa).all()) and bool(torch.isfinite(fb).all())):
        return math.nan
    # Sorting in the tensors' own dtype; the differences and their mean in float64.
    sa, sb = torch.sort(fa).values.double(), torch.sort(fb).values.double()
    return float((sa - sb).abs().mean())


def _dead_share(module: nn.Module, t: torch.Tensor) -> float | None:
    if not isinstance(module, RELU_FAMILY) or t.dim() < 2:
        return None
    peak = torch.amax(t, dim=0).reshape(-1)  # a unit is dead if <= 0 for every sample
    return float((peak <= 0).double().mean())


def compare_activations(a: nn.Module, b: nn.Module, inputs_a: torch.Tensor, inputs_b: torch.Tensor | None = None,
                        *, bins: int = 50) -> tuple[dict[str, ActivationShift], np.ndarray, np.ndarray]:
    """The shift of every shared leaf module's output on the same batch, and both networks' outputs.

    Args:
        a: The reference network (run in eval mode; its mode flags are restored).
        b: The network compared with it.
        inputs_a: The batch as A takes it.
        inputs_b: The same rows as B takes them (B may standardize differently);
            ``inputs_a`` when omitted.
        bins: Bins of the shared-edge histograms.

    Returns:
        ``(shifts, out_a, out_b)``: shifts of the layers with the same name, type and
        output shape on both sides (dropout and identity layers left out), in A's order;
        the raw outputs as numpy arrays.
    """
    acts_a, out_a = _forward(a, inputs_a)
    acts_b, out_b = _forward(b, inputs_a if inputs_b is None else inputs_b)
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    shifts: dict[str, ActivationShift] = {}
    with one_thread(out_a):  # the statistics below are memory-bound passes (inspect.stats.one_thread)
        for name, ta in acts_a.items():
            shift = _shift(name, ta, acts_b.get(name), mods_a[name], mods_b.get(name), bins)
            if shift is not None:
                shifts[name] = shift
    return shifts, out_a.detach().cpu().numpy(), out_b.detach().cpu().numpy()


def _shift(name: str, ta: torch.Tensor, tb: torch.Tensor | None, ma: nn.Module, mb: nn.Module | None,
           bins: int) -> ActivationShift | None:
    """The shift of layer ``name``; ``None`` when B lacks the layer or its output differs in type or shape."""
    if tb is None or type(ma) is not type(mb) or ta.shape != tb.shape or not is_leaf(ma):
        return None
    tb = tb.to(ta.device)
    sa, sb = _stats(ta), _stats(tb)
    ha, hb = _common_histograms(ta, tb, sa, sb, bins)
    return ActivationShift(
        name=name, module_type=type(ma).__name__, shape=tuple(ta.shape[1:]),
        relative_l2=_relative(_l2(tb - ta), sa.l2_norm), wasserstein=_wasserstein(ta, tb),
        mean_shift=sb.mean - sa.mean, stats_a=sa, stats_b=sb, hist_a=ha, hist_b=hb,
        dead_share_a=_dead_share(ma, ta), dead_share_b=_dead_share(mb, tb),  # type: ignore[arg-type]
    )


def prediction_shift(pred_a: np.ndarray, pred_b: np.ndarray, task: str = "regression") -> PredictionShift:
    """How far B's predictions are from A's, row by row.

    Args:
        pred_a: A's outputs, ``(rows,)`` or ``(rows, 1)`` for regression (in whatever
            units the caller chose), ``(rows, classes)`` logits for classification.
        pred_b: B's outputs on the same rows, the same shape.
        task: ``regression`` or ``classification``.

    Returns:
        The :class:`PredictionShift`.

    Raises:
        XAIError: The outputs differ in shape.

    Example:
        >>> s = prediction_shift(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
        >>> s.max_abs_diff, s.mean_abs_diff
        (2.0, 0.6666666666666666)
    """
    a, b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    if a.shape != b.shape:
        raise XAIError(
            f"the two models give outputs of different shapes ({a.shape[1:]} vs {b.shape[1:]}); "
            "compare models trained for the same target"
        )
    rows = int(a.shape[0]) if a.ndim else 1
    if task == "classification":
        pa, pb = _softmax(a.reshape(rows, -1)), _softmax(b.reshape(rows, -1))
        tv = 0.5 * np.abs(pb - pa).sum(axis=1)
        return PredictionShift(task, rows, a, b, mean_abs_diff=float(tv.mean()), max_abs_diff=float(tv.max()),
                               agreement=float((pa.argmax(axis=1) == pb.argmax(axis=1)).mean()))
    fa, fb = a.reshape(-1), b.reshape(-1)
    d = fb - fa
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(np.corrcoef(fa, fb)[0, 1]) if fa.size > 1 and fa.std() > 0 and fb.std() > 0 else math.nan
    return PredictionShift(
        task, rows, fa, fb, mean_abs_diff=float(np.abs(d).mean()), max_abs_diff=float(np.abs(d).max()),
        rmse_diff=float(np.sqrt(np.mean(d * d))), relative_l2=_relative(float(np.linalg.norm(d)),
                                                                         float(np.linalg.norm(fa))),
        correlation=corr,
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def compare(a: nn.Module, b: nn.Module, inputs_a: torch.Tensor, inputs_b: torch.Tensor | None = None, *,
            task: str = "regression", bins: int = 50) -> Comparison:
    """Weights, activations and predictions of B against A (see the module docstring).

    Predictions are the raw outputs; :func:`prediction_shift` on outputs converted to
    other units gives the same numbers in those units.
    """
    drifts, only_a, only_b, mismatched = weight_drift(a, b, bins=bins)
    shifts, out_a, out_b = compare_activations(a, b, inputs_a, inputs_b, bins=bins)
    return Comparison(drifts, shifts, prediction_shift(out_a, out_b, task), only_a, only_b, mismatched)
