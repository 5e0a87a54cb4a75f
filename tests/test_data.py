from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlflow_xai.data import load_dataset, shuffle_split, split_dataset
from mlflow_xai.errors import XAIError


def test_diabetes_is_embedded_with_feature_names() -> None:
    ds = load_dataset("diabetes")
    assert ds.X.shape == (442, 10) and ds.task == "regression" and ds.n_out == 1
    assert ds.feature_names == ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def test_the_embedded_diabetes_data_is_scikit_learns() -> None:
    from sklearn.datasets import load_diabetes

    bunch, ds = load_diabetes(scaled=False), load_dataset("diabetes")
    np.testing.assert_array_equal(ds.X, bunch.data.astype(np.float32))
    np.testing.assert_array_equal(ds.y, bunch.target.astype(np.float32))
    assert ds.feature_names == tuple(bunch.feature_names)


@pytest.mark.parametrize(("n", "test_size", "seed"), [(442, 0.4, 42), (177, 0.2, 42), (10, 0.25, 0), (7, 0.5, 123)])
def test_shuffle_split_picks_the_rows_scikit_learn_picks(n: int, test_size: float, seed: int) -> None:
    from sklearn.model_selection import train_test_split

    items = np.arange(100, 100 + n)
    ours, theirs = shuffle_split(items, test_size, seed), train_test_split(items, test_size=test_size,
                                                                           random_state=seed)
    for mine, sk in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine, sk)


def test_shuffle_split_refuses_an_empty_part() -> None:
    with pytest.raises(XAIError, match="leaves an empty part"):
        shuffle_split(np.arange(3), 0.99, 0)


def test_r2_is_scikit_learns() -> None:
    from sklearn.metrics import r2_score as sk_r2

    from mlflow_xai.jobs.train import r2_score

    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    for pred in (y + rng.normal(scale=0.3, size=50), np.full(50, y.mean() + 1.0), y.copy()):
        assert r2_score(y, pred) == pytest.approx(sk_r2(y, pred), rel=1e-12)
    assert r2_score(np.ones(4), np.ones(4)) == sk_r2(np.ones(4), np.ones(4)) == 1.0
    assert r2_score(np.ones(4), np.zeros(4)) == sk_r2(np.ones(4), np.zeros(4)) == 0.0


def test_split_follows_the_cookbook_and_standardizes_with_training_stats() -> None:
    ds = load_dataset("diabetes")
    s = split_dataset(ds, test_size=0.4, seed=1)
    assert len(s.X_test) == 177 and s.n_train == 265
    assert len(s.X_fit) + len(s.X_val) == len(s.X_test)
    # the fit/val rows are the test rows: training happens on the test part
    test_rows = {tuple(r) for r in s.X_test.round(5)}
    assert all(tuple(r) in test_rows for r in s.X_fit.round(5))
    again = split_dataset(ds, test_size=0.4, seed=1)
    np.testing.assert_array_equal(s.X_test, again.X_test)
    # statistics come from the training part, so the test part is not exactly centred
    assert not np.allclose(s.X_test.mean(axis=0), 0.0, atol=1e-6)


def test_csv_classification_inferred(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60), "label": ["x", "y", "z"] * 20})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    ds = load_dataset(str(path), "label")
    assert ds.task == "classification" and ds.classes == ("x", "y", "z") and ds.n_out == 3
    assert ds.feature_names == ("a", "b") and ds.y.dtype == np.int64


def test_parquet_regression(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": np.arange(30.0), "y": np.arange(30.0) * 2})
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    ds = load_dataset(str(path), "y")
    assert ds.task == "regression" and ds.X.shape == (30, 1)


@pytest.mark.parametrize(
    ("frame", "target", "needle"),
    [
        (pd.DataFrame({"a": ["u", "v"] * 10, "y": range(20)}), "y", "feature column 'a' is not numeric"),
        (pd.DataFrame({"a": range(20), "y": range(20)}), "nope", "target column 'nope' is not in"),
        (pd.DataFrame({"a": [1.0, None] * 10, "y": range(20)}), "y", "feature column 'a' has missing values"),
        (pd.DataFrame({"a": [], "y": []}), "y", "is empty"),
    ],
)
def test_bad_tables_one_line(tmp_path: Path, frame: pd.DataFrame, target: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(XAIError, match=needle):
        load_dataset(str(path), target)


def test_missing_file_and_missing_target_flag(tmp_path: Path) -> None:
    with pytest.raises(XAIError, match="does not exist"):
        load_dataset(str(tmp_path / "none.csv"), "y")
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": range(20), "y": range(20)}).to_csv(path, index=False)
    with pytest.raises(XAIError, match="pass --target COLUMN"):
        load_dataset(str(path), None)
