"""Time the four attribution methods and the conductance of every hidden layer against one forward+backward pass.

The network has the spotpython cookbook's shape for ``n`` inputs and width ``l1``:
hidden sizes ``[2*l1*n, l1*n, 2*l1*n, l1*n, l1*n, ceil(l1/2)*n, ceil(l1/2)*n]``,
ReLU after each, then ``Linear(.., 1)``; the batch has 177 rows by default, the size
of the diabetes data's test part (``explain`` of a train run uses one batch, 16).
The ratio column says how many forward+backward passes a method costs: IG and
GradientShap should be near ``n_steps`` (50), DeepLift near 1-2, feature ablation
near ``n_features`` forward-only passes (so a few backward-free units), and the
conductance of all seven hidden layers (``conductances``, one integration path of
``n_steps + 1`` points) near 51, as one layer's would be; and ``IG + conductance``
(``path_attributions``, what ``explain`` runs: integrated gradients from the same walk's
input gradients) near the conductance row alone, where IG and conductance apart cost
the sum of their two rows.

Run: ``.venv/bin/python benchmarks/bench_attributions.py [--sizes 16,64,256] [--rows 177]
[--repeats 3] [--threads N]``
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from mlflow_xai.config import TunedConfig
from mlflow_xai.inspect.attributions import METHODS, attribute, conductances, path_attributions

N_FEATURES = 10


def cookbook_mlp(l1: int, n: int = N_FEATURES) -> nn.Sequential:
    # the cookbook's width rule, from the one place that defines it
    sizes = [n, *TunedConfig(l1=l1).hidden_layer_sizes(n)]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


def best_of_interleaved(
    fn: Callable[[], object], unit: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Best time of ``fn`` and of ``unit``, timed alternately.

    On a shared machine the load drifts; timing the method and its unit of cost
    side by side, and keeping the best of each, keeps the ratio honest.
    """
    fn(), unit()  # warm-up: captum import, allocator, kernels
    best_fn = best_unit = math.inf
    for _ in range(repeats):
        for _ in range(3):  # the unit is short: several tries per round
            start = time.perf_counter()
            unit()
            best_unit = min(best_unit, time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        best_fn = min(best_fn, time.perf_counter() - start)
    return best_fn, best_unit


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    # The unit of cost: what one training step's gradient costs on these rows.
    xi = x.clone().requires_grad_()
    model(xi).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256", help="cookbook l1 values (comma-separated)")
    parser.add_argument("--rows", type=int, default=177, help="rows in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    rows = args.rows
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}; "
        f"{rows} rows x {N_FEATURES} features, n_steps=50, best of {args.repeats}"
    )
    header = f"{'l1':>4} {'params':>11} {'method':<22} {'time [s]':>9} {'fwd+bwd [s]':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for l1 in [int(v) for v in args.sizes.split(",") if v.strip()]:
        model = cookbook_mlp(l1).eval()
        x = torch.randn(rows, N_FEATURES)
        params = sum(p.numel() for p in model.parameters())
        hidden = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
        runs: dict[str, Callable[[], object]] = {
            method: (lambda m=method: attribute(model, x, m, baselines="mean"))  # type: ignore[misc]  # noqa: B023
            for method in METHODS
        }
        runs[f"conductance x{len(hidden)}"] = lambda: conductances(model, x, hidden, baselines="mean")  # noqa: B023
        runs[f"IG + conductance x{len(hidden)}"] = (  # one walk, as explain runs them
            lambda: path_attributions(model, x, hidden, baselines="mean"))  # noqa: B023
        for label, run in runs.items():
            t, fb = best_of_interleaved(run, lambda: forward_backward(model, x), args.repeats)  # noqa: B023
            print(f"{l1:>4} {params:>11,} {label:<22} {t:>9.4f} {fb:>12.5f} {t / fb:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
