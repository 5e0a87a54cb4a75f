"""Tests of mlflow_xai.inspect.attributions and mlflow_xai.figures.attributions.

Tiny nets with hand-set weights give closed-form expected values; the nonlinear
nets check completeness within the tolerances documented in the module.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

import mlflow_xai.inspect.attributions as attributions_module
from mlflow_xai.errors import XAIError
from mlflow_xai.figures.attributions import attribution_bar, conductance_figure, weights_vs_conductance
from mlflow_xai.inspect.attributions import (
    METHODS,
    attribute,
    attribute_with_error,
    completeness_error,
    conductance,
    conductances,
    path_attributions,
    rank_features,
    simpson_weights,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- nets


def linear(weights: list[list[float]], bias: list[float]) -> nn.Linear:
    w = torch.tensor(weights)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.tensor(bias))
    return layer


class Product(nn.Module):
    """f(x) = x0 * x1 + 2 * x2: IG from zero gives x0*x1/2, x0*x1/2, 2*x2 exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] * x[:, 1] + 2 * x[:, 2]).unsqueeze(1)


class MLP(nn.Module):
    """Cookbook-like: a ``layers`` Sequential, so layer names are ``layers.0`` etc."""

    def __init__(self, act: type[nn.Module], sizes: tuple[int, ...] = (5, 16, 16, 1), seed: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        mods: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=False):
            lin = nn.Linear(a, b)
            with torch.no_grad():  # seeded weights: the test does not depend on torch's global RNG
                lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5 * 1.5)
                lin.bias.copy_(torch.randn(b, generator=gen) * 0.5)
            mods += [lin, act()]
            if dropout:
                mods.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*mods[: -2 if dropout else -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def batch(n: int = 32, d: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def gain(net: nn.Module, x: torch.Tensor, b: torch.Tensor, target: int = 0) -> np.ndarray:
    with torch.no_grad():
        return (net(x) - net(b))[:, target].double().numpy()


# ------------------------------------------------------------ completeness (IG, DL)


def test_ig_exact_on_polynomial_net() -> None:
    # Gauss-Legendre integrates the quadratic path exactly: no tolerance beyond rounding.
    x = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, -1.0]])
    attr = attribute(Product(), x, "integrated_gradients")
    half = (x[:, 0] * x[:, 1] / 2).numpy()
    expected = np.stack([half, half, 2 * x[:, 2].numpy()], axis=1)
    np.testing.assert_allclose(attr, expected, atol=1e-5)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("baselines", [None, "mean"])
def test_ig_completeness_smooth_nets(act: type[nn.Module], baselines: str | None) -> None:
    net, x = MLP(act), batch()
    b = torch.zeros_like(x) if baselines is None else x.mean(0, keepdim=True).expand_as(x)
    attr = attribute(net, x, "integrated_gradients", baselines=baselines)
    g = gain(net, x, b)
    err = np.abs(attr.astype(float).sum(1) - g)
    # documented: worst 5e-6 of the mean |f(x) - f(b)| on smooth nets
    assert err.max() <= 1e-5 * np.abs(g).mean()
    # and the function that reports it agrees with this hand computation
    np.testing.assert_allclose(completeness_error(net, x, attr, baselines), err, atol=1e-6)


def test_ig_completeness_relu_net_within_documented_tolerance() -> None:
    net, x = MLP(nn.ReLU), batch(64)
    res = attribute_with_error(net, x, "integrated_gradients")
    g = gain(net, x, torch.zeros_like(x))
    rel = np.abs(res.values.astype(float).sum(1) - g) / np.abs(g).mean()
    # documented for ReLU nets at n_steps=50: median 9e-3, worst 9e-2
    assert np.median(rel) < 2e-2 and rel.max() < 1e-1
    # captum's convergence delta is the same quantity
    np.testing.assert_allclose(res.completeness_error, rel * np.abs(g).mean(), atol=1e-5)
    # more steps, smaller error (first-order rule on a kinked integrand)
    fine = attribute_with_error(net, x, "integrated_gradients", n_steps=400)
    assert fine.completeness_error is not None and res.completeness_error is not None
    assert fine.completeness_error.mean() < res.completeness_error.mean() / 2


def test_deep_lift_complete_on_relu_net() -> None:
    net, x = MLP(nn.ReLU), batch()
    res = attribute_with_error(net, x, "deep_lift", baselines="mean")
    assert res.completeness_error is not None
    g = gain(net, x, x.mean(0, keepdim=True).expand_as(x))
    assert res.completeness_error.max() <= 1e-5 * np.abs(g).mean()


def test_completeness_error_detects_wrong_attributions() -> None:
    net, x = MLP(nn.Tanh), batch(8)
    attr = attribute(net, x, "integrated_gradients")
    g = gain(net, x, torch.zeros_like(x))
    np.testing.assert_allclose(completeness_error(net, x, 2 * attr), np.abs(g), rtol=1e-4, atol=1e-6)
    with pytest.raises(XAIError, match="do not match"):
        completeness_error(net, x, attr[:, :3])


def test_gradient_shap_and_ablation_report_no_completeness() -> None:
    net, x = MLP(nn.Tanh), batch(4)
    assert attribute_with_error(net, x, "gradient_shap").completeness_error is None
    assert attribute_with_error(net, x, "feature_ablation").completeness_error is None


# ------------------------------------------------------------------- closed forms

W = [[2.0, -1.0, 0.5, 3.0]]
B = [0.3]


@pytest.mark.parametrize("method", ["integrated_gradients", "deep_lift", "feature_ablation"])
@pytest.mark.parametrize(
    "baselines",
    [None, "zeros", "mean", 1.5, np.array([0.1, -0.2, 0.3, 0.4]), "per_sample"],
)
def test_linear_net_closed_form(method: str, baselines: object) -> None:
    net, x = linear(W, B), batch(6, 4)
    per_sample = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    spec = per_sample if isinstance(baselines, str) and baselines == "per_sample" else baselines
    if spec is None or isinstance(spec, str) and spec == "zeros":
        b = torch.zeros_like(x)
    elif isinstance(spec, str):
        b = x.mean(0, keepdim=True)
    else:
        b = torch.as_tensor(spec, dtype=torch.float32)
    attr = attribute(net, x, method, baselines=spec)  # type: ignore[arg-type]
    expected = (torch.tensor(W) * (x - b)).numpy()
    np.testing.assert_allclose(attr, expected, atol=1e-5)


def test_gradient_shap_linear_in_expectation_and_seeded() -> None:
    net, x = linear(W, B), batch(6, 4)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    attr = attribute(net, x, "gradient_shap", baselines="mean", n_steps=2000)
    # the caller's random streams are untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    expected = (torch.tensor(W) * (x - x.mean(0))).numpy()
    # noise rows: 16 draws at 0.1 x feature std, so their mean is off by ~0.025 std
    tol = 0.1 * np.abs(np.array(W)) * x.std(0).numpy()
    assert np.all(np.abs(attr - expected) <= tol)
    assert not np.allclose(attr, expected, atol=1e-6)  # the noise is really there
    again = attribute(net, x, "gradient_shap", baselines="mean", n_steps=2000)
    np.testing.assert_array_equal(attr, again)
    other = attribute(net, x, "gradient_shap", baselines="mean", n_steps=2000, seed=1)
    assert not np.array_equal(attr, other)


def test_feature_ablation_is_output_drop_on_nonlinear_net() -> None:
    net, x = MLP(nn.Tanh), batch(8)
    base = x.mean(0)
    attr = attribute(net, x, "feature_ablation", baselines="mean")
    with torch.no_grad():
        fx = net(x)[:, 0]
        for i in range(x.shape[1]):
            ablated = x.clone()
            ablated[:, i] = base[i]
            np.testing.assert_allclose(attr[:, i], (fx - net(ablated)[:, 0]).numpy(), atol=1e-6)


def test_numpy_inputs_and_squeezed_output() -> None:
    class Squeezed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = linear(W, B)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).squeeze(1)  # (batch,), as many regressors return

    x = batch(5, 4).numpy().astype(np.float64)
    attr = attribute(Squeezed(), x, "integrated_gradients", target=0)
    assert attr.dtype == np.float32
    np.testing.assert_allclose(attr, np.array(W) * x, atol=1e-5)


# -------------------------------------------------------------------------- targets


def classifier() -> tuple[nn.Module, torch.Tensor]:
    net = MLP(nn.Tanh, sizes=(4, 8, 3), seed=5)
    return net, batch(24, 4, seed=6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", [None, "classification"])
def test_classifier_default_target_is_argmax(method: str, task: str | None) -> None:
    net, x = classifier()
    with torch.no_grad():
        pred = net(x).argmax(1)
    assert len(pred.unique()) >= 2  # otherwise "per sample" is not tested
    res = attribute_with_error(net, x, method, task=task)  # type: ignore[arg-type]
    np.testing.assert_array_equal(res.target, pred.numpy())
    explicit = attribute(net, x, method, target=pred)  # type: ignore[arg-type]
    np.testing.assert_allclose(res.values, explicit, atol=1e-6)
    fixed = attribute(net, x, method, target=0)  # type: ignore[arg-type]
    assert not np.allclose(res.values, fixed, atol=1e-4)


def test_multi_output_regressor_needs_target() -> None:
    net, x = linear([[1.0, 2.0], [3.0, -4.0]], [0.0, 0.0]), batch(3, 2)
    with pytest.raises(XAIError, match=r"2 outputs.*target=<output index in 0\.\.1>"):
        attribute(net, x, "integrated_gradients", task="regression")
    attr = attribute(net, x, "integrated_gradients", target=1, task="regression")
    np.testing.assert_allclose(attr, np.array([3.0, -4.0]) * x.numpy(), atol=1e-5)


@pytest.mark.parametrize("target", [3, -1, [0, 1, 5, 0], np.array([0, 3, 0, 0])])
def test_target_out_of_range(target: object) -> None:
    net, x = classifier()
    with pytest.raises(XAIError, match=r"out of range.*3 output\(s\), valid 0\.\.2"):
        attribute(net, x[:4], "deep_lift", target=target)  # type: ignore[arg-type]


def test_bad_target_shape_and_type() -> None:
    net, x = classifier()
    with pytest.raises(XAIError, match=r"one index per sample \(shape \(4,\)\)"):
        attribute(net, x[:4], "deep_lift", target=[0, 1])
    with pytest.raises(XAIError, match="integer"):
        attribute(net, x[:4], "deep_lift", target=np.array([0.0, 1.0, 1.0, 0.0]))


def test_unknown_method_task_and_baselines() -> None:
    net, x = classifier()
    with pytest.raises(XAIError, match="integrated_gradients, deep_lift, gradient_shap, feature_ablation"):
        attribute(net, x, "saliency")  # type: ignore[arg-type]
    with pytest.raises(XAIError, match="did you mean 'deep_lift'"):
        attribute(net, x, "deeplift")  # type: ignore[arg-type]
    with pytest.raises(XAIError, match="regression, classification"):
        attribute(net, x, "deep_lift", task="ranking")  # type: ignore[arg-type]
    with pytest.raises(XAIError, match="'zeros' or 'mean'"):
        attribute(net, x, "deep_lift", baselines="median")
    with pytest.raises(XAIError, match=r"\(3,\) do not broadcast to inputs of shape \(24, 4\)"):
        attribute(net, x, "deep_lift", baselines=np.zeros(3))
    with pytest.raises(XAIError, match="batch first"):
        attribute(net, x[0], "deep_lift")
    with pytest.raises(XAIError, match="NaN"):
        attribute(net, x.clone().fill_(float("nan")), "deep_lift")
    with pytest.raises(XAIError, match="torch.nn.Module"):
        attribute(lambda t: t, x, "deep_lift")  # type: ignore[arg-type]


# --------------------------------------------------------------------- model state


def all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", METHODS)
def test_eval_during_attribution_and_state_restored(method: str) -> None:
    net, x = MLP(nn.ReLU, dropout=0.5), batch(8)
    net.train()
    net.layers[1].eval()  # a mixed state must come back exactly as it was
    flags = [m.training for m in net.modules()]
    first = net.layers[0]
    first.weight.grad = torch.full_like(first.weight, 7.0)
    a = attribute(net, x, method)  # type: ignore[arg-type]
    b = attribute(net, x, method)  # type: ignore[arg-type]
    # dropout off during attribution: repeated runs agree, and agree with eval mode
    np.testing.assert_array_equal(a, b)
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(first.weight.grad, torch.full_like(first.weight, 7.0))
    assert all(p.grad is None for p in net.parameters() if p is not first.weight)
    assert all_hooks(net) == 0
    net.eval()
    np.testing.assert_allclose(attribute(net, x, method), a, atol=1e-6)  # type: ignore[arg-type]


def test_state_restored_after_error() -> None:
    net, x = classifier()
    net.train()
    with pytest.raises(XAIError):
        attribute(net, x, "integrated_gradients", target=9)
    assert all(m.training for m in net.modules())


# --------------------------------------------------------------------- conductance


def test_conductance_shape_and_completeness() -> None:
    net, x = MLP(nn.Tanh, sizes=(5, 16, 12, 1)), batch(32)
    cond = conductance(net, x, "layers.2")
    assert cond.shape == (32, 12)
    ig = attribute(net, x, "integrated_gradients").astype(float).sum(1)
    g = gain(net, x, torch.zeros_like(x))
    rel = np.abs(cond.astype(float).sum(1) - ig) / np.abs(g).mean()
    # documented for tanh nets at n_steps=50: median 1.5e-2, worst 1.7e-1
    assert np.median(rel) < 3e-2 and rel.max() < 2e-1
    assert all_hooks(net) == 0
    # captum's rule is first order: four times the steps, a smaller gap
    fine = conductance(net, x, "layers.2", n_steps=200).astype(float).sum(1)
    assert np.abs(fine - ig).mean() < np.abs(cond.astype(float).sum(1) - ig).mean() / 2
    # per-unit values are not a trivial split: units differ
    assert np.abs(cond.mean(0)).std() > 1e-3


def test_conductance_mean_baseline_and_classifier_target() -> None:
    net, x = classifier()
    cond = conductance(net, x, "layers.0", baselines="mean")
    with torch.no_grad():
        pred = net(x).argmax(1)
    explicit = conductance(net, x, "layers.0", target=pred, baselines="mean")
    np.testing.assert_allclose(cond, explicit, atol=1e-6)
    b = x.mean(0, keepdim=True).expand_as(x)
    with torch.no_grad():
        g = (net(x) - net(b)).gather(1, pred[:, None])[:, 0].numpy()
    assert np.abs(cond.sum(1) - g).max() < 2e-1 * np.abs(g).mean()


class BatchNormNet(nn.Module):
    """Linear -> BatchNorm (eval: running statistics set by hand) -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.layers = nn.Sequential(nn.Linear(5, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 6),
                                    nn.Sigmoid(), nn.Linear(6, 1))
        bn = self.layers[1]
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(10, generator=gen) * 0.3)
            bn.running_var.copy_(torch.rand(10, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(10, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(10, generator=gen) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def captum_conductance(net: nn.Module, x: torch.Tensor, layer: str, target: torch.Tensor,
                       baseline: torch.Tensor, n_steps: int = 50) -> np.ndarray:
    from captum.attr import LayerConductance

    module = dict(net.named_modules())[layer]
    net.eval()
    values = LayerConductance(net, module).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, method="riemann_trapezoid")
    return values.detach().numpy()


CONDUCTANCE_NETS = {
    "relu": (lambda: MLP(nn.ReLU, sizes=(5, 16, 12, 8, 1)), ["layers.1", "layers.2", "layers.3", "layers.5"]),
    "tanh": (lambda: MLP(nn.Tanh, sizes=(5, 16, 12, 1)), ["layers.0", "layers.1", "layers.3"]),
    "batchnorm": (BatchNormNet, ["layers.0", "layers.1", "layers.2", "layers.4"]),
    "classifier": (lambda: MLP(nn.Tanh, sizes=(4, 8, 6, 3), seed=5), ["layers.1", "layers.2", "layers.3"]),
}


@pytest.mark.parametrize("net_name", sorted(CONDUCTANCE_NETS))
@pytest.mark.parametrize("baselines", [None, "mean"])
@pytest.mark.parametrize("chunked", [False, True])
def test_conductances_equal_captum(net_name: str, baselines: str | None, chunked: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make, layers = CONDUCTANCE_NETS[net_name]
    net = make()
    x = batch(24, 4, seed=6) if net_name == "classifier" else batch(24)
    if chunked:  # a few path points per chunk: the chunk seams must not show
        monkeypatch.setattr(attributions_module, "_PATH_MAX_ELEMENTS", 24 * 40)
    got = conductances(net, x, layers, baselines=baselines)
    assert list(got) == layers
    with torch.no_grad():
        out = net.eval()(x)
    target = out.argmax(1) if out.shape[1] > 1 else torch.zeros(len(x), dtype=torch.long)
    if net_name == "classifier":
        assert len(target.unique()) >= 2  # one target per sample is exercised
    base = torch.zeros_like(x) if baselines is None else x.mean(0, keepdim=True).expand_as(x)
    for layer in layers:
        want = captum_conductance(net, x, layer, target, base)
        assert got[layer].shape == want.shape
        np.testing.assert_allclose(got[layer], want, atol=1e-5, rtol=1e-4, err_msg=layer)
        # the single-layer form is the same computation
        np.testing.assert_allclose(conductance(net, x, layer, baselines=baselines), got[layer], atol=1e-5, rtol=1e-5)
    assert all_hooks(net) == 0


def textbook_path_ig(net: nn.Module, x: torch.Tensor, base: torch.Tensor, target: torch.Tensor,
                     n_steps: int) -> np.ndarray:
    """Integrated gradients written out: the target output's gradient at each of the
    ``n_steps + 1`` uniform path points, one point at a time, weighted by Simpson's rule."""
    weights = simpson_weights(n_steps)
    total = torch.zeros_like(x)
    for w, a in zip(weights, torch.linspace(0, 1, n_steps + 1).tolist(), strict=True):
        point = (base + a * (x - base)).requires_grad_()
        (g,) = torch.autograd.grad(net(point)[torch.arange(len(x)), target].sum(), point)
        total += w * g
    return ((x - base) * total).detach().numpy()


@pytest.mark.parametrize("net_name", sorted(CONDUCTANCE_NETS))
@pytest.mark.parametrize("chunked", [False, True])
def test_path_attributions_one_walk_gives_both(net_name: str, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    make, layers = CONDUCTANCE_NETS[net_name]
    net = make()
    x = batch(24, 4, seed=6) if net_name == "classifier" else batch(24)
    if chunked:
        monkeypatch.setattr(attributions_module, "_PATH_MAX_ELEMENTS", 24 * 40)
    net.train()
    ig, cond = path_attributions(net, x, layers, baselines="mean")
    assert net.training and all_hooks(net) == 0
    # the conductances are those of conductances() (equal to captum's, above)
    alone = conductances(net, x, layers, baselines="mean")
    assert list(cond) == layers
    for layer in layers:
        np.testing.assert_allclose(cond[layer], alone[layer], atol=1e-6, rtol=1e-5, err_msg=layer)
    # integrated gradients: the textbook sum over the same points, one point at a time
    with torch.no_grad():
        out = net.eval()(x)
    target = out.argmax(1) if out.shape[1] > 1 else torch.zeros(len(x), dtype=torch.long)
    base = x.mean(0, keepdim=True).expand_as(x)
    assert ig.method == "integrated_gradients" and (ig.target == target.numpy()).all()
    np.testing.assert_allclose(ig.values, textbook_path_ig(net, x, base, target, 50), atol=1e-5, rtol=1e-4)
    # the completeness error it reports is the one completeness_error() measures
    assert ig.completeness_error is not None
    np.testing.assert_allclose(ig.completeness_error, completeness_error(net, x, ig.values, "mean"), atol=2e-5)
    # the same integral as captum's Gauss-Legendre integrated gradients, up to the rules' errors
    with torch.no_grad():
        scale = np.abs((net(x) - net(base))[torch.arange(len(x)), target].numpy()).mean()
    gl = attribute(net, x, "integrated_gradients", baselines="mean")
    smooth = net_name in ("tanh", "classifier")
    assert np.abs(ig.values - gl).max() < (1e-3 if smooth else 2e-1) * scale
    if smooth:  # Simpson on 51 points: documented worst 4e-4 of the mean gain on tanh nets
        assert ig.completeness_error.max() < 1e-3 * scale


def test_path_attributions_odd_steps_polynomial_and_no_layers() -> None:
    # an odd n_steps ends with Simpson's 3/8 rule; both are exact for the cubic path of a product
    x = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, -1.0]])
    ig, cond = path_attributions(Product(), x, [], n_steps=7)
    half = (x[:, 0] * x[:, 1] / 2).numpy()
    np.testing.assert_allclose(ig.values, np.stack([half, half, 2 * x[:, 2].numpy()], axis=1), atol=1e-5)
    assert cond == {}
    # with layers and an odd n_steps, conductance is still captum's and IG the textbook sum
    net, xb = classifier()
    ig, cond = path_attributions(net, xb, ["layers.1"], target=2, n_steps=7)
    want = captum_conductance(net, xb, "layers.1", torch.full((len(xb),), 2), torch.zeros_like(xb), n_steps=7)
    np.testing.assert_allclose(cond["layers.1"], want, atol=1e-5, rtol=1e-4)
    want_ig = textbook_path_ig(net.eval(), xb, torch.zeros_like(xb), torch.full((len(xb),), 2), 7)
    np.testing.assert_allclose(ig.values, want_ig, atol=1e-5, rtol=1e-4)
    with pytest.raises(XAIError, match="list of layer names"):
        path_attributions(net, xb, "layers.1")  # type: ignore[arg-type]


def test_simpson_weights() -> None:
    for n in (1, 2, 3, 4, 5, 7, 50, 51):
        w = np.array(simpson_weights(n))
        assert len(w) == n + 1 and abs(w.sum() - 1) < 1e-12 and (w > 0).all()
        t = np.linspace(0, 1, n + 1)
        if n > 1:  # exact for cubics
            assert abs((w * t**3).sum() - 0.25) < 1e-12
    with pytest.raises(XAIError):
        simpson_weights(0)


def test_conductances_explicit_target_and_n_steps() -> None:
    net, x = classifier()
    got = conductances(net, x, ["layers.1"], target=2, n_steps=7)["layers.1"]
    want = captum_conductance(net, x, "layers.1", torch.full((len(x),), 2), torch.zeros_like(x), n_steps=7)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


class InplaceAfter(nn.Module):
    """A tapped Linear whose output an in-place ReLU then overwrites."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


def test_conductances_layer_overwritten_in_place_downstream() -> None:
    torch.manual_seed(4)
    net, x = InplaceAfter(), batch(16)
    got = conductances(net, x, ["fc"])["fc"]
    want = captum_conductance(net, x, "fc", torch.zeros(16, dtype=torch.long), torch.zeros_like(x))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got < 0).any()  # the pre-activation values survived the in-place ReLU


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.fc(x)))


def test_conductances_bad_layers() -> None:
    net, x = Twice(), batch(4)
    net.train()
    with pytest.raises(XAIError, match=r"layer 'fc' is called 2 times by the forward pass"):
        conductances(net, x, ["fc"])
    with pytest.raises(XAIError, match=r"layer 'unused' is not called by the forward pass"):
        conductances(net, x, ["head", "unused"])
    with pytest.raises(XAIError, match=r"layers must be a list of layer names"):
        conductances(net, x, "head")  # type: ignore[arg-type]
    with pytest.raises(XAIError, match=r"unknown layer 'fc2'.*; valid layers: fc"):
        conductances(net, x, ["head", "fc2"])
    assert all_hooks(net) == 0 and net.training  # hooks gone and state restored after each error
    assert conductances(net, x, []) == {}
    assert conductances(net, x, ["head", "head"])["head"].shape == (4, 1)


def test_conductance_unknown_layer_lists_names() -> None:
    net, x = MLP(nn.ReLU), batch(4)
    with pytest.raises(XAIError, match=r"unknown layer 'layer\.0' \(did you mean 'layers\.0'\?\); valid layers: layers\.0.*layers"):
        conductance(net, x, "layer.0")


# ------------------------------------------------------------------- rank_features


def test_rank_features_order() -> None:
    attr = np.array([[1.0, -3.0, 0.5, 1.0], [-1.0, 1.0, -0.5, -1.0]])
    ranked = rank_features(attr, ["age", "bmi", "bp", "s1"])
    assert ranked == [("bmi", 2.0), ("age", 1.0), ("s1", 1.0), ("bp", 0.5)]  # ties keep order
    assert [n for n, _ in rank_features(attr)] == ["x1", "x0", "x3", "x2"]
    assert rank_features(np.array([0.1, -0.4])) == [("x1", 0.4), ("x0", 0.1)]
    with pytest.raises(XAIError, match="3 feature names for 4 features"):
        rank_features(attr, ["a", "b", "c"])


# -------------------------------------------------------------------------- figures


def png(fig: object) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)  # type: ignore[arg-type]
    return buf.getvalue()


def test_attribution_bar_top_feature_on_top() -> None:
    ranked = [("bmi", 3.0), ("s5", 2.0), ("bp", 1.0), ("age", 0.5)]
    fig = attribution_bar("integrated_gradients", ranked, top=3)
    assert png(fig).startswith(b"\x89PNG")
    ax = fig.axes[0]
    bars = ax.patches
    assert [round(b.get_width(), 6) for b in bars] == [3.0, 2.0, 1.0]
    # in display coordinates the widest bar is highest
    ys = [ax.transData.transform((0, b.get_y() + b.get_height() / 2))[1] for b in bars]
    assert ys == sorted(ys, reverse=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bmi", "s5", "bp"]
    assert "top 3 of 4" in ax.get_title()
    assert png(attribution_bar("deep_lift", [])).startswith(b"\x89PNG")
    with pytest.raises(XAIError):
        attribution_bar("deep_lift", ranked, top=0)


def test_conductance_figure_means_per_unit() -> None:
    values = np.array([[1.0, -2.0, 0.0], [3.0, 0.0, 0.5]])
    fig = conductance_figure("layers.0", values)
    assert png(fig).startswith(b"\x89PNG")
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [2.0, -1.0, 0.25])


def test_wide_layers_drawn_as_one_line_collection() -> None:
    from matplotlib.collections import LineCollection

    from mlflow_xai.figures.attributions import MAX_WIDTH, WIDE_UNITS

    n = 4 * WIDE_UNITS
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, n))
    fig = conductance_figure("layers.1", values)
    ax = fig.axes[0]
    assert len(ax.patches) == 0
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segs = lines.get_segments()
    assert len(segs) == n
    # each unit's line runs from 0 to its mean conductance, coloured by sign
    np.testing.assert_allclose([s[1][1] for s in segs], values.mean(0))
    assert len({tuple(c) for c in lines.get_colors()}) == 2
    assert fig.get_figwidth() == MAX_WIDTH
    png = io.BytesIO()
    FigureCanvasAgg(fig).print_png(png)
    assert png.getvalue()[:4] == b"\x89PNG"
    fig = weights_vs_conductance("layers.12", rng.normal(size=n), values)
    bars = fig.axes[0]
    assert len(bars.patches) == 0 and len(bars.collections) == 2
    assert [len(c.get_segments()) for c in bars.collections] == [n, n]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["weight (scaled)", "conductance (scaled)"]


def test_weights_vs_conductance() -> None:
    w = np.array([[0.5, -2.0, 1.0]])  # a (1, units) weight matrix is accepted
    c = np.array([[0.1, -0.4, 0.2], [0.3, -0.8, 0.2]])
    fig = weights_vs_conductance("layers.4", w, c)
    assert png(fig).startswith(b"\x89PNG")
    bars, scatter = fig.axes
    heights = [p.get_height() for p in bars.patches]
    # scaled by max |value|: weights /2, conductance /0.6
    np.testing.assert_allclose(heights, [0.25, -1.0, 0.5, 0.2 / 0.6, -1.0, 0.2 / 0.6])
    assert scatter.get_title() == f"Pearson r = {np.corrcoef(w[0], c.mean(0))[0, 1]:.2f}"
    with pytest.raises(XAIError, match="3 weights but 2 conductance"):
        weights_vs_conductance("layers.4", w, np.zeros(2))


def test_imports_do_not_load_pyplot() -> None:
    # One fresh interpreter (torch's import dominates the cost), checked in two steps.
    code = (
        "import sys\n"
        "import mlflow_xai.inspect.attributions\n"
        "assert not any(m.startswith('matplotlib') for m in sys.modules), 'inspect imported matplotlib'\n"
        # captum.attr imports pyplot itself, so it must be imported lazily
        "assert 'captum' not in sys.modules, 'captum imported eagerly'\n"
        "import mlflow_xai.figures.attributions\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
