from __future__ import annotations

import pytest
import torch
from torch import nn

from mlflow_xai.config import TunedConfig
from mlflow_xai.nets import MLP


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


def test_cookbook_layer_shapes_l1_2_n_in_10() -> None:
    model = MLP(TunedConfig(l1=2), n_in=10, n_out=1)
    assert _linear_shapes(model) == [(40, 10), (20, 40), (40, 20), (20, 40), (20, 20), (10, 20), (10, 10), (1, 10)]


def test_block_order_with_batch_norm() -> None:
    model = MLP(TunedConfig(l1=1, batch_norm=True, act_fn="ELU"), n_in=4, n_out=3)
    kinds = [type(m).__name__ for m in model.layers[:4]]
    assert kinds == ["Linear", "BatchNorm1d", "ELU", "Dropout"]
    assert model(torch.randn(5, 4)).shape == (5, 3)


@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_initializations_zero_the_biases(scheme: str) -> None:
    model = MLP(TunedConfig(l1=1, initialization=scheme), n_in=4, n_out=1)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_swish_is_silu_and_state_dict_holds_no_modules() -> None:
    model = MLP(TunedConfig(l1=1, act_fn="Swish"), n_in=3, n_out=1)
    assert isinstance(model.layers[1], nn.SiLU)
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
