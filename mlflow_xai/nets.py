"""The network a tuned config describes, its serving wrapper and its loss.

:class:`MLP` reproduces spotpython's NNLinearRegressor layer for layer (same shapes in
the same order, in a ``layers`` Sequential), so a cookbook user's tuned config gives
the very same network. It is a plain ``nn.Module``: explaining it needs no Lightning
(the LightningModule that trains it lives in :mod:`mlflow_xai.train`, so the explain
job never pays Lightning's import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mlflow_xai.config import ACTIVATIONS, TunedConfig

# Prefix of the network's keys in the LightningModule's state dict.
NET_PREFIX = "net."


class MLP(nn.Module):
    """Hidden blocks ``Linear -> [BatchNorm1d] -> activation -> Dropout``, then a Linear head."""

    def __init__(self, cfg: TunedConfig, n_in: int, n_out: int) -> None:
        super().__init__()
        cfg.check_size(n_in, n_out)
        act_cls = getattr(nn, ACTIVATIONS[cfg.act_fn])
        blocks: list[nn.Module] = []
        width = n_in
        for size in cfg.hidden_layer_sizes(n_in):
            blocks.append(nn.Linear(width, size))
            if cfg.batch_norm:
                blocks.append(nn.BatchNorm1d(size))
            blocks.append(act_cls())
            blocks.append(nn.Dropout(cfg.dropout_prob))
            width = size
        blocks.append(nn.Linear(width, n_out))
        self.layers = nn.Sequential(*blocks)
        _initialize(self.layers, cfg.initialization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _initialize(module: nn.Module, scheme: str) -> None:
    if scheme == "default":
        return  # torch's own Linear initialization
    init = getattr(nn.init, f"{scheme}_")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init(m.weight)
            nn.init.zeros_(m.bias)


class ServingModel(nn.Module):
    """The network as the MLflow model serves it: raw features in, target units (or logits) out.

    Training sees standardized features and, for regression, a standardized target;
    this wrapper applies the training part's statistics on both sides, so a user of
    the logged model passes the table's own columns.
    """

    def __init__(self, net: nn.Module, x_mean: Any, x_std: Any, y_mean: float, y_std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x_mean", torch.as_tensor(x_mean, dtype=torch.float32))
        self.register_buffer("x_std", torch.as_tensor(x_std, dtype=torch.float32))
        self.register_buffer("y_mean", torch.tensor(float(y_mean)))
        self.register_buffer("y_std", torch.tensor(float(y_std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.x_mean) / self.x_std) * self.y_std + self.y_mean


def loss_for(task: str) -> nn.Module:
    """The model's own loss: MSE for regression, cross-entropy for classification."""
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
