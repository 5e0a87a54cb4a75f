"""Tests for mlflow_xai.inspect: tiny nets with hand-set weights, exact expected values."""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlflow_xai.inspect.diagnostics as diagnostics
import mlflow_xai.inspect.stats as stats_mod
from mlflow_xai.errors import XAIError
from mlflow_xai.inspect import (
    Explanation,
    capture_activations,
    explain,
    histogram,
    summary_dict,
    tensor_stats,
)

# --------------------------------------------------------------------------- helpers

W1 = [[1.0, -1.0], [2.0, 0.0], [0.0, 0.5]]
B1 = [0.0, -1.0, 0.5]
W2 = [[1.0, 2.0, -1.0]]
B2 = [0.5]
X = [[1.0, 2.0], [3.0, -1.0]]


def mlp(inplace: bool = False) -> nn.Sequential:
    """Linear(2,3) -> ReLU -> Linear(3,1) with the hand-set weights above."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=inplace), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1))
        net[0].bias.copy_(torch.tensor(B1))
        net[2].weight.copy_(torch.tensor(W2))
        net[2].bias.copy_(torch.tensor(B2))
    return net


def x() -> torch.Tensor:
    return torch.tensor(X)


def np_stats(a: np.ndarray, eps: float = 1e-6) -> dict[str, float]:
    a = np.asarray(a, dtype=np.float64).ravel()
    f = a[np.isfinite(a)]
    return {
        "mean": f.mean(),
        "std": f.std(),
        "min": f.min(),
        "max": f.max(),
        "l2_norm": float(np.sqrt((f * f).sum())),
        "near_zero_share": float((np.abs(f) <= eps).mean()),
        "nan_count": int(np.isnan(a).sum()),
        "inf_count": int(np.isinf(a).sum()),
    }


def assert_stats(stats: object, a: np.ndarray) -> None:
    for key, want in np_stats(a).items():
        assert getattr(stats, key) == pytest.approx(want, rel=1e-12, abs=1e-12), key


def all_hooks(model: nn.Module) -> int:
    """Hooks on any module, plus torch function modes left on the stack."""
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    return hooks + torch._C._len_torch_function_stack()


# --------------------------------------------------------------------------- stats


def test_tensor_stats_exact_values() -> None:
    t = torch.tensor([1.0, -2.0, 0.0, 3.0, 1e-7, float("nan"), float("inf"), -float("inf")])
    s = tensor_stats(t)
    finite = [1.0, -2.0, 0.0, 3.0, 1e-7]
    assert s.numel == 8
    assert s.nan_count == 1 and s.inf_count == 2
    assert s.mean == pytest.approx(sum(finite) / 5)
    assert s.std == pytest.approx(float(np.std(np.array(finite, dtype=np.float32).astype(np.float64))))
    assert (s.min, s.max) == (-2.0, 3.0)
    assert s.l2_norm == pytest.approx(math.sqrt(1 + 4 + 9 + 1e-14))
    assert s.near_zero_share == pytest.approx(2 / 5)  # 0 and 1e-7, of the finite values


def test_all_nan_and_empty_do_not_crash() -> None:
    s = tensor_stats(torch.full((4, 3), float("nan")))
    assert s.nan_count == 12 and s.inf_count == 0
    assert all(math.isnan(getattr(s, k)) for k in ("mean", "std", "min", "max", "l2_norm"))
    h = histogram(torch.full((4, 3), float("nan")), bins=5)
    assert h.counts.sum() == 0 and len(h.edges) == 6 and np.all(np.diff(h.edges) > 0)
    assert tensor_stats(torch.empty(0)).numel == 0


def test_constant_tensor_histogram_is_valid() -> None:
    h = histogram(torch.full((10,), 3.0), bins=4)
    assert h.counts.sum() == 10 and len(h.counts) == 4
    assert np.all(np.diff(h.edges) > 0)
    assert h.edges[0] < 3.0 < h.edges[-1]
    s = tensor_stats(torch.full((10,), 3.0))
    assert (s.std, s.min, s.max, s.mean) == (0.0, 3.0, 3.0, 3.0)


def test_histogram_matches_numpy_and_skips_non_finite() -> None:
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, float("nan"), float("inf"), -float("inf")])
    h = histogram(t, bins=2)
    want, edges = np.histogram([0.0, 0.1, 0.5, 0.9, 1.0], bins=2)
    np.testing.assert_array_equal(h.counts, want)  # [2, 3]: NaN/Inf are not binned
    np.testing.assert_allclose(h.edges, edges)


def test_chunked_merge_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks exercise the parallel mean/variance merge and the non-finite slow path.
    monkeypatch.setattr(stats_mod, "_CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 11, generator=g) * 3 + 100
    t[0, 3] = float("nan")
    t[5, :] = float("nan")  # a whole chunk of NaN
    t[9, 10] = float("inf")
    assert_stats(tensor_stats(t), t.numpy())
    h = histogram(t, bins=9)
    f = t.numpy()[np.isfinite(t.numpy())]
    assert h.counts.sum() == f.size
    assert h.edges[0] == pytest.approx(f.min()) and h.edges[-1] == pytest.approx(f.max())


def test_large_tensor_stats_are_precise() -> None:
    # An offset mean of 1000 breaks a naive float32 sum of squares.
    t = torch.randn(5120, 2560, generator=torch.Generator().manual_seed(1)) + 1000
    s = tensor_stats(t)
    h = histogram(t, bins=50)
    a = t.numpy().astype(np.float64)
    assert s.mean == pytest.approx(a.mean(), rel=1e-12)
    assert s.std == pytest.approx(a.std(), rel=1e-9)
    assert h.counts.sum() == t.numel()


# --------------------------------------------------------------------------- explain


def test_weights_activations_gradients_exact() -> None:
    net = mlp()
    y = torch.tensor([1.0, 2.0])  # (N,) targets for an (N, 1) head: reshaped for MSE
    e = explain(net, x(), y)

    assert list(e.weights) == ["0", "2"]
    assert list(e.activations) == ["0", "1", "2"]
    assert list(e.gradients) == ["0", "2"]

    w = e.weights["0"]
    np.testing.assert_array_equal(w.values, np.array(W1, dtype=np.float32))
    assert_stats(w.stats, np.array(W1))
    assert w.stats.l2_norm == pytest.approx(2.5)  # sqrt(1 + 1 + 4 + 0.25)
    assert w.stats.near_zero_share == pytest.approx(2 / 6)
    np.testing.assert_array_equal(w.bias, np.array(B1, dtype=np.float32))
    assert_stats(w.bias_stats, np.array(B1))
    assert w.module_type == "Linear"

    # Activations by hand: x @ W1.T + b1, then ReLU, then the head.
    pre = np.array([[-1.0, 1.0, 1.5], [4.0, 5.0, 0.0]])
    post = np.maximum(pre, 0)
    out = np.array([[1.0], [14.5]])
    np.testing.assert_allclose(e.activations["0"].values, pre)
    np.testing.assert_allclose(e.activations["1"].values, post)
    np.testing.assert_allclose(e.activations["2"].values, out)
    assert_stats(e.activations["1"].stats, post)
    np.testing.assert_allclose(e.activations["1"].mean_per_unit, post.mean(axis=0))
    assert e.activations["1"].module_type == "ReLU"
    assert e.activations["1"].dead_share == 0.0
    assert e.activations["0"].dead_share is None  # Linear output: not ReLU-family

    # Gradients: the same loss computed independently with autograd on a copy.
    ref = copy.deepcopy(net)
    loss = F.mse_loss(ref(x()), y.reshape(2, 1))
    loss.backward()
    assert e.loss == pytest.approx(loss.item())
    assert e.loss == pytest.approx(((1 - 1) ** 2 + (14.5 - 2) ** 2) / 2)
    for name in ("0", "2"):
        g = e.gradients[name]
        np.testing.assert_allclose(g.values, ref[int(name)].weight.grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(g.bias, ref[int(name)].bias.grad.numpy(), rtol=1e-6)
        assert_stats(g.stats, ref[int(name)].weight.grad.numpy())
        gn = np.linalg.norm(ref[int(name)].weight.grad.numpy())
        wn = np.linalg.norm(ref[int(name)].weight.detach().numpy())
        assert g.grad_to_weight_ratio == pytest.approx(gn / wn, rel=1e-6)
    assert e.diagnostics.max_grad_norm == pytest.approx(
        max(np.linalg.norm(ref[i].weight.grad.numpy()) for i in (0, 2)), rel=1e-6
    )


def test_no_targets_no_gradients() -> None:
    e = explain(mlp(), x())
    assert e.gradients == {} and e.loss is None
    assert e.diagnostics.max_grad_norm is None
    assert list(e.activations) == ["0", "1", "2"]


def test_histograms_present_for_every_entry() -> None:
    e = explain(mlp(), x(), torch.zeros(2), bins=7)
    for entry in [*e.weights.values(), *e.activations.values(), *e.gradients.values()]:
        assert len(entry.histogram.counts) == 7 and len(entry.histogram.edges) == 8
        assert entry.histogram.counts.sum() == entry.values.size


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_conv_batchnorm_nested_keys_and_units() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    bn = net.features[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -0.25]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.1]))
    running = (bn.running_mean.clone(), bn.running_var.clone())
    net.train()
    inp = torch.randn(5, 1, 4, 4)
    e = explain(net, inp, torch.tensor([0, 1, 2, 0, 1]))

    assert list(e.activations) == [
        "features.0", "features.1", "features.2", "features.3.0", "features.3.1", "head.0", "head.1",
    ]
    assert list(e.weights) == ["features.0", "features.1", "features.3.0", "head.1"]
    assert list(e.gradients) == ["features.0", "features.1", "features.3.0", "head.1"]
    assert e.weights["features.1"].module_type == "BatchNorm2d"

    conv = e.activations["features.0"].values
    assert conv.shape == (5, 2, 4, 4)
    np.testing.assert_allclose(e.activations["features.0"].mean_per_unit, conv.mean(axis=(0, 2, 3)), rtol=1e-6)
    # BN in eval mode: running statistics, not the batch's.
    rm, rv = running[0].numpy()[None, :, None, None], running[1].numpy()[None, :, None, None]
    want = (conv - rm) / np.sqrt(rv + bn.eps) * np.array([2.0, 0.5])[None, :, None, None] + np.array(
        [0.1, -0.1]
    )[None, :, None, None]
    np.testing.assert_allclose(e.activations["features.1"].values, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    relu = e.activations["features.2"]
    assert relu.mean_per_unit.shape == (2,)  # one value per channel
    dead = (relu.values.max(axis=(0, 2, 3)) <= 0).mean()
    assert relu.dead_share == pytest.approx(dead)
    assert e.activations["head.1"].mean_per_unit.shape == (3,)
    assert net.training and bn.training  # restored


class AttrNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Linear(4, 1)  # defined first: keys follow named_modules(), not call order
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def test_attribute_named_layers_keys() -> None:
    net = AttrNet()
    e = explain(net, torch.randn(6, 3), torch.randn(6, 1))
    assert list(e.weights) == ["fc2", "fc1"]
    assert list(e.activations) == ["fc2", "fc1", "act", "drop"]
    assert list(e.gradients) == ["fc2", "fc1"]
    assert e.activations["act"].dead_share is None  # Tanh is not ReLU-family
    assert e.meta["layers"] == ("fc2", "fc1", "act", "drop")


def test_eval_during_and_training_flags_restored() -> None:
    torch.manual_seed(0)
    net = AttrNet()
    net.train()
    net.fc1.eval()  # a user's deliberate mix must survive
    inp = torch.randn(64, 3)
    e1 = explain(net, inp, torch.randn(64, 1))
    e2 = explain(net, inp)
    # Dropout off: identical, deterministic, and equal to the eval-mode forward.
    np.testing.assert_array_equal(e1.activations["drop"].values, e2.activations["drop"].values)
    np.testing.assert_array_equal(e1.activations["drop"].values, e1.activations["act"].values)
    assert (net.training, net.fc1.training, net.fc2.training, net.drop.training) == (True, False, True, True)
    # Sanity: the model really is in train mode, so dropout would act outside explain.
    assert not torch.equal(net(inp), net(inp))


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.act(self.fc(x))
        raise RuntimeError("boom")


def test_no_hook_left_after_exception() -> None:
    net = Boom()
    net.train()
    with pytest.raises(XAIError, match="boom"):
        explain(net, torch.ones(3, 2), torch.zeros(3, 2))
    assert all_hooks(net) == 0
    assert net.training and net.fc.training  # restored on error too
    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(net):
            net(torch.ones(3, 2))
    assert all_hooks(net) == 0


def test_capture_activations_direct() -> None:
    net = mlp()
    with capture_activations(net, layers=["2", "0"]) as acts:
        net(x())
    assert list(acts) == ["0", "2"]  # model order, not the order asked for
    np.testing.assert_allclose(acts["2"].numpy(), [[1.0], [14.5]])
    assert not acts["0"].requires_grad
    assert all_hooks(net) == 0


def test_inplace_relu_does_not_overwrite_captured_linear_output() -> None:
    e = explain(mlp(inplace=True), x())
    np.testing.assert_allclose(e.activations["0"].values, [[-1.0, 1.0, 1.5], [4.0, 5.0, 0.0]])
    np.testing.assert_allclose(e.activations["1"].values, [[0.0, 1.0, 1.5], [4.0, 5.0, 0.0]])


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x  # torchvision's ResNet does this: an in-place write outside any module
        return self.relu(out)


def test_functional_inplace_add_does_not_overwrite_capture() -> None:
    torch.manual_seed(0)
    net = ResBlock()
    inp = torch.randn(2, 3, 4, 4)
    e = explain(net, inp, torch.randn(2, 3, 4, 4))
    net.eval()
    with torch.no_grad():
        bn_out = net.bn(net.conv(inp))
    np.testing.assert_allclose(e.activations["bn"].values, bn_out.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.activations["relu"].values, torch.relu(bn_out + inp).numpy(), rtol=1e-5, atol=1e-6)


def test_user_grad_untouched() -> None:
    net = mlp()
    sentinel = torch.full_like(net[0].weight, 7.0)
    net[0].weight.grad = sentinel
    explain(net, x(), torch.zeros(2))
    assert net[0].weight.grad is sentinel and torch.all(sentinel == 7.0)
    assert net[2].weight.grad is None and net[0].bias.grad is None


def test_nan_weight_counted_and_flagged() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    e = explain(net, x(), torch.zeros(2))
    s = e.weights["0"].stats
    assert s.nan_count == 1
    assert s.mean == pytest.approx(np.mean([-1.0, 2.0, 0.0, 0.0, 0.5]))  # the finite rest
    # Unit 0 of layer 0 is NaN for both samples; it propagates through ReLU to the head.
    assert e.activations["0"].stats.nan_count == 2
    assert e.diagnostics.nan_count >= 1 + 2
    assert "1 NaN values in weight of 0" in e.diagnostics.flags


def test_dead_relu_share_and_vanishing_gradient() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    e = explain(net, x(), torch.zeros(2))
    assert e.activations["1"].dead_share == 1.0
    assert e.diagnostics.dead_unit_share == 1.0
    # Nothing flows back through dead units: layer 0's gradient is exactly zero.
    assert e.gradients["0"].stats.l2_norm == 0.0
    assert e.gradients["0"].vanishing and "0" in e.diagnostics.vanishing_layers
    assert any(f.startswith("dead ReLU units in 1: 3/3") for f in e.diagnostics.flags)
    # The head sees all-zero inputs: zero weight gradient, but its bias still learns.
    assert e.diagnostics.vanishing_layers == ("0", "2")
    assert e.gradients["2"].bias_stats is not None and e.gradients["2"].bias_stats.l2_norm == pytest.approx(1.0)


def test_partly_dead_share() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([-100.0, 0.0, -100.0]))
    e = explain(net, x())
    assert e.activations["1"].dead_share == pytest.approx(2 / 3)


def test_exploding_gradient_flagged() -> None:
    net = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    e = explain(net, torch.tensor([[1e3]]), torch.tensor([[0.0]]))
    # d/dw (1e3 w - 0)^2 = 2e6 at w = 1
    assert e.gradients["0"].values.item() == pytest.approx(2e6)
    assert e.gradients["0"].exploding and not e.gradients["0"].vanishing
    assert e.diagnostics.exploding_layers == ("0",)
    assert any(f.startswith("exploding gradient in 0") for f in e.diagnostics.flags)


def test_gradient_flags_thresholds() -> None:
    assert diagnostics.gradient_flags(0.5 * diagnostics.VANISHING_GRAD_NORM, 1.0) == (True, False)
    assert diagnostics.gradient_flags(1.0, 0.5 * diagnostics.VANISHING_RATIO) == (True, False)
    assert diagnostics.gradient_flags(2 * diagnostics.EXPLODING_GRAD_NORM, 1.0) == (False, True)
    assert diagnostics.gradient_flags(1.0, 2 * diagnostics.EXPLODING_RATIO) == (False, True)
    assert diagnostics.gradient_flags(1.0, 1.0, grad_inf_count=1) == (False, True)
    assert diagnostics.gradient_flags(1.0, 1.0) == (False, False)
    assert diagnostics.gradient_flags(1.0, math.nan) == (False, False)


def test_cross_entropy_for_integer_targets() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    inp = torch.randn(6, 3)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    e = explain(net, inp, y)
    with torch.no_grad():
        logits = net(inp)
    assert e.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert e.loss != pytest.approx(F.mse_loss(logits, F.one_hot(y, 3).float()).item(), rel=1e-3)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(inp), y).backward()
    np.testing.assert_allclose(e.gradients["2"].values, ref[2].weight.grad.numpy(), rtol=1e-5)
    # (N, 1) labels work too.
    assert explain(net, inp, y[:, None]).loss == pytest.approx(e.loss, rel=1e-6)


def test_custom_loss_fn() -> None:
    net = mlp()
    e = explain(net, x(), torch.zeros(2, 1), loss_fn=lambda out, t: (out - t).abs().sum())
    assert e.loss == pytest.approx(1.0 + 14.5)


def test_copy_false_shares_memory_copy_true_does_not() -> None:
    net = mlp()
    weight = net[0].weight.detach().numpy()
    shared = explain(net, x(), torch.zeros(2), copy=False)
    private = explain(net, x(), torch.zeros(2), copy=True)
    assert np.shares_memory(shared.weights["0"].values, weight)
    assert np.shares_memory(shared.weights["0"].bias, net[0].bias.detach().numpy())
    assert not np.shares_memory(private.weights["0"].values, weight)
    assert not np.shares_memory(private.weights["0"].bias, net[0].bias.detach().numpy())
    np.testing.assert_array_equal(shared.weights["0"].values, private.weights["0"].values)
    np.testing.assert_array_equal(shared.gradients["0"].values, private.gradients["0"].values)


def test_layer_selection_names_and_predicate() -> None:
    e = explain(mlp(), x(), torch.zeros(2), layers=["0"])
    assert (list(e.weights), list(e.activations), list(e.gradients)) == (["0"], ["0"], ["0"])
    e = explain(mlp(), x(), torch.zeros(2), layers=lambda name, m: isinstance(m, nn.Linear))
    assert (list(e.weights), list(e.activations), list(e.gradients)) == (["0", "2"], ["0", "2"], ["0", "2"])


def test_unknown_layer_names_valid_ones() -> None:
    with pytest.raises(XAIError, match=r"unknown layer 'layers\.9'.*0, 1, 2"):
        explain(mlp(), x(), layers=["layers.9"])
    with pytest.raises(XAIError, match=r"did you mean .fc1.\?\); valid layers: fc1, "):  # the close match comes first
        explain(AttrNet(), torch.ones(2, 3), layers=["fc_1"])
    with pytest.raises(XAIError, match="layers must be"):
        explain(mlp(), x(), layers=3)  # type: ignore[arg-type]


def test_bad_inputs_raise_xai_error() -> None:
    with pytest.raises(XAIError, match=r"inputs of shape \(2, 5\)"):
        explain(mlp(), torch.ones(2, 5))
    with pytest.raises(XAIError, match="do not match the model output"):
        explain(mlp(), x(), torch.zeros(3))
    with pytest.raises(XAIError, match="one logit per class"):
        explain(mlp(), x(), torch.tensor([0, 1]))
    with pytest.raises(XAIError, match="scalar"):
        explain(mlp(), x(), torch.zeros(2), loss_fn=lambda o, t: o)


def test_frozen_layer_has_weights_but_no_gradient() -> None:
    net = mlp()
    net[0].requires_grad_(False)
    e = explain(net, x(), torch.zeros(2))
    assert list(e.weights) == ["0", "2"]
    assert list(e.gradients) == ["2"]


def test_sequence_outputs_have_units_on_last_dim() -> None:
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Conv1d(7, 2, 1))
    inp = torch.randn(3, 7, 4)  # (N, T, D) for the Linear; T doubles as Conv1d channels
    e = explain(net, inp)
    lin = e.activations["0"].values
    np.testing.assert_allclose(e.activations["0"].mean_per_unit, lin.mean(axis=(0, 1)), rtol=1e-6)
    assert e.activations["1"].mean_per_unit.shape == (5,)  # ReLU inherits the layout
    assert e.activations["2"].mean_per_unit.shape == (2,)  # Conv1d: channels on dim 1


def test_rnn_units_on_hidden_dim() -> None:
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    e = explain(Rnn(), torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 1]))
    assert e.activations["lstm"].values.shape == (4, 5, 6)  # the first tensor of (out, (h, c))
    assert e.activations["lstm"].mean_per_unit.shape == (6,)
    assert e.meta["uncovered_params"] == ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0")


def test_numpy_inputs_and_float64_cast() -> None:
    e = explain(mlp(), np.array(X), np.zeros(2))
    np.testing.assert_allclose(e.activations["2"].values, [[1.0], [14.5]])


# --------------------------------------------------------------------------- summary


def test_summary_dict_is_strict_json() -> None:
    net = mlp()
    with torch.no_grad():
        net[2].bias.fill_(float("nan"))  # all-NaN bias and head output: NaN moments
    e = explain(net, x(), torch.zeros(2))
    d = summary_dict(e)
    text = json.dumps(d, allow_nan=False)  # raises on any NaN/Inf left behind
    assert json.loads(text) == d
    assert d["schema_version"] == 1
    assert list(d["layers"]) == ["0", "1", "2"]
    head = d["layers"]["2"]
    assert head["bias"]["nan_count"] == 1 and head["bias"]["mean"] is None
    assert head["activation"]["mean"] is None and head["activation"]["shape"] == [2, 1]
    assert d["layers"]["0"]["weight"]["l2_norm"] == pytest.approx(2.5)
    assert d["layers"]["1"]["weight"] is None and d["layers"]["1"]["activation"]["dead_share"] == 0.0
    assert d["layers"]["0"]["gradient"]["shape"] == [3, 2]
    assert isinstance(d["layers"]["0"]["gradient"]["vanishing"], bool)
    assert d["loss"] is None  # the loss is NaN
    assert d["diagnostics"]["nan_count"] == e.diagnostics.nan_count > 0
    assert d["diagnostics"]["thresholds"]["exploding_grad_norm"] == diagnostics.EXPLODING_GRAD_NORM
    assert '"values"' not in text and '"mean_per_unit"' not in text  # statistics only


def test_explanation_round_trips_through_pickle() -> None:
    import pickle

    e = explain(mlp(), x(), torch.zeros(2))
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, Explanation)
    np.testing.assert_array_equal(back.gradients["0"].values, e.gradients["0"].values)


# --------------------------------------------------------------------------- layering


def test_inspect_never_imports_mlflow_or_matplotlib() -> None:
    pkg = Path(__file__).resolve().parents[1] / "mlflow_xai" / "inspect"
    offenders = []
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("mlflow", "matplotlib")]
    assert offenders == []


def test_stats_run_on_one_thread_and_restore_the_thread_count() -> None:
    # Several chunks, some NaN: both the fast and the slow path run under the one-thread context.
    t = torch.randn(3 * stats_mod._CHUNK + 5, generator=torch.Generator().manual_seed(0))
    t[7] = float("nan")
    before = torch.get_num_threads()
    seen: list[int] = []
    real = stats_mod._moments

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    torch.set_num_threads(2)
    try:
        stats_mod._moments = spy  # type: ignore[assignment]
        s, h = stats_mod.stats_and_histogram(t)
        stats_mod.tensor_stats(t)
        stats_mod.histogram(t)
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
        finite = t[torch.isfinite(t)].double().numpy()
        assert s.nan_count == 1 and math.isclose(s.mean, finite.mean(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(s.std, finite.std(), rel_tol=1e-9)
        assert int(h.counts.sum()) == finite.size
        with pytest.raises(XAIError):
            stats_mod.stats_and_histogram(t, bins=0)
        assert torch.get_num_threads() == 2
    finally:
        stats_mod._moments = real  # type: ignore[assignment]
        torch.set_num_threads(before)
