"""Tests for mlflow_xai.plots: shapes, colour scales, downsampling, NaN safety."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mlflow_xai.inspect.results import Histogram, LayerActivations, LayerWeights, TensorStats
from mlflow_xai.plots import (
    MAX_PIXELS,
    distribution_grid,
    figure_to_png,
    heatmap,
    mean_activation_map,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _stats(mean: float = 0.0, std: float = 1.0, nan_count: int = 0) -> TensorStats:
    return TensorStats(
        numel=4,
        mean=mean,
        std=std,
        min=-1.0,
        max=1.0,
        l2_norm=2.0,
        near_zero_share=0.0,
        nan_count=nan_count,
        inf_count=0,
    )


def _histogram() -> Histogram:
    return Histogram(counts=np.array([1, 3, 2, 0]), edges=np.array([-1.0, -0.5, 0.0, 0.5, 1.0]))


def _weights(name: str, nan_count: int = 0) -> LayerWeights:
    return LayerWeights(name, "Linear", np.zeros((2, 2)), _stats(nan_count=nan_count), _histogram())


def _activations(name: str, means: np.ndarray) -> LayerActivations:
    values = np.zeros((3, means.size))
    return LayerActivations(name, "ReLU", values, _stats(), _histogram(), mean_per_unit=means)


def _image_array(fig: Figure) -> np.ma.MaskedArray:
    """The cells the first image draws; NaN/Inf cells are masked."""
    return np.ma.asarray(fig.axes[0].images[0].get_array())


def _assert_png(data: bytes) -> None:
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000


def test_figure_to_png_returns_png_bytes() -> None:
    _assert_png(figure_to_png(heatmap("layers.0", np.arange(6.0).reshape(2, 3))))


def test_figure_to_png_dpi_scales_the_image() -> None:
    fig = heatmap("layers.0", np.eye(3))
    assert len(figure_to_png(fig, dpi=150)) > len(figure_to_png(fig, dpi=50))


def test_heatmap_draws_a_matrix_as_is() -> None:
    values = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(_image_array(heatmap("fc", values)), values)


def test_heatmap_reshapes_conv_kernel_to_out_by_in_times_kernel() -> None:
    kernel = np.arange(8 * 3 * 5 * 5, dtype=np.float64).reshape(8, 3, 5, 5)
    shown = _image_array(heatmap("conv", kernel))
    assert shown.shape == (8, 3 * 5 * 5)
    np.testing.assert_array_equal(shown[1], kernel[1].ravel())


def test_heatmap_draws_vector_as_one_row() -> None:
    assert _image_array(heatmap("bias", np.arange(7.0))).shape == (1, 7)


def test_heatmap_flattens_more_than_four_dims() -> None:
    assert _image_array(heatmap("x", np.ones((2, 3, 4, 5, 6)))).shape == (2, 3 * 4 * 5 * 6)


def test_heatmap_is_centred_on_zero() -> None:
    image = heatmap("fc", np.array([[-1.0, 3.0], [0.5, 2.0]])).axes[0].images[0]
    assert image.get_clim() == (-3.0, 3.0)


def test_heatmap_absolute_shows_magnitudes_from_zero() -> None:
    fig = heatmap("fc", np.array([[-4.0, 3.0], [0.5, -2.0]]), absolute=True)
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0.0, 4.0)
    np.testing.assert_array_equal(_image_array(fig), [[4.0, 3.0], [0.5, 2.0]])
    assert image.get_cmap().name != heatmap("fc", np.eye(2)).axes[0].images[0].get_cmap().name


def test_heatmap_downsamples_large_matrix_quickly() -> None:
    values = np.random.default_rng(0).standard_normal((5120, 2560)).astype(np.float32)
    start = time.perf_counter()
    fig = heatmap("layers.big", values)
    png = figure_to_png(fig)
    elapsed = time.perf_counter() - start
    shown = _image_array(fig)
    assert shown.size <= MAX_PIXELS
    assert min(shown.shape) > 100  # reduced, not collapsed
    assert "block mean" in fig.axes[0].get_title()
    _assert_png(png)
    assert elapsed < 1.0


def test_heatmap_block_mean_ignores_nan_and_keeps_all_nan_blocks_bad() -> None:
    values = np.ones((4, 4))
    values[0, 0] = np.nan
    values[2:, 2:] = np.nan
    shown = _image_array(heatmap("x", values, max_pixels=4))
    assert shown.shape == (2, 2)
    np.testing.assert_array_equal(np.ma.getdata(shown)[:, :1], [[1.0], [1.0]])
    assert np.ma.getmaskarray(shown)[1, 1]


def test_heatmap_renders_nan_and_inf() -> None:
    values = np.array([[np.nan, 1.0, -2.0], [np.inf, -np.inf, 0.5]])
    fig = heatmap("broken", values)
    image = fig.axes[0].images[0]
    assert image.get_clim() == (-2.0, 2.0)
    assert np.ma.getmaskarray(image.get_array()).sum() == 3
    assert "3 NaN/Inf" in fig.axes[0].get_title()
    _assert_png(figure_to_png(fig))


def test_heatmap_of_all_nan_and_empty_tensors_render() -> None:
    _assert_png(figure_to_png(heatmap("nan", np.full((3, 3), np.nan))))
    _assert_png(figure_to_png(heatmap("empty", np.zeros((0, 4)))))


def test_distribution_grid_single_layer() -> None:
    fig = distribution_grid("weights", {"layers.0": _weights("layers.0")})
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title() == "layers.0"
    _assert_png(figure_to_png(fig))


def test_distribution_grid_one_row() -> None:
    layers = {f"layers.{i}": _weights(f"layers.{i}") for i in range(3)}
    fig = distribution_grid("weights", layers)
    assert [ax.get_title() for ax in fig.axes] == list(layers)
    assert len({ax.get_position().y0 for ax in fig.axes}) == 1


def test_distribution_grid_wraps_after_four_columns() -> None:
    layers = {f"layers.{i}": _weights(f"layers.{i}") for i in range(6)}
    fig = distribution_grid("weights", layers)
    assert len(fig.axes) == 6  # the two unused panels of the 2x4 grid are removed
    _assert_png(figure_to_png(fig))


def test_distribution_grid_draws_precomputed_counts() -> None:
    fig = distribution_grid("weights", {"fc": _weights("fc")})
    patch = fig.axes[0].patches[0]
    heights = patch.get_path().vertices[:, 1]
    assert heights.max() == 3.0  # the largest precomputed count, not a re-estimate


def test_distribution_grid_annotates_stats_and_nan() -> None:
    fig = distribution_grid("weights", {"fc": _weights("fc", nan_count=2)})
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "mean 0" in texts and "std 1" in texts and "NaN 2" in texts


def test_distribution_grid_without_finite_values_and_log_scale() -> None:
    empty = LayerWeights(
        "fc", "Linear", np.full(2, np.nan), _stats(), Histogram(np.zeros(3), np.full(4, np.nan))
    )
    fig = distribution_grid("weights", {"fc": empty, "ok": _weights("ok")}, log_y=True)
    assert "no finite values" in fig.axes[0].texts[0].get_text()
    assert fig.axes[1].get_yscale() == "log"
    _assert_png(figure_to_png(fig))


def test_distribution_grid_empty_says_nothing_to_show() -> None:
    fig = distribution_grid("weights", {})
    assert "nothing to show" in fig.axes[0].texts[0].get_text()
    _assert_png(figure_to_png(fig))


def test_mean_activation_map_one_row_per_layer_of_any_width() -> None:
    rng = np.random.default_rng(1)
    widths = {"a": 70, "b": 140, "c": 10}
    acts = {name: _activations(name, rng.standard_normal(k)) for name, k in widths.items()}
    fig = mean_activation_map(acts)
    strips = [ax for ax in fig.axes if ax.images]
    assert [ax.images[0].get_array().shape for ax in strips] == [(1, 70), (1, 140), (1, 10)]
    for ax in strips:
        vmin, vmax = ax.images[0].get_clim()
        assert vmin == -vmax
    _assert_png(figure_to_png(fig))


def test_mean_activation_map_renders_nan_and_empty() -> None:
    means = np.array([0.0, np.nan, 2.0, np.inf])
    fig = mean_activation_map({"relu": _activations("relu", means)})
    assert "2 NaN/Inf" in fig.axes[0].get_title(loc="left")
    _assert_png(figure_to_png(fig))
    _assert_png(figure_to_png(mean_activation_map({})))


def test_figure_modules_never_import_pyplot() -> None:
    # A fresh interpreter: this test session may have imported pyplot elsewhere.
    code = """
import sys
import numpy as np
import torch
from mlflow_xai import diagram, plots, report
plots.figure_to_png(plots.heatmap("x", np.eye(3)))
diagram.architecture_dot(torch.nn.Linear(2, 1), torch.zeros(1, 2))
report.render_report({}, {}, title="t")
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
