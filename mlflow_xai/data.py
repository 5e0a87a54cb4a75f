"""Data sets and the cookbook's split.

The embedded default is the diabetes data of Efron et al. (2004), as scikit-learn bundles
it (``load_diabetes(scaled=False)``), shipped in this package as ``diabetes.csv.gz``. A user's
own CSV or Parquet table is read with ``--data PATH --target COLUMN``. As in the
spotpython cookbook, ``test_size`` and ``seed`` pick the test part, and the network is
trained on that test part (with a validation fraction for early stopping) and evaluated
on it. Features are standardized with statistics of the training part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlflow_xai.config import SplitSpec
from mlflow_xai.errors import XAIError

Task = Literal["regression", "classification"]
TASKS = ("auto", "regression", "classification")

# A non-float target with at most this many distinct values is taken as class labels.
MAX_INFERRED_CLASSES = 20


@dataclass(frozen=True)
class Dataset:
    """Features, target and what describes them."""

    name: str  # "diabetes" or the table's path as given
    X: np.ndarray  # float32, (n, n_features)
    y: np.ndarray  # float32 (n,) for regression; int64 class indices (n,) for classification
    feature_names: tuple[str, ...]
    target: str
    task: Task
    classes: tuple[str, ...] = ()  # class labels in index order (classification only)

    @property
    def n_out(self) -> int:
        """Output width of the network: 1 for regression, the number of classes otherwise."""
        return len(self.classes) if self.task == "classification" else 1


@dataclass(frozen=True)
class Split:
    """The cookbook's split, standardized with the training part's statistics.

    ``fit``/``val`` partition the test part (the network is trained on ``fit`` with
    early stopping on ``val``); ``test`` is the whole test part, evaluated after training.
    A regression target is standardized too (``y = (raw - y_mean) / y_std``), so losses
    and gradients do not scale with the target's units (the diabetes target is ~150);
    :meth:`raw_target` maps back.
    """

    X_fit: np.ndarray
    y_fit: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray  # per-feature mean of the training part
    std: np.ndarray  # per-feature std of the training part (1 where constant)
    y_mean: float  # training part's target mean (0 for classification)
    y_std: float  # training part's target std (1 for classification)
    n_train: int  # size of the training part (used only for the statistics)
    seed: int
    test_size: float
    val_fraction: float


    @property
    def spec(self) -> SplitSpec:
        """The spec that picked these rows."""
        return SplitSpec(test_size=self.test_size, seed=self.seed, val_fraction=self.val_fraction)


def raw_target(y: np.ndarray, y_mean: float, y_std: float) -> np.ndarray:
    """Map a standardized regression target (or prediction) back to the target's units."""
    return y * y_std + y_mean


def load_dataset(
    spec: str | None = "diabetes", target: str | None = None, task: str = "auto"
) -> Dataset:
    """Load the diabetes data or a CSV/Parquet table.

    Args:
        spec: ``"diabetes"`` (or empty) for the embedded default, else a file path.
        target: the target column of a table (the diabetes data's is ``target``).
        task: ``auto`` infers it from the target: float -> regression; integer, bool or
            text with at most 20 distinct values -> classification.
    """
    if task not in TASKS:
        raise XAIError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")
    if spec in (None, "", "diabetes"):
        import gzip

        with gzip.open(Path(__file__).with_name("diabetes.csv.gz"), "rt") as f:
            columns = f.readline().strip().split(",")
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
        X = table[:, :-1].astype(np.float32)
        y_raw = table[:, -1]
        if task == "classification":
            raise XAIError(
                "the diabetes data is a regression task; drop --task classification or use --data"
            )
        return Dataset(
            name="diabetes",
            X=X,
            y=y_raw.astype(np.float32),
            feature_names=tuple(columns[:-1]),
            target="target",
            task="regression",
        )
    return _load_table(Path(spec), target, task)


def read_table(path: Path) -> Any:
    """A CSV, TSV or Parquet file as a pandas DataFrame, with one clear line for any reader error."""
    import pandas as pd

    if not path.is_file():
        raise XAIError(f"data file {str(path)!r} does not exist; pass an existing CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet" or suffix == ".pq":
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".txt", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise XAIError(
                f"data file {str(path)!r} has an unknown type; use a .csv, .tsv or .parquet file"
            )
    except XAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader error is about the user's file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XAIError(f"data file {str(path)!r} could not be read ({first}); check its format") from exc
    if df.empty or len(df.columns) == 0:
        raise XAIError(f"data file {str(path)!r} is empty; it needs a header and at least a few rows")
    return df


def _load_table(path: Path, target: str | None, task: str) -> Dataset:
    import pandas as pd

    df = read_table(path)
    if not target:
        raise XAIError(f"no target column given for {str(path)!r}; pass --target COLUMN")
    if target not in df.columns:
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise XAIError(f"target column {target!r} is not in {str(path)!r}; its columns are: {cols}")
    features = df.drop(columns=[target])
    if features.shape[1] == 0:
        raise XAIError(f"data file {str(path)!r} has no feature columns besides the target {target!r}")
    for col in features.columns:
        if not (pd.api.types.is_numeric_dtype(features[col]) or pd.api.types.is_bool_dtype(features[col])):
            raise XAIError(
                f"feature column {col!r} is not numeric; encode it as numbers or drop it from the table"
            )
        if features[col].isna().any():
            raise XAIError(
                f"feature column {col!r} has missing values; fill or drop them before training"
            )
    y_col = df[target]
    if y_col.isna().any():
        raise XAIError(f"target column {target!r} has missing values; drop those rows")
    if len(df) < 10:
        raise XAIError(f"data file {str(path)!r} has only {len(df)} rows; at least 10 are needed")
    resolved: Task = _infer_task(y_col) if task == "auto" else task  # type: ignore[assignment]
    X = features.to_numpy(dtype=np.float32)
    if resolved == "classification":
        classes, y = np.unique(y_col.astype(str).to_numpy(), return_inverse=True)
        if len(classes) < 2:
            raise XAIError(f"target column {target!r} has a single class; a classifier needs two or more")
        return Dataset(str(path), X, y.astype(np.int64), tuple(map(str, features.columns)), target,
                       "classification", tuple(str(c) for c in classes))
    if not pd.api.types.is_numeric_dtype(y_col) or pd.api.types.is_bool_dtype(y_col):
        raise XAIError(
            f"target column {target!r} is not numeric, so it cannot be regressed; use --task classification"
        )
    return Dataset(str(path), X, y_col.to_numpy(dtype=np.float32), tuple(map(str, features.columns)),
                   target, "regression")


def _infer_task(y: object) -> Task:
    import pandas as pd

    series = y  # a pandas Series
    if pd.api.types.is_float_dtype(series):  # type: ignore[arg-type]
        return "regression"
    if series.nunique() <= MAX_INFERRED_CLASSES:  # type: ignore[attr-defined]
        return "classification"
    if pd.api.types.is_numeric_dtype(series):  # type: ignore[arg-type]
        return "regression"
    return "classification"


def split_dataset(
    ds: Dataset, spec: SplitSpec | None = None, *, test_size: float | None = None, seed: int | None = None,
    val_fraction: float | None = None,
) -> Split:
    """The cookbook's split: train on the test part, early-stop on a fraction of it.

    ``spec`` (default :class:`SplitSpec`'s defaults) picks the rows; the keyword
    arguments override its fields one by one.
    """
    spec = spec or SplitSpec()
    overrides = {k: v for k, v in (("test_size", test_size), ("seed", seed), ("val_fraction", val_fraction))
                 if v is not None}
    if overrides:
        spec = SplitSpec(**{**spec.__dict__, **overrides})
    test_size, seed, val_fraction = spec.test_size, spec.seed, spec.val_fraction
    idx = np.arange(len(ds.X))
    if ds.task == "classification" and _can_stratify(ds.y, test_size):
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=seed, stratify=ds.y)
    else:
        train_idx, test_idx = shuffle_split(idx, test_size, seed)
    if len(test_idx) < 4:
        raise XAIError(f"the test part has only {len(test_idx)} rows; use more data or a larger test_size")
    mean = ds.X[train_idx].mean(axis=0)
    std = ds.X[train_idx].std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # a constant feature stays 0, not NaN
    Xs = ((ds.X - mean) / std).astype(np.float32)
    fit_idx, val_idx = shuffle_split(test_idx, val_fraction, seed)
    y_mean, y_std = 0.0, 1.0
    ys = ds.y
    if ds.task == "regression":
        y_mean = float(ds.y[train_idx].mean())
        y_std = float(ds.y[train_idx].std()) or 1.0
        ys = ((ds.y - y_mean) / y_std).astype(np.float32)
    return Split(
        X_fit=Xs[fit_idx], y_fit=ys[fit_idx],
        X_val=Xs[val_idx], y_val=ys[val_idx],
        X_test=Xs[test_idx], y_test=ys[test_idx],
        mean=mean.astype(np.float32), std=std, y_mean=y_mean, y_std=y_std,
        n_train=len(train_idx), seed=seed, test_size=test_size, val_fraction=val_fraction,
    )


def shuffle_split(items: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)``: the rows scikit-learn's ``train_test_split(items, test_size=test_size,
    random_state=seed)`` picks, without importing scikit-learn.

    The test part is the first ``ceil(test_size * n)`` of ``RandomState(seed).permutation(n)``,
    the train part the rest, as in ``ShuffleSplit``; tests check the rows against scikit-learn.

    Example:
        >>> train, test = shuffle_split(np.arange(5), 0.4, 42)
        >>> sorted(np.concatenate([train, test]).tolist()), len(test)
        ([0, 1, 2, 3, 4], 2)
    """
    import math

    n = len(items)
    n_test = math.ceil(test_size * n)
    if not 0 < n_test < n:
        raise XAIError(
            f"test_size={test_size} of {n} rows leaves an empty part; use more rows or a test_size "
            "that keeps at least one row on each side"
        )
    permutation = np.random.RandomState(seed).permutation(n)
    return items[permutation[n_test:]], items[permutation[:n_test]]


def _can_stratify(y: np.ndarray, test_size: float) -> bool:
    counts = np.bincount(y)
    return bool(counts.min() >= 2 and len(y) * min(test_size, 1 - test_size) >= len(counts))
