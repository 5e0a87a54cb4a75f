"""Where a model to explain comes from, and the rows to explain it on.

Our own train runs are explained from their checkpoint (:mod:`mlflow_xai.checkpoint`);
any other MLflow PyTorch model through :mod:`mlflow_xai.sources.pytorch_model` (pt2
programs unflattened into their module hierarchy, pickled models only on opt-in), on the
rows :mod:`mlflow_xai.sources.inputs` reads.
"""

from __future__ import annotations
