"""The ``xai`` MLflow model evaluator: ``mlflow.models.evaluate(..., evaluators=["xai"])``.

Registered through the entry point group ``mlflow.model_evaluator`` (pyproject.toml), so
MLflow finds it once the package is installed. For a PyTorch model it logs the same
``xai/`` artifacts as ``mlflow-xai explain`` into the evaluation run, the explain run's
headline numbers as the run's metrics, and returns both in the ``EvaluationResult``.
Other models are declined (``evaluate`` returns ``None``), so the evaluators beside it
(``"default"``) go on as before.

``evaluator_config`` takes the explain options: ``attributions`` (``all``, ``none`` or a
comma-separated list), ``rows`` (default 256), ``absolute``, ``device``, ``task`` (else
from ``model_type``) and ``allow_pickle`` (needed for pickled models, as the CLI's
``--allow-pickle``).

Example:
    >>> import mlflow_xai.evaluator as ev
    >>> ev.XAIEvaluator.can_evaluate(model_type="regressor", evaluator_config={})
    True
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow.models.evaluation import EvaluationResult, ModelEvaluator

from mlflow_xai.errors import XAIError

_logger = logging.getLogger(__name__)

#: The keys ``evaluator_config`` may hold.
CONFIG_KEYS = ("attributions", "rows", "absolute", "device", "task", "allow_pickle")
_TASKS = {"regressor": "regression", "classifier": "classification"}
DEFAULT_ROWS = 256


class XAIEvaluator(ModelEvaluator):
    """Weights, activations, gradients, attributions and the architecture of a PyTorch model."""

    @classmethod
    def can_evaluate(cls, *, model_type: Any, evaluator_config: Any, **kwargs: Any) -> bool:
        # MLflow does not pass the model here; a model that is not PyTorch is declined in evaluate().
        return model_type in (None, "regressor", "classifier")

    def evaluate(self, *, model_type: Any, dataset: Any, run_id: str, evaluator_config: Any,
                 model: Any = None, **kwargs: Any) -> EvaluationResult | None:
        import mlflow

        from mlflow_xai import tracking
        from mlflow_xai.jobs.explain import ExplainOptions, explain_in_run, parse_attributions
        from mlflow_xai.sources.inputs import inputs_from_frame

        config = dict(evaluator_config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise XAIError(f"evaluator_config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                           f"unknown to the xai evaluator; use {', '.join(CONFIG_KEYS)}")
        meta = getattr(model, "metadata", None)
        flavors = getattr(meta, "flavors", None) or {}
        if model is None or "pytorch" not in flavors:
            _logger.info("xai evaluator: not a PyTorch model (flavors: %s); declined", ", ".join(flavors) or "none")
            return None
        model_id = kwargs.get("model_id") or getattr(meta, "model_id", None)
        if model_id:
            uri = f"models:/{model_id}"
        elif getattr(meta, "run_id", None) and getattr(meta, "artifact_path", None):
            uri = f"runs:/{meta.run_id}/{meta.artifact_path}"
        else:
            raise XAIError("the xai evaluator needs a model logged to MLflow (a models:/ or runs:/ URI), "
                           "not a model object built in memory")
        source_run = getattr(meta, "run_id", None) or ""
        experiment_id = mlflow.get_run(run_id).info.experiment_id
        source = tracking.Source(source_run, experiment_id, uri, kind="model", artifact_uri=uri)
        rows = _positive_int(config.get("rows", DEFAULT_ROWS), "rows")
        task = config.get("task") or _TASKS.get(model_type, "auto")
        inputs = inputs_from_frame(dataset.features_data, dataset.labels_data, {"signature": _signature(meta)},
                                   rows, description=f"the evaluation dataset {dataset.name!r}")
        options = ExplainOptions(
            device=str(config.get("device", "auto")), absolute=_flag(config.get("absolute", False)),
            methods=parse_attributions(config.get("attributions", "all")), task=task, rows=rows,
            allow_pickle=_flag(config.get("allow_pickle", False)), inputs=inputs,
        )
        run = mlflow.active_run()
        if run is None or run.info.run_id != run_id:
            run = mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        tracking.set_tags({"mlflow_xai.evaluator": "xai", tracking.SOURCE_URI_TAG: uri})
        with tempfile.TemporaryDirectory(prefix="mlflow-xai-eval-") as tmp:
            out = explain_in_run(run, source, Path(tmp), options, lambda _msg: None)
        for msg in out.warnings:
            _logger.warning("xai evaluator: %s", msg)
        return EvaluationResult(metrics=dict(out.metrics), artifacts=_artifacts(), run_id=run_id)


def _artifacts() -> dict[str, Any]:
    import mlflow
    from mlflow.models.evaluation.artifacts import JsonEvaluationArtifact, TextEvaluationArtifact

    return {
        "xai_summary": JsonEvaluationArtifact(uri=mlflow.get_artifact_uri("xai/summary.json")),
        "xai_report": TextEvaluationArtifact(uri=mlflow.get_artifact_uri("xai/report.html")),
    }


def _signature(meta: Any) -> dict[str, Any] | None:
    sig = getattr(meta, "signature", None)
    if sig is None or getattr(sig, "inputs", None) is None:
        return None
    return {"inputs": sig.inputs.to_json()}


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise XAIError(f"evaluator_config flag {value!r} is not true or false")


def _positive_int(value: Any, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise XAIError(f"evaluator_config {key}={value!r} is invalid; use a whole number >= 1")
    return number
