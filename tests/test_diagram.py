"""Tests for mlflow_xai.figures.diagram: DOT from torchviz, rendering through graphviz-pure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mlflow_xai.errors import XAIError
from mlflow_xai.figures import diagram
from mlflow_xai.figures.diagram import architecture_dot, find_dot, render_all, render_dot

needs_dot = pytest.mark.skipif(find_dot() is None, reason="no Graphviz renderer installed")


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def mlp_dot() -> str:
    return architecture_dot(_MLP(), torch.zeros(2, 3))


def test_architecture_dot_names_every_parameter(mlp_dot: str) -> None:
    assert mlp_dot.startswith("digraph")
    for name in ("layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias"):
        assert name in mlp_dot


def test_architecture_dot_restores_each_training_flag() -> None:
    model = _MLP().train()
    model.layers[2].eval()  # a part the user froze on purpose
    architecture_dot(model, torch.zeros(2, 3))
    assert model.training and model.layers[0].training
    assert not model.layers[2].training


def test_architecture_dot_restores_flags_when_forward_raises() -> None:
    model = _MLP().train()
    with pytest.raises(RuntimeError):
        architecture_dot(model, torch.zeros(2, 5))  # wrong input width
    assert all(module.training for module in model.modules())


def test_architecture_dot_traces_under_no_grad() -> None:
    with torch.no_grad():
        dot = architecture_dot(_MLP(), torch.zeros(2, 3))
    assert "layers.0.weight" in dot


def test_architecture_dot_rejects_non_tensor_output() -> None:
    class DictOut(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x}

    with pytest.raises(XAIError, match="tensor or a tuple of tensors"):
        architecture_dot(DictOut(), torch.zeros(1, 2))


def _fake_executable(directory: Path, name: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_find_dot_prefers_system_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dot = _fake_executable(tmp_path / "system", "dot")
    _fake_executable(tmp_path / "system", "graphviz-pure")
    monkeypatch.setenv("PATH", str(dot.parent))
    assert find_dot() == str(dot)


def test_find_dot_falls_back_to_graphviz_pure_beside_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pure = _fake_executable(tmp_path / "venv-bin", "graphviz-pure")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(pure.parent / "python"))
    assert find_dot() == str(pure)


def test_find_dot_none_when_nothing_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert find_dot() is None


@needs_dot
def test_render_dot_svg(mlp_dot: str) -> None:
    svg = render_dot(mlp_dot, "svg")
    assert svg.lstrip().startswith(b"<?xml") or b"<svg" in svg
    assert b"layers.0.weight" in svg


@needs_dot
def test_render_dot_png(mlp_dot: str) -> None:
    png = render_dot(mlp_dot, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 2000


@needs_dot
def test_render_dot_bad_source_raises_clear_error() -> None:
    with pytest.raises(XAIError, match="failed"):
        render_dot("digraph { a -> ", "svg")


def test_render_dot_unknown_format() -> None:
    with pytest.raises(XAIError, match="choose one of svg, png"):
        render_dot("digraph { a }", "pdf")


@needs_dot
def test_render_all_returns_both_formats(mlp_dot: str) -> None:
    outputs, warnings = render_all(mlp_dot)
    assert set(outputs) == {"svg", "png"}
    assert warnings == []


@needs_dot
def test_render_all_bad_source_warns_instead_of_raising() -> None:
    outputs, warnings = render_all("digraph { a -> ")
    assert outputs == {}
    assert len(warnings) == 2
    assert all("not rendered" in w for w in warnings)


def test_render_all_without_renderer_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagram, "find_dot", lambda: None)
    outputs, warnings = render_all("digraph { a }")
    assert outputs == {}
    assert len(warnings) == 1 and "install Graphviz" in warnings[0]


def test_render_dot_missing_executable_raises() -> None:
    with pytest.raises(XAIError, match="could not run"):
        render_dot("digraph { a }", "svg", executable="/nonexistent/dot")
