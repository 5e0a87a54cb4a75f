"""Small rules about modules that every measurement shares: which dimension holds a
layer's units, which activations have dead units, which modules have a weight, and
how to switch a model to eval mode without losing a frozen submodule's flag.

One copy of each, so that a layer's numbers in ``explain``, ``compare`` and the
attributions are computed by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "CHANNEL_FIRST",
    "CHANNEL_LAST",
    "RELU_FAMILY",
    "dead_units",
    "eval_mode",
    "has_weight",
    "is_activation",
    "unit_dim",
]

# Modules whose units sit on dim 1 (N, C, ...) ...
CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
# ... and modules that work on the last dim (N, ..., D), as in transformers, RNNs and MLPs.
CHANNEL_LAST: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.modules.rnn.RNNBase,  # (N, T, H) or (T, N, H): hidden units last either way
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Outputs that are exactly 0 for every negative input: a unit that is <= 0 on the whole
# batch passes no gradient back, so it is "dead". LeakyReLU, ELU, GELU, SiLU pass some
# gradient for negative inputs and get no dead share.
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every module's own flag restored afterwards.

    ``model.train(flag)`` would overwrite a submodule the user deliberately froze in
    eval mode, so each module's flag is saved and put back one by one.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def has_weight(module: nn.Module) -> bool:
    """Whether the module owns a ``weight`` tensor (a layer with weights to look at)."""
    return isinstance(module._parameters.get("weight"), torch.Tensor)


def is_activation(module: nn.Module) -> bool:
    """Whether the module is an activation (ReLU, GELU, Tanh, Softmax, ...): a module of
    ``torch.nn.modules.activation``, except ``MultiheadAttention``, a layer that lives there.

    Example:
        >>> is_activation(nn.ReLU()), is_activation(nn.MultiheadAttention(4, 1)), is_activation(nn.Linear(1, 1))
        (True, False, False)
    """
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(
        module, nn.MultiheadAttention
    )


def unit_dim(t: torch.Tensor, module: nn.Module, prev: tuple[torch.Size, int | None] | None) -> int | None:
    """Which dim of ``module``'s output ``t`` holds its units (``None``: one unit).

    Conv/BN/pool outputs are (N, C, ...): units on dim 1. Linear/LayerNorm/attention/RNN
    outputs are (N, ..., D): units on the last dim, also for (N, T, D) sequences.
    Elementwise layers (activations, dropout) have no layout of their own and inherit it
    from the output hooked right before (``prev``: its shape and unit dim) when the shapes
    agree; otherwise dim 1, PyTorch's channel-first convention. ``explain`` and the
    monitor both count units (mean activation per unit, dead share) by this rule.

    Example:
        >>> unit_dim(torch.zeros(8, 5, 16), nn.Linear(4, 16), None)
        2
        >>> unit_dim(torch.zeros(8, 3, 6, 6), nn.Conv2d(1, 3, 3), None)
        1
    """
    if t.dim() <= 1:
        return None
    if isinstance(module, CHANNEL_LAST):
        return t.dim() - 1
    if isinstance(module, CHANNEL_FIRST):
        return 1
    if prev is not None and prev[0] == t.shape:
        return prev[1]
    return 1


def dead_units(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Which units of the output ``t`` are dead: <= 0 for every sample and position.

    ``dim`` is the units' dim (:func:`unit_dim`; ``None``: one unit). A unit with a NaN
    is not dead. Meant for :data:`RELU_FAMILY` outputs, which pass no gradient back
    through a unit that is never > 0. Returns a bool tensor, one entry per unit, on
    ``t``'s device.

    Example:
        >>> dead_units(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), 1).tolist()
        [True, False]
    """
    if t.dim() == 0:  # a scalar output is one unit seen once
        t = t.reshape(1)
    reduce = tuple(d for d in range(t.dim()) if d != dim)
    # amax avoids a boolean copy of t.
    return torch.amax(t, dim=reduce).reshape(-1) <= 0
