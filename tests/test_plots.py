"""Tests for mlflow_xai.plots: shapes, colour scales, downsampling, NaN safety."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from mlflow_xai.figures import layers as plots_mod
from mlflow_xai.figures.layers import (
    MAX_PIXELS,
    distribution_grid,
    heatmap,
    mean_activation_map,
)
from mlflow_xai.figures.style import figure_to_png
from mlflow_xai.inspect.results import Histogram, LayerActivations, LayerWeights, TensorStats

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


def test_heatmap_downsamples_large_matrix() -> None:
    # Speed is benchmarks/bench_explain.py's job; here: reduced, readable, valid.
    values = np.random.default_rng(0).standard_normal((5120, 2560)).astype(np.float32)
    fig = heatmap("layers.big", values)
    png = figure_to_png(fig)
    shown = _image_array(fig)
    assert shown.size <= MAX_PIXELS
    assert min(shown.shape) > 100  # reduced, not collapsed
    assert "block mean" in fig.axes[0].get_title()
    _assert_png(png)


@pytest.mark.parametrize("absolute", [False, True])
def test_block_mean_in_strips_equals_the_whole_matrix_at_once(
    monkeypatch: pytest.MonkeyPatch, absolute: bool
) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((103, 37)).astype(np.float32)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[5, 5], values[80, 30] = np.inf, -np.inf
    block = (4, 3)
    # Direct: pad to whole blocks with NaN, then nanmean each block.
    rows, cols = -(-103 // 4) * 4, -(-37 // 3) * 3
    padded = np.full((rows, cols), np.nan)
    padded[:103, :37] = np.abs(values) if absolute else values
    padded[~np.isfinite(padded)] = np.nan
    blocks = padded.reshape(rows // 4, 4, cols // 3, 3).transpose(0, 2, 1, 3).reshape(rows // 4, cols // 3, -1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(blocks, axis=2)
    monkeypatch.setattr(plots_mod, "STRIP_CELLS", 5 * 37)  # strips of 4 rows: 26 strips
    shown, nonfinite = plots_mod._block_mean(values, block, absolute=absolute)
    np.testing.assert_allclose(shown, expected, rtol=1e-6, equal_nan=True)
    assert nonfinite == int((~np.isfinite(values)).sum())


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
import pytest
import torch
from mlflow_xai.figures import attributions, compare, diagram, layers, style
from mlflow_xai.reports import explain
style.figure_to_png(layers.heatmap("x", np.eye(3)))
diagram.architecture_dot(torch.nn.Linear(2, 1), torch.zeros(1, 2))
explain.render_report({}, {}, title="t")
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def _assert_labels_fit(fig: Figure) -> None:
    """No axes' ink (tick labels, title, offset text) runs off the figure, into another
    axes' frame, or into another panel's ink. A colour bar is only checked against
    frames: its bounding box may share the empty corner above its image's frame.

    The layout is fixed in inches rather than computed from the labels, so this checks
    that the labels the formatters produce still fit.
    """
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    axes = fig.axes
    ink = [ax.get_tightbbox(renderer) for ax in axes]
    frame = [ax.get_window_extent(renderer) for ax in axes]
    is_colorbar = [ax.get_label() == "<colorbar>" for ax in axes]

    def overlap(a: Bbox, b: Bbox) -> bool:  # more than the width of a spine
        return min(a.x1, b.x1) - max(a.x0, b.x0) > 2 and min(a.y1, b.y1) - max(a.y0, b.y0) > 2

    for box in ink:
        assert box.x0 >= 0 and box.y0 >= 0, box
        assert box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, box
    for i in range(len(axes)):
        for j in range(len(axes)):
            if i == j:
                continue
            assert not overlap(ink[i], frame[j]), (i, j, ink[i], frame[j])
            if not (is_colorbar[i] or is_colorbar[j]):
                assert not overlap(ink[i], ink[j]), (i, j, ink[i], ink[j])


def test_distribution_grid_of_24_layers_renders_with_fixed_layout() -> None:
    layers = {f"layers.{i}": _weights(f"layers.{i}", nan_count=i % 3) for i in range(24)}
    fig = distribution_grid("activations", layers)
    assert [ax.get_title() for ax in fig.axes] == list(layers)
    assert len({ax.get_position().y0 for ax in fig.axes}) == 6  # 6 rows of 4
    # A layout engine measures every label and makes print_figure draw twice: the
    # largest cost of a many-panel figure, so the layout is fixed instead.
    assert fig.get_layout_engine() is None
    _assert_png(figure_to_png(fig))


def test_distribution_grid_labels_fit_for_large_and_tiny_values() -> None:
    big = Histogram(np.array([3_000_000, 2_500_000, 10]), np.array([-3e-5, -1e-5, 1e-5, 3e-5]))
    huge = Histogram(np.array([1, 250_000, 3]), np.array([5e8, 5.1e8, 5.2e8, 5.3e8]))
    layers = {
        "many.counts.tiny.values": LayerWeights("a", "Linear", np.zeros(2), _stats(), big),
        "huge.values": LayerWeights("b", "Linear", np.zeros(2), _stats(nan_count=3), huge),
        **{f"layers.{i}": _weights(f"layers.{i}") for i in range(4)},
    }
    for log_y in (False, True):
        _assert_labels_fit(distribution_grid("weights", layers, log_y=log_y))


def test_distribution_grid_count_labels_are_compact_and_ticks_in_view() -> None:
    big = Histogram(np.array([2_500, 25_000, 1_200_000]), np.array([0.0, 1.0, 2.0, 3.0]))
    ax = distribution_grid("w", {"fc": LayerWeights("fc", "Linear", np.zeros(2), _stats(), big)}).axes[0]
    formatter = ax.yaxis.get_major_formatter()
    assert [formatter(v) for v in (0.0, 800.0, 2_500.0, 25_000.0, 1_200_000.0)] == [
        "0",
        "800",
        "2.5k",
        "25k",
        "1.2M",
    ]
    for ticks, (lo, hi) in ((ax.get_xticks(), ax.get_xlim()), (ax.get_yticks(), ax.get_ylim())):
        assert len(ticks) >= 2
        assert all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks)


def test_mean_activation_map_shares_one_colour_bar_and_names_each_scale() -> None:
    rng = np.random.default_rng(2)
    acts = {f"layers.{i}": _activations(f"layers.{i}", rng.standard_normal(10 + 30 * i)) for i in range(24)}
    acts["layers.0"] = _activations("layers.0", np.array([-4.0, 0.0, 2.0]))
    fig = mean_activation_map(acts)
    strips = [ax for ax in fig.axes if ax.images]
    assert len(strips) == 24 and len(fig.axes) == 25  # one colour bar for all strips
    assert fig.get_layout_engine() is None
    assert strips[0].images[0].get_clim() == (-4.0, 4.0)
    assert "max |mean| 4" in strips[0].get_title(loc="left")
    assert all("max |mean|" in ax.get_title(loc="left") for ax in strips)
    _assert_labels_fit(fig)
    _assert_png(figure_to_png(fig))


def test_mean_activation_map_single_unit_and_empty_layers_fit() -> None:
    acts = {
        "one": _activations("one", np.array([0.5])),
        "empty": _activations("empty", np.zeros(0)),
        "wide.layer.with.a.long.name": _activations("w", np.linspace(-1e5, 3e5, 5120)),
    }
    fig = mean_activation_map(acts)
    assert "1 unit," in fig.axes[0].get_title(loc="left")
    _assert_labels_fit(fig)


def test_heatmap_labels_fit_for_any_shape_and_magnitude() -> None:
    rng = np.random.default_rng(3)
    cases = [
        np.full((2, 3), np.nan),
        rng.standard_normal(80) * 2e4,
        rng.standard_normal((16, 3, 5, 5)) * 1e-5,
        rng.standard_normal((5120, 10)),
        rng.standard_normal((600, 700)) * 123456.0,
    ]
    for values in cases:
        for absolute in (False, True):
            _assert_labels_fit(heatmap("layers.0 weight gradient", values, absolute=absolute))
