"""``explain``: weights, activations and gradients of any ``nn.Module`` on one batch.

One forward pass (in eval mode, hooks on the leaves) gives the activations; when
targets are given, one ``torch.autograd.grad`` of the loss on that same forward gives
the gradients, without touching ``param.grad``. Statistics are computed in torch on
the model's device; only then are tensors turned into numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlflow_xai.errors import XAIError
from mlflow_xai.inspect.diagnostics import diagnose, gradient_flags
from mlflow_xai.inspect.hooks import LayerSelection, first_tensor, is_leaf, record_outputs, resolve_layers
from mlflow_xai.inspect.modules import RELU_FAMILY, dead_units, eval_mode, has_weight, unit_dim
from mlflow_xai.inspect.results import (
    Explanation,
    LayerActivations,
    LayerGradients,
    LayerWeights,
)
from mlflow_xai.inspect.stats import stats_and_histogram, tensor_stats

__all__ = ["explain", "Inputs", "LossFn"]

#: One tensor (or array), or a tuple/list of them passed as positional arguments.
Inputs = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]
#: ``loss_fn(output, targets) -> scalar tensor``.
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in model.parameters():
        return t.device, t.dtype
    for t in model.buffers():
        return t.device, (t.dtype if t.is_floating_point() else None)
    return torch.device("cpu"), None


def _to_tensor(x: Any, device: torch.device, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.as_tensor(x)
        # numpy defaults to float64; a float32 model would reject it.
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        raise XAIError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return t.to(device)


def _prepare_inputs(inputs: Inputs, device: torch.device, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not items:
        raise XAIError("inputs are empty; pass a batch tensor (batch dimension first)")
    args = tuple(_to_tensor(x, device, dtype, "inputs") for x in items)
    if args[0].dim() == 0 or args[0].shape[0] == 0:
        raise XAIError(f"inputs need a non-empty batch dimension first, got shape {tuple(args[0].shape)}")
    return args


def _default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """MSE for floating (or bool) targets, cross-entropy for integer class labels."""
    out = first_tensor(output)
    if out is None:
        raise XAIError(f"the model returned {type(output).__name__} without a tensor; pass loss_fn")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        targets = targets.to(out.dtype)
        if targets.shape != out.shape:
            if targets.numel() != out.numel():
                raise XAIError(
                    f"targets of shape {tuple(targets.shape)} do not match the model output of "
                    f"shape {tuple(out.shape)}; pass one target per output value or a loss_fn"
                )
            targets = targets.reshape(out.shape)  # (N,) targets for an (N, 1) head
        return F.mse_loss(out, targets)
    if out.dim() < 2 or out.shape[1] < 2:
        raise XAIError(
            f"integer targets mean class labels, but the model output has shape {tuple(out.shape)} "
            "(cross-entropy needs one logit per class in dim 1); cast targets to float for "
            "regression or pass a loss_fn"
        )
    if targets.dim() == out.dim() and targets.shape[1] == 1:
        targets = targets.squeeze(1)  # (N, 1) labels, as a DataLoader often yields them
    try:
        return F.cross_entropy(out, targets.long())
    except (RuntimeError, ValueError, IndexError) as exc:
        raise XAIError(
            f"cross-entropy failed for output {tuple(out.shape)} and targets {tuple(targets.shape)}: "
            f"{exc}; pass class indices in [0, {out.shape[1]}) or a loss_fn"
        ) from exc


def _numpy(t: torch.Tensor, copy: bool) -> np.ndarray:
    """``t`` as numpy: shares memory on CPU when ``copy`` is False, else a private copy."""
    t = t.detach()
    fresh = False
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t, fresh = t.float(), True
    if t.device.type != "cpu":
        t, fresh = t.cpu(), True  # already a new host buffer; copying again would waste it
    arr = t.resolve_conj().resolve_neg().numpy()
    return arr.copy() if copy and not fresh else arr


def _unit_dims(
    captured: dict[str, torch.Tensor],
    order: Sequence[str],
    modules: dict[str, nn.Module],
) -> dict[str, int | None]:
    """Which dim holds the units of each output (``None``: one unit), by
    :func:`mlflow_xai.inspect.modules.unit_dim`, in the order the outputs were hooked."""
    dims: dict[str, int | None] = {}
    prev: tuple[torch.Size, int | None] | None = None
    for name in order:  # a module called twice: its later call (and output) wins
        t = captured[name]
        dims[name] = dim = unit_dim(t, modules[name], prev)
        prev = (t.shape, dim)
    return dims


def _unit_summary(t: torch.Tensor, dim: int | None, relu: bool) -> tuple[np.ndarray, float | None]:
    """Mean per unit over the batch (and positions), and the dead share for ReLUs."""
    if t.dim() == 0:  # a scalar output is one unit seen once
        t = t.reshape(1)
    reduce = tuple(d for d in range(t.dim()) if d != dim)
    # float64 accumulation: a unit's mean over a large batch keeps full precision.
    mean = t.mean(dim=reduce, dtype=torch.float64).reshape(-1)
    dead: float | None = None
    if relu:
        dead = float(dead_units(t, dim).double().mean().item())
    return mean.cpu().numpy(), dead


def _forward(model: nn.Module, args: tuple[torch.Tensor, ...], rec: Any, batch_size: int | None) -> Any:
    """The forward pass: at once, or chunk by chunk for a model that takes one batch size."""
    if batch_size is None or args[0].shape[0] == batch_size:
        rec.begin_pass()
        out = model(*args)
        rec.finish()
        return out
    outs = []
    for start in range(0, args[0].shape[0], batch_size):
        rec.begin_pass()
        out = first_tensor(model(*(a[start:start + batch_size] for a in args)))
        if out is None:
            raise XAIError(f"{type(model).__name__} returned no tensor; it cannot be run in chunks")
        outs.append(out)
    rec.finish()
    return torch.cat(outs, dim=0)


def _call_keys(name: str, present: Any) -> list[str]:
    """``name`` and its further calls ``name@1``, ``name@2`` ... that are in ``present``."""
    keys = [name] if name in present else []
    k = 1
    while f"{name}@{k}" in present:
        keys.append(f"{name}@{k}")
        k += 1
    return keys


def _ratio(grad_norm: float, weight_norm: float) -> float:
    # Undefined (NaN) for an all-zero weight: a zero-initialised layer getting its first
    # gradient is not "exploding", so no flag should fire on an infinite ratio.
    return grad_norm / weight_norm if weight_norm > 0 else math.nan


def explain(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor | np.ndarray | None = None,
    loss_fn: LossFn | None = None,
    *,
    layers: LayerSelection = None,
    bins: int = 50,
    copy: bool = True,
    per_call: bool = False,
    batch_size: int | None = None,
) -> Explanation:
    """Weights, activations and gradients of every layer of ``model`` on one batch.

    The model runs in eval mode (dropout off, BatchNorm on its running statistics);
    every module's training flag is restored afterwards, also on error. ``param.grad``
    is never touched: gradients come from ``torch.autograd.grad``.

    * weights: every selected module with a direct ``weight`` parameter (and ``bias``).
    * activations: the output of every selected leaf module, so the output after a
      ``ReLU`` is its own entry. ``mean_per_unit`` averages over the batch (and spatial
      positions: one value per channel for conv outputs); ``dead_share`` is the share of
      units <= 0 for every sample, for ``ReLU``/``ReLU6`` outputs only.
    * gradients (only with ``targets``): of the loss on the same forward pass, for every
      selected weight that requires grad and is used by the forward pass. The default
      loss is MSE for floating targets (reshaped to the output shape when the sizes
      agree) and cross-entropy for integer targets.

    Parameters not called ``weight``/``bias`` (``nn.LSTM``'s ``weight_ih_l0``, a
    ``cls_token``) are not covered; their names are listed in ``meta["uncovered_params"]``.

    Args:
        model: Any ``nn.Module``; it is left as it was.
        inputs: A batch (batch dimension first), or a tuple/list of tensors passed as
            positional arguments. Moved to the device of the model's first parameter.
        targets: Targets for the loss; ``None`` skips gradients.
        loss_fn: ``loss_fn(output, targets) -> scalar``; defaults to MSE/cross-entropy.
        layers: ``None`` (all), qualified module names, or ``(name, module) -> bool``.
        bins: Histogram bins.
        copy: ``True`` gives arrays of their own; ``False`` gives arrays that share memory
            with the weights, outputs and gradients where they live on the CPU, which
            keeps the peak memory of large networks near two copies of the weights.
        per_call: A module the forward pass calls several times gets one activation
            entry per call: ``name`` for the first, ``name@1``, ``name@2`` ... for the
            next (torch.export's naming). Off: the last call's output is kept.
        batch_size: The model only takes batches of exactly this size (a model exported
            with a fixed batch): the batch runs in chunks of that size, its rows cut to a
            multiple of it, and each layer's outputs are concatenated over the chunks.

    Returns:
        An :class:`Explanation` keyed by qualified module name, in
        ``model.named_modules()`` order.

    Raises:
        XAIError: Unknown layer names, inputs or targets the model cannot take, or a
            loss that is not a scalar.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> e = explain(net, torch.randn(8, 3), torch.randn(8))
        >>> list(e.weights), list(e.activations), list(e.gradients)
        (['0', '2'], ['0', '1', '2'], ['0', '2'])
    """
    device, dtype = _device_and_dtype(model)
    args = _prepare_inputs(inputs, device, dtype)
    tgt = None if targets is None else _to_tensor(targets, device, None, "targets")

    if isinstance(layers, Iterable) and not isinstance(layers, str):
        layers = list(layers)  # read twice below; a generator would be empty the second time

    weight_mods = [(n, m) for n, m in resolve_layers(model, layers, default=has_weight) if has_weight(m)]
    act_mods = resolve_layers(model, layers, default=is_leaf)
    all_names = [n for n, _ in model.named_modules()]
    mod_of = dict(model.named_modules())

    grad_params: list[tuple[str, str, torch.Tensor]] = []  # (layer, "weight"/"bias", param)
    if tgt is not None:
        for name, m in weight_mods:
            w = m._parameters["weight"]
            if w is not None and w.requires_grad:  # frozen weight: no gradient entry
                grad_params.append((name, "weight", w))
                b = m._parameters.get("bias")
                if isinstance(b, torch.Tensor) and b.requires_grad:
                    grad_params.append((name, "bias", b))

    loss_value: float | None = None
    grads: dict[tuple[str, str], torch.Tensor] = {}
    if batch_size is not None:
        if batch_size < 1:
            raise XAIError(f"batch_size {batch_size} is invalid; use 1 or more")
        usable = args[0].shape[0] - args[0].shape[0] % batch_size
        if usable == 0:
            raise XAIError(
                f"the model takes batches of exactly {batch_size} rows, but only "
                f"{args[0].shape[0]} were given; pass at least {batch_size}"
            )
        args = tuple(a[:usable] for a in args)
        tgt = None if tgt is None else tgt[:usable]
    with eval_mode(model), record_outputs(model, act_mods, per_call=per_call,
                                            chunked=batch_size is not None) as rec:
        with torch.enable_grad() if tgt is not None else torch.no_grad():
            try:
                output = _forward(model, args, rec, batch_size)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shapes = ", ".join(str(tuple(a.shape)) for a in args)
                raise XAIError(
                    f"the forward pass of {type(model).__name__} failed on inputs of shape "
                    f"{shapes}: {exc}; pass a batch the model accepts"
                ) from exc
            if tgt is not None:
                loss = (loss_fn or _default_loss)(output, tgt)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise XAIError(
                        "loss_fn must return a scalar tensor, got "
                        + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
                    )
                loss_value = float(loss.detach().item())
                if grad_params and loss.requires_grad:
                    got = torch.autograd.grad(loss, [p for _, _, p in grad_params], allow_unused=True)
                    grads = {(n, k): g for (n, k, _), g in zip(grad_params, got, strict=False) if g is not None}
                    del got  # `grads` alone owns them, so each is freed once summarized
                del loss
            del output
        captured, order = rec.outputs, rec.order
    del rec  # the dicts live on in `captured`, which releases each output once summarized

    # Weights.
    weights: dict[str, LayerWeights] = {}
    for name, m in weight_mods:
        w = m._parameters["weight"]
        if w is None:  # has_weight excluded this; the check narrows the type
            continue
        b = m._parameters.get("bias")
        w_stats, w_hist = stats_and_histogram(w, bins)
        weights[name] = LayerWeights(
            name=name,
            module_type=type(m).__name__,
            values=_numpy(w, copy),
            stats=w_stats,
            histogram=w_hist,
            bias=_numpy(b, copy) if isinstance(b, torch.Tensor) else None,
            bias_stats=tensor_stats(b) if isinstance(b, torch.Tensor) else None,
        )

    # Activations, in named_modules order; a module's further calls right after its first.
    entries = [(key, m) for name, m in act_mods for key in _call_keys(name, captured)]
    mod_of.update(entries)
    unit_dims = _unit_dims(captured, order, mod_of)
    activations: dict[str, LayerActivations] = {}
    for name, m in entries:
        t = captured.pop(name, None)  # pop: release each output once it is summarized
        if t is None:  # not called by this forward pass, or returned no tensor
            continue
        a_stats, a_hist = stats_and_histogram(t, bins)
        mean_per_unit, dead = _unit_summary(t, unit_dims[name], isinstance(m, RELU_FAMILY))
        activations[name] = LayerActivations(
            name=name,
            module_type=type(m).__name__,
            values=_numpy(t, copy),
            stats=a_stats,
            histogram=a_hist,
            mean_per_unit=mean_per_unit,
            dead_share=dead,
        )
        del t

    # Gradients.
    gradients: dict[str, LayerGradients] = {}
    for name, m in weight_mods:
        g = grads.pop((name, "weight"), None)
        if g is None:
            continue
        gb = grads.pop((name, "bias"), None)
        g_stats, g_hist = stats_and_histogram(g, bins)
        ratio = _ratio(g_stats.l2_norm, weights[name].stats.l2_norm)
        vanishing, exploding = gradient_flags(g_stats.l2_norm, ratio, g_stats.inf_count)
        gradients[name] = LayerGradients(
            name=name,
            module_type=type(m).__name__,
            values=_numpy(g, copy),
            stats=g_stats,
            histogram=g_hist,
            grad_to_weight_ratio=ratio,
            vanishing=vanishing,
            exploding=exploding,
            bias=_numpy(gb, copy) if gb is not None else None,
            bias_stats=tensor_stats(gb) if gb is not None else None,
        )
        del g, gb

    present = set(weights) | set(activations) | set(gradients)
    uncovered = tuple(n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] not in ("weight", "bias"))
    meta: dict[str, Any] = {
        "model_type": type(model).__name__,
        "layers": tuple(k for n in all_names for k in _call_keys(n, present)),
        "n_params": sum(p.numel() for p in model.parameters()),
        "uncovered_params": uncovered,
        "input_shapes": tuple(tuple(a.shape) for a in args),
        "device": str(device),
        "bins": bins,
    }
    return Explanation(
        weights=weights,
        activations=activations,
        gradients=gradients,
        diagnostics=diagnose(weights, activations, gradients, loss=loss_value),
        loss=loss_value,
        meta=meta,
    )
