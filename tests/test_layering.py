"""The import contract: which parts of the package may import mlflow, matplotlib and Lightning.

Read from the source (every import statement, also those inside functions), so a lazy
import that breaks the layering is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_xai"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Top-level package names of every module the file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


# Who may import what. Everything not listed may not.
MAY_IMPORT = {
    # MLflow: the jobs, the tracking side, the evaluator plugin, the monitor's sink, the CLI.
    "mlflow": {"mlflow_xai.tracking.http", "mlflow_xai.tracking.runs", "mlflow_xai.tracking.writer",
               "mlflow_xai.tracking.epochs", "mlflow_xai.tracking.sources", "mlflow_xai.tracking.registry",
               "mlflow_xai.tracking.tuning", "mlflow_xai.jobs.train", "mlflow_xai.jobs.explain", "mlflow_xai.jobs.compare",
               "mlflow_xai.evaluator", "mlflow_xai.monitor.sinks", "mlflow_xai.cli", "mlflow_xai.sources.pytorch_model",
               "mlflow_xai.sources.inputs"},
    # matplotlib: the figures, and the CLI (imported before the GC freeze).
    "matplotlib": {"mlflow_xai.figures.style", "mlflow_xai.figures.layers", "mlflow_xai.figures.attributions",
                   "mlflow_xai.figures.compare", "mlflow_xai.cli"},
    # Lightning: the fit, its callbacks (the monitor, the epoch metrics).
    "lightning": {"mlflow_xai.train", "mlflow_xai.monitor.callback", "mlflow_xai.monitor.sinks",
                  "mlflow_xai.tracking.epochs"},
}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_only_the_allowed_modules_import(package: str) -> None:
    importers = {_name(p) for p in MODULES if package in _imports(p)}
    assert importers <= MAY_IMPORT[package], f"{package} imported by {sorted(importers - MAY_IMPORT[package])}"
    assert importers, f"no module imports {package}: the contract above is stale"


def test_inspect_is_pure_computation() -> None:
    for path in (PACKAGE / "inspect").rglob("*.py"):
        assert not _imports(path) & {"mlflow", "matplotlib", "lightning", "PIL"}, path.name


def test_no_module_imports_a_private_name_of_another() -> None:
    """A piece two modules need has a public name in one home, not an underscore reached into."""
    leaks = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlflow_xai"):
                leaks += [f"{_name(path)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not leaks, leaks
