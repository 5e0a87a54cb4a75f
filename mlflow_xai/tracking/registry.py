"""The model side: logging the network as an MLflow model, its registered versions and their tags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient

from mlflow_xai.errors import XAIError
from mlflow_xai.tracking.contract import CONFIG_SOURCE_TAG, TRAIN_RUN_TAG, quoted


def log_pytorch_model(model: Any, input_example: Any, registered_name: str | None) -> Any:
    """Log the network as an MLflow model in torch.export's pt2 format (loads without unpickling code)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # The signature MLflow would infer by running the model on the example, given
    # directly: float32 rows of the example's width in, float32 rows of the output's out.
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_example, dtype=np.float32)))
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *np.shape(input_example)[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]))
    # Explicit requirements: MLflow's inference of them loads the model in a subprocess
    # and costs seconds for nothing (loading a pt2 model needs torch and mlflow only).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    return mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=input_example,
        signature=signature,
        serialization_format="pt2",
        pip_requirements=requirements,
        registered_model_name=registered_name or None,
        await_registration_for=60,
        # MLflow would reload the exported model and predict on the example (~0.3 s);
        # tests/test_train.py loads the logged model and predicts instead.
        validate_serving_input=False,
    )


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def latest_version(name: str, run_id: str) -> str:
    """The registered version of ``name`` produced by ``run_id`` (the newest one).

    The search filters by run id only and the name is compared here: MLflow's filter
    syntax has no escape for a quote inside a quoted value (``\\'`` and ``''`` match
    nothing), and a registered model's name may hold one (``team's net``).
    """
    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"run_id='{quoted(run_id)}'") if v.name == name]
    if not versions:
        raise XAIError(f"no version of registered model {name!r} comes from run {run_id}")
    return str(max(int(v.version) for v in versions))


def tag_model_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a model version; a ``None`` value removes that tag (a stale one from an earlier job)."""
    client = MlflowClient()
    existing = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if value is None:
            if key in existing:
                client.delete_model_version_tag(name, version, key)
        else:
            client.set_model_version_tag(name, version, key, str(value)[:5000])  # the store's value limit


def lineage_tags(train_run_id: str, config_source_run_id: str | None) -> dict[str, str]:
    """The tags that lead from a model version to its train run and the tuning trial of its config."""
    tags = {TRAIN_RUN_TAG: train_run_id}
    if config_source_run_id:
        tags[CONFIG_SOURCE_TAG] = config_source_run_id
    return tags
