"""The architecture diagram: torchviz's autograd graph as DOT, rendered by Graphviz.

Rendering needs a ``dot`` program: the system Graphviz when installed, else the
``graphviz-pure`` binary (a drop-in for ``dot``) from the Python environment. A
missing or failing renderer is not fatal: :func:`render_all` returns what rendered
and a warning per format that did not, so the explanation goes on without a picture
and the DOT source can still be logged and rendered elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_xai.errors import XAIError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FORMATS", "architecture_dot", "find_dot", "render_all", "render_dot"]

#: Formats :func:`render_all` produces, in the order they are tried.
FORMATS: tuple[str, ...] = ("svg", "png")
_INSTALL_HINT = (
    "install Graphviz (apt install graphviz, brew install graphviz or "
    "conda install graphviz) or the graphviz-pure package"
)


def architecture_dot(model: nn.Module, example_input: torch.Tensor) -> str:
    """Trace one forward pass and return its autograd graph as DOT source.

    Parameters appear as nodes labelled with their qualified names
    (``layers.0.weight``) and shapes. The forward runs in eval mode, so dropout and
    batch norm take their inference paths, and with gradients enabled, since the
    graph is the autograd graph; every module's training flag is restored afterwards.

    Args:
        model: The network.
        example_input: A batch the network accepts.

    Returns:
        The DOT source.

    Raises:
        XAIError: When the forward pass does not return a tensor or a tuple/list of
            tensors.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> "0.weight" in architecture_dot(net, torch.zeros(1, 3))
        True
    """
    import torch
    from torchviz import make_dot

    from mlflow_xai.inspect.modules import eval_mode

    with eval_mode(model), torch.enable_grad():
        output = model(example_input)
    if isinstance(output, list):
        output = tuple(output)
    tensors = output if isinstance(output, tuple) else (output,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise XAIError(
            f"the model's forward returns {type(output).__name__}; the architecture "
            "diagram needs a tensor or a tuple of tensors, so wrap the model to return one"
        )
    graph = make_dot(output, params=dict(model.named_parameters()))
    return str(graph.source)


def find_dot() -> str | None:
    """Locate a Graphviz ``dot`` renderer.

    Returns:
        The path of the system ``dot`` if it is on ``PATH``; else of ``graphviz-pure``
        on ``PATH`` or beside the running interpreter (a virtualenv's ``bin`` that is
        not activated); else ``None``.
    """
    return (
        shutil.which("dot")
        or shutil.which("graphviz-pure")
        or shutil.which("graphviz-pure", path=str(Path(sys.executable).parent))
    )


def render_dot(
    dot_source: str,
    fmt: str = "svg",
    *,
    timeout: float = 60.0,
    executable: str | None = None,
) -> bytes:
    """Render DOT source with Graphviz.

    Args:
        dot_source: The graph in the DOT language.
        fmt: Output format, one of :data:`FORMATS`.
        timeout: Seconds to wait for the renderer; a huge graph may take long.
        executable: The renderer to run; found with :func:`find_dot` when ``None``.

    Returns:
        The rendered file's bytes.

    Raises:
        XAIError: On an unknown format, no renderer, a renderer error or a timeout;
            the message names the cause.
    """
    if fmt not in FORMATS:
        raise XAIError(
            f"cannot render the diagram as {fmt!r}; choose one of {', '.join(FORMATS)}"
        )
    dot = executable or find_dot()
    if dot is None:
        raise XAIError(f"no Graphviz renderer found to draw the diagram; {_INSTALL_HINT}")
    try:
        completed = subprocess.run(
            [dot, f"-T{fmt}"],
            input=dot_source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise XAIError(
            f"{Path(dot).name} -T{fmt} took longer than {timeout:g} s; the graph may be "
            "too large, render the logged architecture.dot elsewhere"
        ) from None
    except OSError as exc:
        raise XAIError(f"could not run {dot}: {exc}; {_INSTALL_HINT}") from exc
    if completed.returncode != 0 or not completed.stdout:
        # Graphviz can print a message per bad line; the start names the first error.
        detail = completed.stderr.decode("utf-8", "replace").strip()[:300] or "no output"
        raise XAIError(
            f"{Path(dot).name} -T{fmt} failed (exit {completed.returncode}): {detail}"
        )
    return completed.stdout


def render_all(
    dot_source: str,
    formats: Sequence[str] = FORMATS,
    *,
    timeout: float = 60.0,
) -> tuple[dict[str, bytes], list[str]]:
    """Render DOT source to each format, collecting failures instead of raising.

    Each format is tried on its own, since a Graphviz build can lack one renderer
    (PNG needs cairo or gd) and still have the other.

    Args:
        dot_source: The graph in the DOT language.
        formats: Formats to try, each one of :data:`FORMATS`.
        timeout: Seconds to wait for each rendering.

    Returns:
        ``(outputs, warnings)``: format to bytes for each format that rendered, and one
        line per format that did not, saying why.
    """
    dot = find_dot()
    if dot is None:
        return {}, [f"architecture diagram not rendered: no Graphviz renderer; {_INSTALL_HINT}"]
    outputs: dict[str, bytes] = {}
    warnings: list[str] = []
    for fmt in formats:
        try:
            outputs[fmt] = render_dot(dot_source, fmt, timeout=timeout, executable=dot)
        except XAIError as exc:
            warnings.append(f"architecture diagram not rendered as {fmt}: {exc}")
    return outputs, warnings
