"""Frozen result types of the pure computation in :mod:`mlflow_xai.inspect`.

Everything here is numpy and plain Python: no torch tensors, no MLflow, no plotting,
so results can be pickled, compared in tests and turned into JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Histogram:
    """Counts of values in equal-width bins; ``edges`` has ``len(counts) + 1`` entries.

    NaN and Inf values are not binned (they are counted in :class:`TensorStats`).
    """

    counts: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True)
class TensorStats:
    """Summary statistics of one tensor, computed over its finite values.

    ``near_zero_share`` is the share of values with ``abs(v) <= near_zero_eps``.
    ``nan_count``/``inf_count`` count the non-finite values; when every value is
    non-finite the moments are NaN.
    """

    numel: int
    mean: float
    std: float
    min: float
    max: float
    l2_norm: float
    near_zero_share: float
    nan_count: int
    inf_count: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class LayerWeights:
    """A parameterized layer's weight (and bias) with statistics and a histogram."""

    name: str
    module_type: str
    values: np.ndarray
    stats: TensorStats
    histogram: Histogram
    bias: np.ndarray | None = None
    bias_stats: TensorStats | None = None


@dataclass(frozen=True)
class LayerActivations:
    """The output of one leaf module on the batch.

    ``values`` has the module output's shape (batch first). ``mean_per_unit`` is the
    mean over the batch (and spatial positions for conv outputs): one value per
    unit/channel. ``dead_share`` is the share of units that are zero for every sample,
    reported for ReLU-family outputs only (``None`` elsewhere).
    """

    name: str
    module_type: str
    values: np.ndarray
    stats: TensorStats
    histogram: Histogram
    mean_per_unit: np.ndarray
    dead_share: float | None = None


@dataclass(frozen=True)
class LayerGradients:
    """The gradient of the loss with respect to a layer's weight (and bias).

    ``grad_to_weight_ratio`` is ``||grad|| / ||weight||`` (L2 norms); ``vanishing`` and
    ``exploding`` are flagged against the thresholds in
    :mod:`mlflow_xai.inspect.diagnostics`.
    """

    name: str
    module_type: str
    values: np.ndarray
    stats: TensorStats
    histogram: Histogram
    grad_to_weight_ratio: float
    vanishing: bool
    exploding: bool
    bias: np.ndarray | None = None
    bias_stats: TensorStats | None = None


@dataclass(frozen=True)
class Diagnostics:
    """Headline findings across all layers.

    ``flags`` holds one short human-readable line per finding, for example
    ``"exploding gradient in layers.0 (norm 1.2e+03 > 1e+02)"``.
    """

    nan_count: int
    inf_count: int
    dead_unit_share: float | None
    max_grad_norm: float | None
    vanishing_layers: tuple[str, ...] = ()
    exploding_layers: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """Weights, activations and gradients of a network on one batch.

    Mappings are keyed by qualified module name (``layers.0``, ``features.0.conv``), in
    the order of ``model.named_modules()``.
    """

    weights: Mapping[str, LayerWeights]
    activations: Mapping[str, LayerActivations]
    gradients: Mapping[str, LayerGradients]
    diagnostics: Diagnostics
    loss: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
