"""Tests of mlflow_xai.monitor: the XAIMonitor callback in a plain user Trainer.

Real MLflow sqlite store in a temporary folder (one per module: creating the schema
costs about a second), tiny networks, a few epochs of a few batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlflow_xai import monitor as monitor_mod
from mlflow_xai.errors import XAIError
from mlflow_xai.monitor import (
    DEAD_SHARE_ALERT,
    XAIMonitor,
    XAIMonitorWarning,
    _chunks_by_step,
    _hist_rows,
)

WEIGHT_LAYERS = ["net.0", "net.2", "net.4"]
RELU_LAYERS = ["net.1", "net.3"]
ROWS, BATCH = 64, 16  # 4 batches per epoch


class TinyNet(L.LightningModule):
    """A user's own LightningModule: 4 -> 8 -> 8 -> 1 with ReLUs."""

    def __init__(self, lr: float = 1e-2, optimizer: str = "adam", bias: float | None = None,
                 nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        if bias is not None:  # every hidden unit negative for every input: dead ReLUs
            for layer in (self.net[0], self.net[2]):
                nn.init.constant_(layer.bias, bias)
                nn.init.uniform_(layer.weight, -0.01, 0.01)
        self.lr, self.optimizer, self.nan_at_step = lr, optimizer, nan_at_step
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.modes_seen.append(all(m.training for m in self.net.modules()))
        if self.global_step == self.nan_at_step:
            with torch.no_grad():
                self.net[2].weight[0, 0] = float("nan")
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * torch.randn(ROWS, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def trainer(monitor: XAIMonitor, epochs: int = 3, logger: object = False, **kw: object) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(tracking URI, experiment id, artifact root) of one sqlite store for the module."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    # An explicit artifact location: the default would be ./mlruns in the working dir.
    exp_id = MlflowClient(uri).create_experiment("monitor", artifact_location=str(root / "artifacts"))
    return uri, exp_id, str(root / "artifacts")


@pytest.fixture()
def uri(store: tuple[str, str, str]) -> str:
    return store[0]


@pytest.fixture()
def exp_id(store: tuple[str, str, str]) -> str:
    return store[1]


@pytest.fixture()
def client(store: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    uri, exp_id, _ = store
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # whatever Lightning writes by default lands here
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=exp_id)
    yield MlflowClient(uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()


def fit_in_run(model: TinyNet, monitor: XAIMonitor, **kw: object) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with mlflow.start_run() as run:
            trainer(monitor, **kw).fit(model, loader())
    return run.info.run_id


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def alert_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith("mlflow_xai.alert.")}


# ----------------------------------------------------------------- metrics


def test_metrics_per_layer_at_several_steps(client: MlflowClient) -> None:
    model = TinyNet()
    initial = {n: model.get_submodule(n).weight.detach().norm().item() for n in WEIGHT_LAYERS}
    run_id = fit_in_run(model, XAIMonitor(log_every_n_steps=5, histogram_every_n_epochs=0))

    # Steps 0, 5, 10 (every 5) and 3, 7, 11 (each epoch's last batch) are measured.
    measured = [0, 3, 5, 7, 10, 11]
    for name in WEIGHT_LAYERS:
        assert sorted(steps(client, run_id, f"grad_norm/{name}")) == measured
        assert sorted(steps(client, run_id, f"update_ratio/{name}")) == measured
        assert sorted(steps(client, run_id, f"weight_norm/{name}")) == measured  # once per step
        first = client.get_metric_history(run_id, f"weight_norm/{name}")
        at0 = next(m.value for m in first if m.step == 0)
        assert at0 == pytest.approx(initial[name], rel=1e-6)  # the weight before the first step
        ratios = [m.value for m in client.get_metric_history(run_id, f"update_ratio/{name}")]
        assert all(0 < r < 1 for r in ratios)
    # Activations: the outputs of the activation modules (not the pre-activations).
    for name in RELU_LAYERS:
        assert sorted(steps(client, run_id, f"act_mean/{name}")) == [4, 8, 12]
        assert sorted(steps(client, run_id, f"act_std/{name}")) == [4, 8, 12]
        shares = [m.value for m in client.get_metric_history(run_id, f"dead_share/{name}")]
        assert len(shares) == 3 and all(0 <= s <= 1 for s in shares)
    metric_keys = set(client.get_run(run_id).data.metrics)
    assert not {f"act_mean/{n}" for n in WEIGHT_LAYERS} & metric_keys
    assert not any(k.startswith("alert/") for k in metric_keys)


def test_activation_statistics_match_a_direct_forward(client: MlflowClient) -> None:
    model = TinyNet()
    batch = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    run_id = fit_in_run(model, XAIMonitor(monitor_batch=batch, histogram_every_n_epochs=0), epochs=1)
    with torch.no_grad():
        h = model.net[1](model.net[0](batch))
    hist = client.get_metric_history(run_id, "act_mean/net.1")
    assert [m.step for m in hist] == [4]
    assert hist[0].value == pytest.approx(h.mean().item(), rel=1e-5)
    std = client.get_metric_history(run_id, "act_std/net.1")[0].value
    assert std == pytest.approx(h.std(unbiased=False).item(), rel=1e-5)
    dead = client.get_metric_history(run_id, "dead_share/net.1")[0].value
    assert dead == pytest.approx((h.amax(dim=0) <= 0).float().mean().item())


def test_dead_share_counts_the_same_units_as_explain_on_a_sequence(client: MlflowClient) -> None:
    """(N, T, D) outputs: units are the D features (one rule, inspect.modules.unit_dim), not the T positions."""
    from mlflow_xai import explain

    class Sequence(TinyNet):
        def __init__(self) -> None:
            super().__init__(lr=0.0)  # the weights the monitor measured are the ones explained below
            self.net = nn.Sequential(nn.Linear(2, 8), nn.RMSNorm(8), nn.ReLU(), nn.Linear(8, 1))
            with torch.no_grad():  # units 0-3 negative for every input: dead behind the ReLU
                self.net[0].weight[:4] = 0.0
                self.net[0].bias[:4] = -1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.view(-1, 2, 2)).mean(dim=1)  # two positions of two features each

    model = Sequence()
    batch = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    run_id = fit_in_run(model, XAIMonitor(monitor_batch=batch, histogram_every_n_epochs=0), epochs=1)
    monitored = client.get_metric_history(run_id, "dead_share/net.2")[0].value
    explained = explain(model, batch).activations["net.2"].dead_share
    assert explained >= 0.5 and monitored == pytest.approx(explained)  # units 0-3 at least


def test_the_monitor_and_explain_give_the_same_numbers_on_the_same_batch(client: MlflowClient, tmp_path: Path) -> None:
    """One measurement core: dead share, activation moments, histogram counts and weight
    norms of a layer are the same while training and in explain, for the same weights and batch."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    from mlflow_xai import explain

    model = TinyNet(lr=0.0, optimizer="sgd")  # the weights do not move: explain sees the monitor's
    with torch.no_grad():  # units 0-2 of the first hidden layer negative for every input: dead
        model.net[0].weight[:3] = 0.0
        model.net[0].bias[:3] = -1.0
    batch = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    run_id = fit_in_run(model, XAIMonitor(monitor_batch=batch, histogram_every_n_epochs=1), epochs=1, logger=tb)
    expl = explain(model, batch, bins=monitor_mod.HISTOGRAM_BINS)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={HISTOGRAMS: 0})
    events.Reload()

    def logged(key: str) -> float:
        return client.get_metric_history(run_id, key)[-1].value

    for name in RELU_LAYERS:
        a = expl.activations[name]
        assert logged(f"dead_share/{name}") == a.dead_share
        assert logged(f"act_mean/{name}") == pytest.approx(a.stats.mean, rel=1e-9, abs=1e-12)
        assert logged(f"act_std/{name}") == pytest.approx(a.stats.std, rel=1e-9)
        counts = events.Histograms(f"activations/{name}")[-1].histogram_value.bucket
        assert list(counts) == a.histogram.counts.tolist()
    assert logged("dead_share/net.1") == 3 / 8
    for name in WEIGHT_LAYERS:
        w = expl.weights[name]
        assert logged(f"weight_norm/{name}") == pytest.approx(w.stats.l2_norm, rel=1e-6)
        counts = events.Histograms(f"weights/{name}")[-1].histogram_value.bucket
        assert list(counts) == w.histogram.counts.tolist()


def test_functional_activations_fall_back_to_the_layer_outputs(client: MlflowClient) -> None:
    class Functional(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.net[1] = self.net[3] = nn.Identity()  # the activations are functional

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.net[0](x))
            return self.net[4](torch.relu(self.net[2](h)))

    run_id = fit_in_run(Functional(), XAIMonitor(histogram_every_n_epochs=0), epochs=1)
    keys = set(client.get_run(run_id).data.metrics)
    assert {f"act_mean/{n}" for n in WEIGHT_LAYERS} <= keys


def test_inplace_relu_does_not_change_the_recorded_pre_activation(client: MlflowClient) -> None:
    model = TinyNet()
    model.net[1] = nn.ReLU(inplace=True)
    batch = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    monitor = XAIMonitor(monitor_batch=batch, layers=["net.0", "net.1"], histogram_every_n_epochs=0)
    run_id = fit_in_run(model, monitor, epochs=1)
    with torch.no_grad():
        pre = model.net[0](batch)
    logged = client.get_metric_history(run_id, "act_mean/net.0")[0].value
    assert logged == pytest.approx(pre.mean().item(), rel=1e-5)  # negative values included
    assert logged < client.get_metric_history(run_id, "act_mean/net.1")[0].value


def test_one_log_batch_call_per_flush_and_no_per_metric_calls(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []
    real = MlflowClient.log_batch

    def spy(self: MlflowClient, run_id: str, metrics=(), *a: object, **kw: object) -> None:  # type: ignore[no-untyped-def]
        calls.append([m.step for m in metrics])
        return real(self, run_id, metrics, *a, **kw)

    def refuse(*a: object, **kw: object) -> None:
        raise AssertionError("per-metric call")

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    monkeypatch.setattr(MlflowClient, "log_metric", refuse)
    run_id = fit_in_run(TinyNet(), XAIMonitor(log_every_n_steps=1, histogram_every_n_epochs=0))
    assert 1 <= len(calls) <= 3  # buffered: a 1-second training is flushed at its end
    # However often the buffer goes out, an epoch end's rows wait for the next batch's
    # measurement of the same step: every call still carries whole steps.
    monkeypatch.setattr(monitor_mod.sinks, "FLUSH_EVERY_S", 0.0)
    calls.clear()
    fit_in_run(TinyNet(), XAIMonitor(log_every_n_steps=1, histogram_every_n_epochs=0))
    assert len(calls) > 3
    with pytest.raises(AssertionError, match="per-metric call"):  # the refusal above was reachable
        mlflow.log_metric("probe", 1.0, run_id=run_id)
    seen: set[int] = set()
    for call in calls:  # a step's metrics never straddle two calls
        assert not seen & set(call)
        seen |= set(call)


# ------------------------------------------------------------------- images


def test_histogram_images_step_through_epochs(client: MlflowClient) -> None:
    run_id = fit_in_run(TinyNet(), XAIMonitor(histogram_every_n_epochs=1))
    files = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    for key in ("xai_weights", "xai_gradients", "xai_activations"):
        # MLflow 3 stores log_image(key=..., step=...) as
        # images/<key>+step+<step>+timestamp+<ms>+<uuid>.png plus a "+compressed.webp".
        pngs = [f for f in files if f.startswith(f"{key}+step+") and f.endswith(".png")]
        assert sorted(int(f.split("+")[2]) for f in pngs) == [0, 1, 2]
        assert any(f.startswith(f"{key}+step+1+") and f.endswith("+compressed.webp") for f in files)
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"
    from PIL import Image

    local = client.download_artifacts(run_id, f"images/{next(f for f in files if f.endswith('.png'))}")
    with Image.open(local) as im:
        # A palette PNG that still shows the bars in their colour (#4c72b0) on white.
        assert im.mode == "P" and im.width > 100 and im.height > 50
        colours = {rgb for _, rgb in im.convert("RGB").getcolors(maxcolors=256)}
    assert {(255, 255, 255), (76, 114, 176)} <= colours


def test_stored_images_keep_the_drawing_colours() -> None:
    from mlflow_xai.monitor import _paletted, _render_grid

    rows = np.zeros((3, monitor_mod.HISTOGRAM_BINS + 6))
    rows[:, : monitor_mod.HISTOGRAM_BINS] = np.arange(monitor_mod.HISTOGRAM_BINS) % 7
    rows[:, -6:] = [-1.0, 2.0, 100.0, 0.0, 0.0, 100.0]  # lo, hi, finite, sum, sum sq, numel
    rows[2, -1] = 103.0  # three NaN/Inf: the label goes magenta
    drawn = _render_grid("weights - epoch 0, step 0", ["a", "b", "c"], rows)
    stored = _paletted(drawn)
    assert stored.mode == "P"
    rgb, back = np.asarray(drawn).astype(int), np.asarray(stored.convert("RGB")).astype(int)
    flat = (rgb == back).all(axis=2)
    assert flat.mean() > 0.97  # paper, bars, lines: exact
    assert np.abs(rgb - back).max() <= 24  # antialiased edges: within a few levels


def test_histogram_every_n_epochs_picks_epochs_and_the_last(client: MlflowClient) -> None:
    run_id = fit_in_run(TinyNet(), XAIMonitor(histogram_every_n_epochs=2), epochs=4)
    files = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    weights = sorted(int(f.split("+")[2]) for f in files if f.startswith("xai_weights+") and f.endswith(".png"))
    assert weights == [0, 2, 3]


def test_tensorboard_gets_the_same_histograms(client: MlflowClient, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    fit_in_run(TinyNet(), XAIMonitor(histogram_every_n_epochs=1), logger=tb)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    tags = set(acc.Tags()[HISTOGRAMS])
    expected = {f"weights/{n}" for n in WEIGHT_LAYERS} | {f"gradients/{n}" for n in WEIGHT_LAYERS}
    expected |= {f"activations/{n}" for n in RELU_LAYERS}
    assert expected <= tags
    events = acc.Histograms("weights/net.0")
    assert [e.step for e in events] == [4, 8, 12]
    assert events[0].histogram_value.num == 8 * 4  # every weight of Linear(4, 8) binned


def test_hist_rows_bins_finite_values_on_the_device() -> None:
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan"), float("inf")])
    row = _hist_rows([t], bins=3)[0]
    np.testing.assert_array_equal(row[:3], [1, 1, 2])  # [0,1) [1,2) [2,3]
    lo, hi, n, total, squares, numel = row[3:]
    assert (lo, hi, n, total, squares, numel) == (0, 3, 4, 6, 14, 6)


# ------------------------------------------------------------------- alerts


def test_exploding_learning_rate_raises_the_exploding_alert(client: MlflowClient) -> None:
    with pytest.warns(XAIMonitorWarning, match="exploding_gradients"):
        run_id = fit_in_run(TinyNet(lr=1e3, optimizer="sgd"), XAIMonitor(log_every_n_steps=1))
    tags = alert_tags(client, run_id)
    assert tags["mlflow_xai.alert.exploding_gradients"] == "true"
    assert tags["mlflow_xai.alert.exploding_gradients.first_layer"] in WEIGHT_LAYERS
    assert steps(client, run_id, "alert/exploding_gradients")
    found = mlflow.search_runs(
        filter_string="tags.`mlflow_xai.alert.exploding_gradients` = 'true'", output_format="list"
    )
    assert run_id in {r.info.run_id for r in found}


def test_negative_biases_behind_relu_raise_the_dead_unit_alert(client: MlflowClient) -> None:
    with pytest.warns(XAIMonitorWarning, match="dead_units"):
        run_id = fit_in_run(TinyNet(bias=-10.0), XAIMonitor())
    tags = alert_tags(client, run_id)
    assert tags["mlflow_xai.alert.dead_units"] == "true"
    assert tags["mlflow_xai.alert.dead_units.first_layer"] == "net.1"
    shares = client.get_metric_history(run_id, "dead_share/net.1")
    assert shares and all(m.value >= DEAD_SHARE_ALERT for m in shares)
    # Nothing flows back through dead ReLUs: the first layer's gradient is exactly 0.
    assert tags["mlflow_xai.alert.vanishing_gradients.first_layer"] == "net.0"


def test_nan_alert_names_the_layer_that_went_non_finite_first(client: MlflowClient) -> None:
    with pytest.warns(XAIMonitorWarning, match="nan"):
        run_id = fit_in_run(TinyNet(nan_at_step=5), XAIMonitor(log_every_n_steps=1), epochs=2)
    tags = alert_tags(client, run_id)
    assert tags["mlflow_xai.alert.nan"] == "true"
    # net.2's weight went NaN at step 5; net.0's gradient is NaN there too (backprop through
    # net.2), but a non-finite weight ranks before a gradient derived from it.
    assert tags["mlflow_xai.alert.nan.first_layer"] == "net.2"
    assert tags["mlflow_xai.alert.nan.first_step"] == "5"
    assert steps(client, run_id, "alert/nan")[0] == 5


def test_healthy_network_raises_no_alert(client: MlflowClient) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = fit_in_run(TinyNet(), XAIMonitor(log_every_n_steps=1), epochs=4)
    assert not [w for w in caught if issubclass(w.category, XAIMonitorWarning)]
    assert alert_tags(client, run_id) == {}
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("alert/")]


def test_quiet_logs_alerts_without_printing(client: MlflowClient) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = fit_in_run(TinyNet(bias=-10.0), XAIMonitor(quiet=True), epochs=1)
    assert not [w for w in caught if issubclass(w.category, XAIMonitorWarning)]
    assert alert_tags(client, run_id)["mlflow_xai.alert.dead_units"] == "true"


# ------------------------------------------------------- the user's Trainer


def test_training_modes_restored_and_no_hook_left(client: MlflowClient) -> None:
    model = TinyNet()
    fit_in_run(model, XAIMonitor(log_every_n_steps=1), epochs=3)
    assert model.modes_seen and all(model.modes_seen)  # eval only during the monitor's pass
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_a_module_frozen_in_eval_mode_stays_in_eval_mode(client: MlflowClient) -> None:
    model = TinyNet()

    class Freeze(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            pl_module.net[0].eval()

    monitor = XAIMonitor(histogram_every_n_epochs=0)
    with mlflow.start_run():
        L.Trainer(max_epochs=2, logger=False, callbacks=[Freeze(), monitor], enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, loader())
    assert model.net[0].training is False and model.net[2].training is True


def test_explicit_run_id_without_an_active_run(client: MlflowClient, uri: str, exp_id: str) -> None:
    run_id = client.create_run(exp_id).info.run_id
    assert mlflow.active_run() is None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        trainer(XAIMonitor(run_id=run_id, tracking_uri=uri, histogram_every_n_epochs=0)).fit(TinyNet(), loader())
    assert steps(client, run_id, "grad_norm/net.0")


def test_logs_into_the_mlflowlogger_run(client: MlflowClient, uri: str, tmp_path: Path) -> None:
    logger = MLFlowLogger(experiment_name="monitor-logger", tracking_uri=uri,
                          artifact_location=str(tmp_path / "artifacts"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        trainer(XAIMonitor(histogram_every_n_epochs=0), logger=logger).fit(TinyNet(), loader())
    assert steps(client, logger.run_id, "weight_norm/net.0")


def test_no_run_is_a_clear_error(client: MlflowClient) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(XAIError, match="no MLflow run to log to"):
        trainer(XAIMonitor()).fit(TinyNet(), loader())


def test_unknown_run_and_bad_arguments_are_clear_errors(client: MlflowClient, uri: str) -> None:
    with pytest.raises(XAIError, match="cannot use run_id 'nope'"):
        trainer(XAIMonitor(run_id="nope", tracking_uri=uri)).fit(TinyNet(), loader())
    with pytest.raises(XAIError, match="unknown layer 'net.9'"):
        with mlflow.start_run():
            trainer(XAIMonitor(layers=["net.9"])).fit(TinyNet(), loader())
    with pytest.raises(XAIError, match="log_every_n_steps"):
        XAIMonitor(log_every_n_steps=0)


def test_layer_selection_by_name(client: MlflowClient) -> None:
    run_id = fit_in_run(TinyNet(), XAIMonitor(layers=["net.2", "net.3"], histogram_every_n_epochs=0), epochs=1)
    keys = set(client.get_run(run_id).data.metrics)
    assert {k.split("/", 1)[1] for k in keys} == {"net.2", "net.3"}


def test_module_names_layers_as_the_network_does(client: MlflowClient) -> None:
    # mlflow-xai train watches XAIModule.net this way: 'layers.0' as explain names it.
    monitor = XAIMonitor(module="net", histogram_every_n_epochs=1)
    run_id = fit_in_run(TinyNet(), monitor, epochs=1)
    keys = set(client.get_run(run_id).data.metrics)
    assert {k.split("/", 1)[1] for k in keys if not k.startswith("alert/")} == {"0", "1", "2", "3", "4"}
    assert "grad_norm/0" in keys and "dead_share/1" in keys
    with pytest.raises(XAIError, match=r"module='body'\): TinyNet has no such submodule; .* 'net'"):
        with mlflow.start_run():
            trainer(XAIMonitor(module="body")).fit(TinyNet(), loader())
    with pytest.raises(XAIError, match="module must be"):
        XAIMonitor(module="")


def test_chunks_never_split_a_step() -> None:
    from mlflow.entities import Metric

    metrics = [Metric(f"m{i}", 0.0, 0, step) for step in range(5) for i in range(4)]
    chunks = _chunks_by_step(metrics, limit=10)
    assert [len(c) for c in chunks] == [8, 8, 4]
    assert [m for c in chunks for m in c] == metrics
    big = [Metric(f"m{i}", 0.0, 0, 0) for i in range(25)]
    assert [len(c) for c in _chunks_by_step(big, limit=10)] == [10, 10, 5]


# ---------------------------------------------------------------------- DDP


@pytest.mark.slow  # ~40 s on 2 CPU cores: each spawned rank imports torch, Lightning, MLflow
def test_ddp_two_cpu_processes_log_once(client: MlflowClient, uri: str, exp_id: str) -> None:
    run_id = client.create_run(exp_id).info.run_id
    # The default budget: rank 0 decides which steps and epochs are measured, every rank follows.
    monitor = XAIMonitor(run_id=run_id, tracking_uri=uri, histogram_every_n_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        L.Trainer(
            max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
            callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(TinyNet(), loader())
    # 64 rows over 2 ranks of 16-row batches: 2 steps per epoch; the first step measured,
    # the others as rank 0's budget says.
    for name in WEIGHT_LAYERS:
        measured = steps(client, run_id, f"grad_norm/{name}")
        assert measured[0] == 0 and len(measured) == len(set(measured))  # once per step, not twice
    ends = steps(client, run_id, "act_mean/net.1")
    assert ends == [2, 4, 6]  # images every epoch (given): their epochs are measured
    files = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    assert len([f for f in files if f.startswith("xai_weights+") and f.endswith(".png")]) == 3
    assert all(math.isfinite(m.value) for m in client.get_metric_history(run_id, "dead_share/net.1"))


# ------------------------------------------------------------- edge cases


def test_a_last_snapshot_when_training_stops_early(client: MlflowClient) -> None:
    class StopAfterEpoch1(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    monitor = XAIMonitor(histogram_every_n_epochs=4)
    with mlflow.start_run() as run:
        L.Trainer(max_epochs=10, logger=False, callbacks=[monitor, StopAfterEpoch1()],
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(TinyNet(), loader())
    files = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "images")]
    for key in ("xai_weights", "xai_gradients", "xai_activations"):
        epochs = sorted(int(f.split("+")[2]) for f in files if f.startswith(f"{key}+") and f.endswith(".png"))
        assert epochs == [0, 1], key


def test_the_last_snapshot_has_gradients_after_a_validation_loop(client: MlflowClient) -> None:
    # Lightning sets .grad to None before each validation (on_validation_model_zero_grad),
    # so after early stopping the final step's gradients are no longer on the parameters.
    class WithValidation(TinyNet):
        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    class StopAfterEpoch2(L.Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 2:
                trainer.should_stop = True

    monitor = XAIMonitor(histogram_every_n_epochs=5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with mlflow.start_run() as run:
            L.Trainer(max_epochs=10, logger=False, callbacks=[monitor, StopAfterEpoch2()],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0).fit(WithValidation(), loader(), loader(1))
    files = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "images")]
    for key in ("xai_weights", "xai_gradients", "xai_activations"):
        epochs = sorted(int(f.split("+")[2]) for f in files if f.startswith(f"{key}+") and f.endswith(".png"))
        assert epochs == [0, 2], key
    assert monitor._last_grads == []  # nothing kept after the fit


def _image_epochs(client: MlflowClient, run_id: str) -> list[int]:
    files = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    return sorted(int(f.split("+")[2]) for f in files if f.startswith("xai_weights+") and f.endswith(".png"))


@pytest.mark.parametrize(("share", "expected"), [(1e9, [0, 1, 2, 3]), (1e-9, [])])
def test_default_histograms_are_spaced_by_their_cost(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch, share: float, expected: list[int]
) -> None:
    # Default cadence: images as often as their share of the budget allows (a huge budget:
    # every epoch of a 4-epoch fit; a tiny one: none, not even the first and the last).
    for kind in ("step", "epoch", "images"):
        monkeypatch.setitem(monitor_mod.schedule.SHARES, kind, share)
    run_id = fit_in_run(TinyNet(), XAIMonitor(), epochs=4)
    assert _image_epochs(client, run_id) == expected


# ------------------------------------------------------------------- budget


def simulate(steps_per_epoch: int, epochs: int, step_s: float, cost_s: float, share: float) -> tuple[list[int], float, float]:
    """A fit on a fake clock: each step takes ``step_s``, each step measurement ``cost_s`` more.
    Returns the measured steps, the seconds they cost and the fit's elapsed seconds."""
    clock = spent = 0.0
    due, measured = 0, []
    for step in range(steps_per_epoch * epochs):
        clock += step_s
        last = (step + 1) % steps_per_epoch == 0
        if monitor_mod.schedule.step_due(step, every=None, last_batch=last, due=due):
            measured.append(step)
            clock += cost_s
            spent += cost_s
            due = monitor_mod.schedule.next_due(step + 1, spent, cost_s, clock, share=share)
    return measured, spent, clock


@pytest.mark.parametrize(("steps_per_epoch", "epochs"), [(1, 2000), (14, 150), (2000, 1)])
@pytest.mark.parametrize("cost_s", [1e-4, 1e-3, 2e-2])
def test_the_step_budget_holds_for_any_epoch_length(steps_per_epoch: int, epochs: int, cost_s: float) -> None:
    share, step_s = 0.01, 2e-3
    measured, spent, elapsed = simulate(steps_per_epoch, epochs, step_s, cost_s, share)
    assert measured[0] == 0  # the first step: nothing spent yet
    assert spent <= share * elapsed + cost_s  # within the share, give or take the first one
    # ... and it settles where the cost fits, not far below: the share is used.
    assert spent >= 0.5 * share * elapsed or len(measured) == steps_per_epoch * epochs


def test_next_due_waits_for_the_fit_to_earn_the_next_measurement() -> None:
    next_due = monitor_mod.schedule.next_due
    assert next_due(10, spent=0.0, cost=0.001, elapsed=1.0, share=0.01) == 10  # affordable now
    # 0.02 s spent + 0.01 s next need 3 s of fit; 1 s per 10 steps so far: 20 more steps.
    assert next_due(10, spent=0.02, cost=0.01, elapsed=1.0, share=0.01) == 30
    assert next_due(0, spent=1.0, cost=1.0, elapsed=0.0, share=0.01) == 0  # nothing known yet


def test_first_and_last_epoch_ends_are_always_measured() -> None:
    epoch_due = monitor_mod.schedule.epoch_due
    never = 10**9  # a budget that affords nothing
    assert [e for e in range(5) if epoch_due(e, explicit=False, last=e == 4, images=False, due=never)] == [0, 4]
    assert [e for e in range(5) if epoch_due(e, explicit=True, last=e == 4, images=False, due=never)] == [0, 1, 2, 3, 4]
    # An epoch whose images are due (histogram_every_n_epochs=2) is measured for them.
    assert [e for e in range(5) if epoch_due(e, explicit=False, last=e == 4, images=e % 2 == 0, due=never)] == [0, 2, 4]


def test_images_are_taken_when_their_cost_fits() -> None:
    images_due = monitor_mod.schedule.images_due
    kw = {"every": None, "last": False, "last_logged": 0, "spacing": 2, "share": 0.01}
    assert not images_due(1, spent=0.1, cost=0.1, elapsed=1000.0, **kw)  # too soon: spacing
    assert images_due(2, spent=0.1, cost=0.1, elapsed=20.0, **kw)  # 0.2 s <= 1% of 20 s
    assert not images_due(2, spent=0.1, cost=0.1, elapsed=19.0, **kw)
    assert images_due(3, every=2, last=True, last_logged=2, spacing=9, spent=1e9, cost=1e9, elapsed=1.0)  # given K: exact
    assert not images_due(2, every=0, last=True, last_logged=-1, spacing=1, spent=0.0, cost=0.0, elapsed=1e9)


@pytest.mark.parametrize("on_device", [True, None])
def test_a_nonfinite_loss_is_named_at_its_first_step(on_device: bool | None) -> None:
    from mlflow_xai.monitor.measure import NonFiniteWatch

    watch = NonFiniteWatch(on_device=on_device)  # True: the accelerator path (no sync per step), on CPU
    for step in range(5):
        watch.update(torch.tensor(1.0), step)
    assert watch.first_step() is None
    for step, loss in ((5, 1.0), (6, math.inf), (7, math.nan)):
        watch.update(torch.tensor(loss), step)
    assert watch.first_step() == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_loss_watch_never_syncs_and_the_histograms_are_explains() -> None:
    from mlflow_xai.inspect.stats import histogram
    from mlflow_xai.monitor.measure import NonFiniteWatch

    watch = NonFiniteWatch()
    losses = [torch.tensor(v, device="cuda") for v in (1.0, 2.0, math.nan, math.inf)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for step, loss in enumerate(losses):
            watch.update(loss, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert watch.first_step() == 2
    big = torch.randn(4200, 4200, device="cuda")  # more than one of explain's CUDA chunks
    big[0, 0], big[1, 1] = math.nan, math.inf
    np.testing.assert_array_equal(_hist_rows([big], bins=40)[0, :40], histogram(big, bins=40).counts)


def test_given_frequencies_are_obeyed_exactly_and_defaults_measure_the_first_and_last_epoch(
    client: MlflowClient,
) -> None:
    run_id = fit_in_run(TinyNet(), XAIMonitor(log_every_n_steps=3, histogram_every_n_epochs=2), epochs=5)
    # 4 steps an epoch: every third step and each epoch's last (3, 7, 11, ...).
    expected = sorted({s for s in range(20) if s % 3 == 0} | {3, 7, 11, 15, 19})
    assert steps(client, run_id, "grad_norm/net.0") == expected
    assert steps(client, run_id, "act_mean/net.1") == [4, 8, 12, 16, 20]  # every epoch end
    assert _image_epochs(client, run_id) == [0, 2, 4]
    run_id = fit_in_run(TinyNet(), XAIMonitor(), epochs=5)
    ends = steps(client, run_id, "act_mean/net.1")
    assert ends[0] == 4 and ends[-1] == 20  # the first and the last epoch's ends
    assert steps(client, run_id, "grad_norm/net.0")[0] == 0  # the first step


def test_a_nan_loss_between_measurements_is_alerted_at_its_step(client: MlflowClient) -> None:
    class NanLoss(TinyNet):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if self.global_step == 5 else loss

    with pytest.warns(XAIMonitorWarning, match="alert nan at step 5"):
        run_id = fit_in_run(NanLoss(lr=0.0, optimizer="sgd"),
                            XAIMonitor(log_every_n_steps=4, histogram_every_n_epochs=0), epochs=3)
    tags = alert_tags(client, run_id)
    assert tags["mlflow_xai.alert.nan.first_step"] == "5" and tags["mlflow_xai.alert.nan.first_layer"] == "loss"
    assert steps(client, run_id, "alert/nan")[0] == 5


def test_iterable_loader_of_unknown_length(client: MlflowClient) -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from loader().dataset

    stream = DataLoader(Stream(), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with mlflow.start_run() as run:
            trainer(XAIMonitor(log_every_n_steps=3, histogram_every_n_epochs=0), epochs=2).fit(TinyNet(), stream)
    # No known last batch: steps 0, 3, 6 measured; the epoch ends (4, 8) add weight norms.
    assert steps(client, run.info.run_id, "grad_norm/net.0") == [0, 3, 6]
    assert steps(client, run.info.run_id, "weight_norm/net.0") == [0, 3, 4, 6, 8]


def test_a_failing_store_warns_once_and_training_goes_on(client: MlflowClient, uri: str, exp_id: str) -> None:
    run_id = client.create_run(exp_id).info.run_id

    class DeleteRun(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                monitor.flush()
                client.delete_run(run_id)  # MLflow refuses to log to a deleted run

    monitor = XAIMonitor(run_id=run_id, tracking_uri=uri, log_every_n_steps=1, histogram_every_n_epochs=1)
    model = TinyNet()
    with pytest.warns(XAIMonitorWarning, match="stopped logging to MLflow run") as caught:
        L.Trainer(max_epochs=3, logger=False, callbacks=[DeleteRun(), monitor], enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, loader())
    assert len([w for w in caught if "stopped logging" in str(w.message)]) == 1
    assert len(model.modes_seen) == 3 * ROWS // BATCH  # every batch trained
