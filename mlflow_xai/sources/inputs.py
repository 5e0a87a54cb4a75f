"""The rows to explain a model on that mlflow-xai did not train, and what its gradients are of.

A model of our own train runs is explained on the test part it was trained on
(:mod:`mlflow_xai.data`). Any other model is explained on what the user gives:

* a CSV/TSV/Parquet table (``--data``; ``--target`` names the label column). The columns
  fed to the model follow the model's column signature where it has one, else every
  other column in order;
* an ``.npy`` file of input tensors, or an ``.npz`` file with key ``x`` and optionally
  ``y`` (any shape, batch first; loaded with ``allow_pickle=False``);
* nothing: the model's logged input example, with a warning that it is only that many rows.

With targets, the gradients are those of the task's loss (MSE for regression,
cross-entropy for classification); without, of the summed output (regression) or of the
predicted class's logit (classification). :attr:`ModelInputs.gradient_of` says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_xai.errors import XAIError

__all__ = ["ModelInputs", "inputs_from_frame", "load_model_inputs", "signature_columns", "resolve_task", "objective"]

TASKS = ("auto", "regression", "classification")


@dataclass
class ModelInputs:
    """Input rows (batch first), their targets if any, and where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    feature_names: tuple[str, ...] | None  # for (N, F) tables and signatures
    description: str  # the data as the user named it
    warnings: list[str] = field(default_factory=list)


def signature_columns(mlmodel: dict[str, Any]) -> tuple[str, ...] | None:
    """The input column names of the model's signature, or ``None`` for a tensor signature or none."""
    sig = mlmodel.get("signature")
    raw = sig.get("inputs") if isinstance(sig, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        specs = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(specs, list) or not specs:
        return None
    names = [s.get("name") for s in specs if isinstance(s, dict)]
    if any(s.get("type") == "tensor" for s in specs if isinstance(s, dict)) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)  # type: ignore[arg-type]


def load_model_inputs(data: str | None, target: str | None, *, model_dir: Path | None,
                      mlmodel: dict[str, Any], rows: int) -> ModelInputs:
    """The first ``rows`` rows of ``data`` (or of the model's input example) for ``model_dir``'s model."""
    if data:
        path = Path(data)
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            if target:
                raise XAIError(f"--target names a table column, but {data!r} is an array file; "
                               "put the targets in the .npz file under key 'y'")
            got = _load_arrays(path)
        else:
            got = _load_table_inputs(path, target, signature_columns(mlmodel))
    else:
        if target:
            raise XAIError("--target needs --data TABLE: the model's input example has no targets")
        got = _input_example(model_dir, mlmodel)
    n = len(got.x)
    if n == 0:
        raise XAIError(f"{got.description} has no rows; pass data with at least one row")
    if n > rows:
        got.x = got.x[:rows]
        got.y = None if got.y is None else got.y[:rows]
    return got


def inputs_from_frame(features: Any, labels: Any, mlmodel: dict[str, Any], rows: int,
                      description: str = "the evaluation data") -> ModelInputs:
    """Inputs from data already in memory: a DataFrame or array of features, and labels or ``None``.

    A DataFrame's columns follow the model's column signature where it has one.
    """
    if hasattr(features, "columns"):
        columns = signature_columns(mlmodel)
        if columns is not None:
            missing = [c for c in columns if c not in features.columns]
            if missing:
                raise XAIError(f"{description} lacks the column{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(repr, missing[:8]))} of the model's signature")
            features = features[list(columns)]
        names: tuple[str, ...] | None = tuple(map(str, features.columns))
        x = features.to_numpy()
    else:
        x = np.asarray(features)
        names = tuple(f"x{i}" for i in range(x.shape[1])) if x.ndim == 2 else None
    y = None if labels is None else np.asarray(labels)
    if y is not None and not np.issubdtype(y.dtype, np.number):
        raise XAIError(f"the targets of {description} are not numeric; the model's outputs are numbers or class "
                       "indices, so encode the labels as 0..K-1 in the order the model was trained with")
    got = ModelInputs(x=_float32(x), y=y, feature_names=names, description=description)
    if len(got.x) > rows:
        got.x = got.x[:rows]
        got.y = None if y is None else y[:rows]
    return got


def _load_arrays(path: Path) -> ModelInputs:
    if not path.is_file():
        raise XAIError(f"data file {str(path)!r} does not exist; pass an existing .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)  # object arrays would need pickle: refused
    except ValueError as exc:
        raise XAIError(f"{str(path)!r} holds object arrays, which would need unpickling; save plain numeric arrays") from exc
    except Exception as exc:  # noqa: BLE001 - any reader error is about the user's file
        raise XAIError(f"{str(path)!r} could not be read as a numpy file ({type(exc).__name__})") from exc
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        with loaded:
            keys = list(loaded.keys())
            if "x" not in keys:
                raise XAIError(f"{str(path)!r} has keys {keys}, not 'x'; store the inputs as x=... (and targets as y=...)")
            x = loaded["x"]
            y = loaded["y"] if "y" in keys else None
    if x.ndim == 0:
        raise XAIError(f"{str(path)!r} holds a scalar; store a batch of inputs, batch dimension first")
    if y is not None and len(y) != len(x):
        raise XAIError(f"{str(path)!r} has {len(x)} inputs but {len(y)} targets; store one target per input")
    names = tuple(f"x{i}" for i in range(x.shape[1])) if x.ndim == 2 else None
    return ModelInputs(x=_float32(x), y=y, feature_names=names, description=str(path))


def _load_table_inputs(path: Path, target: str | None, columns: tuple[str, ...] | None) -> ModelInputs:
    import pandas as pd

    from mlflow_xai.data import read_table

    df = read_table(path)
    if target and target not in df.columns:
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise XAIError(f"target column {target!r} is not in {str(path)!r}; its columns are: {cols}")
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise XAIError(f"{str(path)!r} lacks the column{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(repr, missing[:8]))} of the model's signature; pass the table it was trained on")
        features = df[list(columns)]
    else:
        features = df.drop(columns=[target]) if target else df
    for col in features.columns:
        if not (pd.api.types.is_numeric_dtype(features[col]) or pd.api.types.is_bool_dtype(features[col])):
            raise XAIError(f"feature column {col!r} is not numeric; encode it as numbers or drop it from the table")
        if features[col].isna().any():
            raise XAIError(f"feature column {col!r} has missing values; fill or drop them")
    y = None
    if target:
        col = df[target]
        if col.isna().any():
            raise XAIError(f"target column {target!r} has missing values; drop those rows")
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            raise XAIError(f"target column {target!r} is not numeric; the model's outputs are numbers or class "
                           "indices, so encode the labels as 0..K-1 in the order the model was trained with")
        y = col.to_numpy()
    x = features.to_numpy(dtype=np.float32)
    return ModelInputs(x=x, y=y, feature_names=tuple(map(str, features.columns)), description=str(path))


def _input_example(model_dir: Path | None, mlmodel: dict[str, Any]) -> ModelInputs:
    info = mlmodel.get("saved_input_example_info")
    if model_dir is None or not isinstance(info, dict):
        raise XAIError("the model was logged without an input example, so there is nothing to explain it on; "
                       "pass --data (a CSV/Parquet table, or an .npy/.npz file of inputs)")
    from mlflow.models import Model

    try:
        example = Model.load(str(model_dir)).load_input_example(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - an example MLflow cannot read back
        raise XAIError(f"the model's input example could not be read ({type(exc).__name__}); pass --data") from exc
    names: tuple[str, ...] | None = None
    if hasattr(example, "columns"):  # a DataFrame
        names = tuple(map(str, example.columns))
        x = example.to_numpy()
    elif isinstance(example, dict):
        raise XAIError("the model's input example is a dict of several inputs; pass --data with one input array")
    elif isinstance(example, (list, tuple)):
        if len(example) != 1:
            raise XAIError("the model takes several input tensors; pass --data with one input array")
        x = np.asarray(example[0])
    else:
        x = np.asarray(example)
    x = _float32(x)
    if names is None and x.ndim == 2:
        names = signature_columns(mlmodel) or tuple(f"x{i}" for i in range(x.shape[1]))
    rows = len(x)
    warning = (f"explained on the model's logged input example only ({rows} row{'s' if rows != 1 else ''}): "
               "statistics of so few rows say little; pass --data with more rows")
    return ModelInputs(x=x, y=None, feature_names=names, description="the logged input example", warnings=[warning])


def _float32(x: np.ndarray) -> np.ndarray:
    """Floating inputs as float32 (the models' usual dtype); integers (token ids) stay as they are."""
    if np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_:
        return x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.integer):
        raise XAIError(f"inputs of dtype {x.dtype} are not numbers; pass numeric inputs")
    return x


def resolve_task(task: str, output_shape: tuple[int, ...]) -> str:
    """``auto``: one output column is regression, more is classification."""
    if task not in TASKS:
        raise XAIError(f"--task {task!r} is not supported; use {', '.join(TASKS)}")
    if task != "auto":
        return task
    return "classification" if len(output_shape) >= 2 and output_shape[1] > 1 else "regression"


def objective(task: str, has_targets: bool) -> tuple[str, Any]:
    """What the gradients are of, as ``summary.json``'s ``meta.gradient_of`` says it, and its loss function.

    ``None`` as the loss function means the explain core's default loss (MSE for float
    targets, cross-entropy for class indices).
    """
    import torch

    from mlflow_xai.inspect.hooks import first_tensor

    if has_targets:
        return ("loss: cross-entropy with the targets" if task == "classification"
                else "loss: mean squared error with the targets"), None

    def out_of(output: Any) -> torch.Tensor:
        out = first_tensor(output)
        if out is None:
            raise XAIError("the model returned no tensor, so there is nothing to take gradients of")
        return out

    if task == "classification":
        def predicted_logit(output: Any, _targets: torch.Tensor) -> torch.Tensor:
            out = out_of(output)
            return out.gather(1, out.argmax(dim=1, keepdim=True)).sum()

        return "output: the predicted class's logit, summed over the rows (no targets given)", predicted_logit

    def summed(output: Any, _targets: torch.Tensor) -> torch.Tensor:
        return out_of(output).sum()

    return "output: the sum of the outputs over the rows (no targets given)", summed
