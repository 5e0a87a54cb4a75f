"""``summary_dict``: the JSON-safe per-layer statistics written as ``summary.json``.

Schema (``schema_version`` 1; no raw values, only statistics)::

    {
      "schema_version": 1,
      "loss": float | null,               # the batch loss; null without targets
      "diagnostics": {
        "nan_count": int, "inf_count": int,
        "dead_unit_share": float | null,   # dead / all units of ReLU/ReLU6 outputs
        "max_grad_norm": float | null,     # largest weight-gradient L2 norm
        "vanishing_layers": [str], "exploding_layers": [str],
        "flags": [str],                    # one human-readable line per finding
        "thresholds": {"vanishing_grad_norm": float, "exploding_grad_norm": float,
                       "vanishing_ratio": float, "exploding_ratio": float,
                       "dead_share_flag": float}
      },
      "meta": {"model_type": str, "n_params": int, "uncovered_params": [str],
               "input_shapes": [[int]], "device": str, "bins": int, "layers": [str]},
      "layers": {                          # qualified module name -> entry, model order
        "<name>": {
          "module_type": str,              # e.g. "Linear", "ReLU", "Conv2d"
          "weight":     STATS + {"shape": [int]} | null,
          "bias":       STATS + {"shape": [int]} | null,
          "activation": STATS + {"shape": [int], "dead_share": float | null} | null,
          "gradient":   STATS + {"shape": [int], "grad_to_weight_ratio": float | null,
                                 "vanishing": bool, "exploding": bool,
                                 "bias": STATS + {"shape": [int]} | null} | null
        }
      }
    }

    STATS = {"numel": int, "mean": float|null, "std": float|null, "min": float|null,
             "max": float|null, "l2_norm": float|null, "near_zero_share": float|null,
             "nan_count": int, "inf_count": int}

Every non-finite float (a NaN mean of an all-NaN tensor, an undefined ratio) becomes
``null``, so ``json.dumps(..., allow_nan=False)`` always succeeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlflow_xai.inspect.diagnostics import thresholds
from mlflow_xai.inspect.results import Explanation, TensorStats

__all__ = ["SCHEMA_VERSION", "summary_dict", "json_safe"]

#: Bumped whenever a key is renamed or removed; adding keys keeps the version.
SCHEMA_VERSION = 1


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars made Python and NaN/Inf floats made ``None``.

    Example:
        >>> json_safe({"a": np.float32(1.5), "b": float("nan"), "c": (np.int64(2),)})
        {'a': 1.5, 'b': None, 'c': [2]}
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        # Only small metadata arrays get here; raw layer values never do.
        return json_safe(value.tolist())
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _block(stats: TensorStats | None, values: np.ndarray | None, **extra: Any) -> dict[str, Any] | None:
    if stats is None or values is None:
        return None
    return {**stats.to_dict(), "shape": list(values.shape), **extra}


def summary_dict(expl: Explanation) -> dict[str, Any]:
    """A JSON-safe summary of an :class:`Explanation`: statistics only, no raw values.

    See the module docstring for the schema.

    Args:
        expl: The result of :func:`~mlflow_xai.inspect.explain`.

    Returns:
        A dict that ``json.dumps(..., allow_nan=False)`` accepts.

    Example:
        >>> import torch
        >>> from mlflow_xai.inspect import explain
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> d = summary_dict(explain(net, torch.ones(3, 2), torch.zeros(3)))
        >>> sorted(d["layers"]["0"])
        ['activation', 'bias', 'gradient', 'module_type', 'weight']
    """
    order = list(expl.meta.get("layers", ()))
    for mapping in (expl.weights, expl.activations, expl.gradients):
        order += [n for n in mapping if n not in order]  # results built by hand lack meta

    layers: dict[str, Any] = {}
    for name in order:
        w = expl.weights.get(name)
        a = expl.activations.get(name)
        g = expl.gradients.get(name)
        module_type = next(x.module_type for x in (w, a, g) if x is not None)
        layers[name] = {
            "module_type": module_type,
            "weight": _block(w.stats, w.values) if w else None,
            "bias": _block(w.bias_stats, w.bias) if w else None,
            "activation": _block(a.stats, a.values, dead_share=a.dead_share) if a else None,
            "gradient": _block(
                g.stats,
                g.values,
                grad_to_weight_ratio=g.grad_to_weight_ratio,
                vanishing=g.vanishing,
                exploding=g.exploding,
                bias=_block(g.bias_stats, g.bias),
            )
            if g
            else None,
        }

    d = expl.diagnostics
    return json_safe(
        {
            "schema_version": SCHEMA_VERSION,
            "loss": expl.loss,
            "diagnostics": {
                "nan_count": d.nan_count,
                "inf_count": d.inf_count,
                "dead_unit_share": d.dead_unit_share,
                "max_grad_norm": d.max_grad_norm,
                "vanishing_layers": list(d.vanishing_layers),
                "exploding_layers": list(d.exploding_layers),
                "flags": list(d.flags),
                "thresholds": thresholds(),
            },
            "meta": dict(expl.meta),
            "layers": layers,
        }
    )
