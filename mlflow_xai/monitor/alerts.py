"""The monitor's alert rules: measured values in, alert events out.

The absolute gradient thresholds are the explain pass's own
(:mod:`mlflow_xai.inspect.diagnostics`), so a layer flagged in the explain run and one
alerted while training cross the same line. Module level, so a user can read (or
deliberately patch) them.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlflow_xai.inspect.diagnostics import DEAD_SHARE_ALERT, EXPLODING_GRAD_NORM, VANISHING_GRAD_NORM

__all__ = [
    "ALERT_KINDS",
    "DEAD_SHARE_ALERT",
    "EXPLODING_FACTOR",
    "EXPLODING_GRAD_NORM",
    "HISTORY_LENGTH",
    "HISTORY_MIN",
    "TAG_PREFIX",
    "VANISHING_GRAD_NORM",
    "Alert",
    "GradHistory",
    "alert_tags",
    "epoch_alerts",
    "step_alerts",
]

#: ... or above this multiple of the running median of the layer's own recent gradient
#: norms: a 100x jump within :data:`HISTORY_LENGTH` measurements is divergence, not noise.
EXPLODING_FACTOR = 100.0
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
#: Run tags of an alert: ``<prefix><kind>``, ``.first_layer``, ``.first_step``.
TAG_PREFIX = "mlflow_xai.alert."


@dataclass(frozen=True)
class Alert:
    """One alert condition seen at a step: its kind, the first layer and what it means."""

    kind: str
    layer: str
    what: str


class GradHistory:
    """Each layer's recent gradient norms, for the relative exploding test.

    Example:
        >>> h = GradHistory(["a"])
        >>> for g in (1.0, 2.0, 3.0, 4.0, 5.0):
        ...     h.add("a", g)
        >>> h.median("a")
        3.0
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._norms: dict[str, deque[float]] = {n: deque(maxlen=HISTORY_LENGTH) for n in names}

    def median(self, name: str) -> float | None:
        """The running median, or None while the layer has fewer than :data:`HISTORY_MIN`."""
        norms = self._norms[name]
        return statistics.median(norms) if len(norms) >= HISTORY_MIN else None

    def add(self, name: str, grad_norm: float) -> None:
        self._norms[name].append(grad_norm)


def _first(names: Sequence[str], order: Mapping[str, int]) -> str | None:
    """The name that comes first in ``named_modules()`` order; None for none."""
    return min(names, key=order.__getitem__) if names else None


def step_alerts(
    names: Sequence[str],
    w: Sequence[float],
    g: Sequence[float],
    has_grad: Sequence[bool],
    medians: Mapping[str, float | None],
    *,
    loss_nonfinite: bool,
    grads_may_overflow: bool,
    nan_seen: bool,
    order: Mapping[str, int],
) -> list[Alert]:
    """The alerts of one measured optimizer step.

    Args:
        names: The weight layers, in the order of ``w`` and ``g``.
        w: Their weight norms; g: their gradient norms; has_grad: which have a gradient.
        medians: Each layer's running gradient-norm median before this step (or None).
        loss_nonfinite: Whether a NaN/Inf loss was seen up to this step.
        grads_may_overflow: fp16 AMP, where an overflowing gradient is normal.
        nan_seen: A ``nan`` alert fired before: the other statistics then mean nothing.
        order: Layer name -> position in ``named_modules()``.

    Example:
        >>> [a.kind for a in step_alerts(["l"], [1.0], [5e3], [True], {"l": None}, loss_nonfinite=False,
        ...                                grads_may_overflow=False, nan_seen=False, order={"l": 0})]
        ['exploding_gradients']
    """
    bad_weights: list[str] = []
    bad_grads: list[str] = []
    exploding: list[str] = []
    vanishing: list[str] = []
    for i, name in enumerate(names):
        if not math.isfinite(w[i]):
            bad_weights.append(name)
        if not has_grad[i]:
            continue
        if not math.isfinite(g[i]):
            if not grads_may_overflow:
                bad_grads.append(name)
            continue
        median = medians.get(name)
        if g[i] > EXPLODING_GRAD_NORM or (median is not None and g[i] > EXPLODING_FACTOR * median > 0):
            exploding.append(name)
        if g[i] < VANISHING_GRAD_NORM and w[i] > 0:
            vanishing.append(name)
    out: list[Alert] = []
    if bad_weights or bad_grads or loss_nonfinite:
        first = _first(bad_weights, order) or _first(bad_grads, order) or "loss"
        out.append(Alert("nan", first, "NaN/Inf in weights, gradients or the loss"))
    if not (nan_seen or out):
        if exploding:
            out.append(Alert("exploding_gradients", exploding[0],
                             f"gradient norm above {EXPLODING_GRAD_NORM:g} or "
                             f"{EXPLODING_FACTOR:g}x its running median"))
        if vanishing:
            out.append(Alert("vanishing_gradients", vanishing[0],
                             f"gradient norm below {VANISHING_GRAD_NORM:g} with a nonzero weight"))
    return out


def epoch_alerts(
    weights: Mapping[str, float],
    acts: Mapping[str, tuple[float, float, float | None]],
    *,
    nan_seen: bool,
    order: Mapping[str, int],
) -> list[Alert]:
    """The alerts of one epoch end: non-finite weights or activations, dead units.

    Args:
        weights: Layer -> weight norm (empty when the epoch's weights were measured at a step).
        acts: Layer -> ``(mean, std, dead share or None)`` on the monitoring batch.
        nan_seen: A ``nan`` alert fired before.
        order: Layer name -> position in ``named_modules()``.

    Example:
        >>> [a.layer for a in epoch_alerts({}, {"r": (0.0, 0.0, 1.0)}, nan_seen=False, order={"r": 0})]
        ['r']
    """
    bad_weights = [n for n, v in weights.items() if not math.isfinite(v)]
    bad_acts = [n for n, (mean, _, _) in acts.items() if not math.isfinite(mean)]
    dead = [n for n, (_, _, share) in acts.items() if share is not None and share >= DEAD_SHARE_ALERT]
    out: list[Alert] = []
    if bad_weights or bad_acts:
        first = _first(bad_weights, order) or _first(bad_acts, order) or ""
        out.append(Alert("nan", first, "NaN/Inf in weights or activations"))
    if dead and not (nan_seen or out):
        out.append(Alert("dead_units", dead[0],
                         f"at least {DEAD_SHARE_ALERT:.0%} of the units are dead (<= 0 on the "
                         "whole monitoring batch)"))
    return out


def alert_tags(kind: str, layer: str, step: int) -> dict[str, str]:
    """The run tags of an alert first seen at ``step`` in ``layer``.

    Example:
        >>> alert_tags("nan", "layers.0", 3)["mlflow_xai.alert.nan.first_step"]
        '3'
    """
    return {
        f"{TAG_PREFIX}{kind}": "true",
        f"{TAG_PREFIX}{kind}.first_layer": layer,
        f"{TAG_PREFIX}{kind}.first_step": str(step),
    }
