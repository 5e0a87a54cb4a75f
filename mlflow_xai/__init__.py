"""mlflow-xai: look inside a tuned neural network and keep what you see in MLflow.

The public surface is small and imported lazily, so ``mlflow-xai --help`` answers
without importing torch or MLflow::

    import mlflow_xai
    expl = mlflow_xai.explain(model, inputs, targets)
    expl.weights["layers.0"].stats.mean
    diff = mlflow_xai.compare(model_a, model_b, inputs)  # weight drift, activation and prediction shift
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562).
_EXPORTS = {
    "TunedConfig": "mlflow_xai.config",
    "XAIError": "mlflow_xai.errors",
    "explain": "mlflow_xai.inspect",
    "Explanation": "mlflow_xai.inspect",
    "attribute": "mlflow_xai.inspect.attributions",
    "conductance": "mlflow_xai.inspect.attributions",
    "conductances": "mlflow_xai.inspect.attributions",
    "path_attributions": "mlflow_xai.inspect.attributions",
    "compare": "mlflow_xai.inspect.compare",
    "Comparison": "mlflow_xai.inspect.compare",
    "XAIMonitor": "mlflow_xai.monitor",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_xai' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
