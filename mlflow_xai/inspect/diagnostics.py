"""Thresholds and headline findings: NaN/Inf, dead ReLU units, vanishing/exploding gradients.

The thresholds are heuristics for a network explained on one batch, chosen to flag
what is almost surely a problem rather than everything unusual. They are module-level
constants so a user can read (or, deliberately, patch) them in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mlflow_xai.inspect.results import Diagnostics, LayerActivations, LayerGradients, LayerWeights

__all__ = [
    "VANISHING_GRAD_NORM",
    "EXPLODING_GRAD_NORM",
    "VANISHING_RATIO",
    "EXPLODING_RATIO",
    "DEAD_SHARE_FLAG",
    "DEAD_SHARE_ALERT",
    "thresholds",
    "gradient_flags",
    "diagnose",
]

# L2 norm of a layer's weight gradient below which the layer gets no usable signal:
# 1e-7 is float32's resolution (eps = 1.2e-7) for unit-scale weights, so even a large
# learning rate could not move them. A layer behind all-dead ReLUs lands here (exactly 0).
VANISHING_GRAD_NORM = 1e-7

# L2 norm of a layer's weight gradient above which we call it exploding: 1000x the
# usual clipping norm (1.0). A loss on unscaled targets (diabetes targets are ~150)
# legitimately gives norms in the hundreds, so the bar sits above that.
EXPLODING_GRAD_NORM = 1e3

# ||grad|| / ||weight|| below which an SGD step with a learning rate up to 0.1 changes the
# weights by less than float32 eps relative to their size: the update rounds away.
VANISHING_RATIO = 1e-6

# ||grad|| / ||weight|| above which a step at a modest learning rate (1e-2) would move
# the weights by more than their own norm: training at that rate diverges.
EXPLODING_RATIO = 1e2

# Share of dead units in one ReLU layer worth a flag line. Some dead units are normal
# (sparsity); when most of a layer is dead it has lost most of its capacity.
DEAD_SHARE_FLAG = 0.5

# Share of dead units in one ReLU layer at which the training monitor raises its
# ``dead_units`` alert. While training, units still revive, so the alert waits for a
# nearly dead layer rather than the explain pass's flag at DEAD_SHARE_FLAG.
DEAD_SHARE_ALERT = 0.9


def thresholds() -> dict[str, float]:
    """The current threshold values, for reports and ``summary.json``."""
    return {
        "vanishing_grad_norm": VANISHING_GRAD_NORM,
        "exploding_grad_norm": EXPLODING_GRAD_NORM,
        "vanishing_ratio": VANISHING_RATIO,
        "exploding_ratio": EXPLODING_RATIO,
        "dead_share_flag": DEAD_SHARE_FLAG,
    }


def gradient_flags(grad_norm: float, ratio: float, grad_inf_count: int = 0) -> tuple[bool, bool]:
    """``(vanishing, exploding)`` for one layer's weight gradient.

    Vanishing: the norm is below :data:`VANISHING_GRAD_NORM` or the gradient-to-weight
    ratio below :data:`VANISHING_RATIO`. Exploding: the norm is above
    :data:`EXPLODING_GRAD_NORM`, the ratio above :data:`EXPLODING_RATIO`, or the
    gradient holds an Inf. A NaN norm or ratio (no finite values, an all-zero weight)
    triggers neither; NaN values are reported by :func:`diagnose` on their own.

    Args:
        grad_norm: L2 norm of the finite gradient values.
        ratio: ``||grad|| / ||weight||``, NaN when undefined.
        grad_inf_count: Number of infinite gradient values.

    Returns:
        The two flags.

    Example:
        >>> gradient_flags(0.0, 0.0)
        (True, False)
        >>> gradient_flags(5e3, 0.5)
        (False, True)
    """
    vanishing = grad_norm < VANISHING_GRAD_NORM or ratio < VANISHING_RATIO
    exploding = grad_norm > EXPLODING_GRAD_NORM or ratio > EXPLODING_RATIO or grad_inf_count > 0
    return bool(vanishing), bool(exploding)


def _nonfinite_flags(kind: str, name: str, nan: int, inf: int) -> list[str]:
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    found = " and ".join(p for p in parts if p)
    return [f"{found} values in {kind} of {name}"] if found else []


def diagnose(
    weights: Mapping[str, LayerWeights],
    activations: Mapping[str, LayerActivations],
    gradients: Mapping[str, LayerGradients],
    *,
    loss: float | None = None,
) -> Diagnostics:
    """Headline findings across all layers.

    ``nan_count``/``inf_count`` add up the non-finite values of every weight, bias,
    activation and gradient. ``dead_unit_share`` is dead units over all units of the
    ReLU-family outputs (``None`` when there are none). ``max_grad_norm`` is the largest
    weight-gradient L2 norm (``None`` without gradients). Each finding gets one line in
    ``flags``.

    Args:
        weights: Per-layer weights, as in :class:`Explanation`.
        activations: Per-layer activations.
        gradients: Per-layer gradients.
        loss: The batch loss, flagged when it is not finite.

    Returns:
        The :class:`Diagnostics`.

    Example:
        >>> diagnose({}, {}, {}).flags
        ()
    """
    nan = inf = 0
    flags: list[str] = []
    if loss is not None and not math.isfinite(loss):
        flags.append(f"loss is {loss}")

    for name, w in weights.items():
        for stats, kind in ((w.stats, "weight"), (w.bias_stats, "bias")):
            if stats is not None:
                nan += stats.nan_count
                inf += stats.inf_count
                flags += _nonfinite_flags(kind, name, stats.nan_count, stats.inf_count)

    dead_units = total_units = 0
    for name, a in activations.items():
        nan += a.stats.nan_count
        inf += a.stats.inf_count
        flags += _nonfinite_flags("activation", name, a.stats.nan_count, a.stats.inf_count)
        if a.dead_share is not None:
            units = int(a.mean_per_unit.size)
            dead = round(a.dead_share * units)
            dead_units += dead
            total_units += units
            if a.dead_share >= DEAD_SHARE_FLAG:
                flags.append(f"dead ReLU units in {name}: {dead}/{units} ({a.dead_share:.0%})")

    grad_norms: list[float] = []
    vanishing: list[str] = []
    exploding: list[str] = []
    for name, g in gradients.items():
        for stats, kind in ((g.stats, "gradient"), (g.bias_stats, "bias gradient")):
            if stats is not None:
                nan += stats.nan_count
                inf += stats.inf_count
                flags += _nonfinite_flags(kind, name, stats.nan_count, stats.inf_count)
        norm = g.stats.l2_norm
        if math.isfinite(norm):
            grad_norms.append(norm)
        if g.vanishing:
            vanishing.append(name)
            flags.append(
                f"vanishing gradient in {name} (norm {norm:.1e}, "
                f"grad/weight {g.grad_to_weight_ratio:.1e}; thresholds "
                f"{VANISHING_GRAD_NORM:.0e}, {VANISHING_RATIO:.0e})"
            )
        if g.exploding:
            exploding.append(name)
            flags.append(
                f"exploding gradient in {name} (norm {norm:.1e}, "
                f"grad/weight {g.grad_to_weight_ratio:.1e}; thresholds "
                f"{EXPLODING_GRAD_NORM:.0e}, {EXPLODING_RATIO:.0e})"
            )

    return Diagnostics(
        nan_count=nan,
        inf_count=inf,
        dead_unit_share=dead_units / total_units if total_units else None,
        max_grad_norm=max(grad_norms) if grad_norms else None,
        vanishing_layers=tuple(vanishing),
        exploding_layers=tuple(exploding),
        flags=tuple(flags),
    )
