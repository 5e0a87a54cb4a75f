"""Pure computation on any ``nn.Module``: weights, activations, gradients, diagnostics.

Takes a module and tensors, returns frozen dataclasses of numpy arrays. No I/O, no
logging, no plotting; never imports mlflow or matplotlib.

Example:
    >>> import torch
    >>> from mlflow_xai.inspect import explain, summary_dict
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> expl = explain(net, torch.randn(8, 3), torch.randn(8))
    >>> sorted(summary_dict(expl)["layers"])
    ['0', '1', '2']
"""

from __future__ import annotations

from mlflow_xai.inspect.core import explain
from mlflow_xai.inspect.diagnostics import diagnose
from mlflow_xai.inspect.hooks import LayerSelection, capture_activations
from mlflow_xai.inspect.results import (
    Diagnostics,
    Explanation,
    Histogram,
    LayerActivations,
    LayerGradients,
    LayerWeights,
    TensorStats,
)
from mlflow_xai.inspect.stats import histogram, tensor_stats
from mlflow_xai.inspect.summary import SCHEMA_VERSION, summary_dict

__all__ = [
    "SCHEMA_VERSION",
    "Diagnostics",
    "Explanation",
    "Histogram",
    "LayerActivations",
    "LayerGradients",
    "LayerSelection",
    "LayerWeights",
    "TensorStats",
    "capture_activations",
    "diagnose",
    "explain",
    "histogram",
    "summary_dict",
    "tensor_stats",
]
