"""Every docstring example in the package runs, and shows what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mlflow_xai

MODULES = sorted(m.name for m in pkgutil.walk_packages(mlflow_xai.__path__, "mlflow_xai."))


def _examples(name: str) -> int:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return sum(len(t.examples) for t in finder.find(importlib.import_module(name)))


@pytest.mark.parametrize("name", [m for m in MODULES if m != "mlflow_xai.__main__"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run it with -s)"


def test_the_examples_are_found() -> None:
    # The count of examples is the package's; a finder that sees none would make the test above vacuous.
    assert sum(_examples(m) for m in MODULES if m != "mlflow_xai.__main__") >= 60
