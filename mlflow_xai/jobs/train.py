"""The train job: a tuned config fitted on the test data inside one MLflow run.

``train_and_log`` composes the stages in order: the config (a file, the default, or
a tuning run's params), the data and its split, the Lightning fit
(:mod:`mlflow_xai.train`), the test metrics, the model and its registration. Every
failure ends the run FAILED with the one-line error as the ``mlflow_xai.error`` tag,
before the CLI prints the line and exits non-zero.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_xai import tracking
from mlflow_xai.config import SplitSpec, TrainerOptions, TunedConfig, load_config
from mlflow_xai.errors import XAIError


def serving_model(net: Any, split: Any) -> Any:
    """The network as the MLflow model serves it: raw features in, target units out."""
    from mlflow_xai.nets import ServingModel

    return ServingModel(net, split.mean, split.std, split.y_mean, split.y_std).eval()


@dataclass
class TrainOutcome:
    run_id: str
    experiment_id: str
    test_metrics: dict[str, float]
    registered_version: str | None = None
    interrupted: bool = False
    workdir: Path | None = None
    config_source_run_id: str | None = None  # the tuning run the config came from


def test_metrics(model: Any, X: np.ndarray, y: np.ndarray, task: str,
                 y_mean: float = 0.0, y_std: float = 1.0) -> dict[str, float]:
    """``test_loss`` plus rmse/mae/r2 (regression) or accuracy/f1 (classification) on the test part.

    ``test_loss`` is the training loss (on the standardized target for regression);
    rmse and mae are in the target's own units.
    """
    import torch

    from mlflow_xai.data import raw_target
    from mlflow_xai.inspect.modules import eval_mode
    from mlflow_xai.nets import loss_for

    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        out = model(torch.as_tensor(X, device=device)).cpu()
    if task == "classification":
        yt = torch.as_tensor(y, dtype=torch.long)
        pred = out.argmax(dim=1).numpy()
        from sklearn import metrics as skm

        return {
            "test_loss": float(loss_for(task)(out, yt)),
            "test_accuracy": float(skm.accuracy_score(y, pred)),
            "test_f1": float(skm.f1_score(y, pred, average="macro")),
        }
    pred = out.squeeze(-1).numpy()
    raw_pred, raw_y = raw_target(pred, y_mean, y_std), raw_target(y, y_mean, y_std)
    return {
        "test_loss": float(np.mean((pred - y) ** 2)),
        "test_rmse": float(np.sqrt(np.mean((raw_pred - raw_y) ** 2))),
        "test_mae": float(np.mean(np.abs(raw_pred - raw_y))),
        "test_r2": r2_score(raw_y, raw_pred),
    }


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """The coefficient of determination, as scikit-learn's ``r2_score`` gives it (1 for a
    perfect fit, 0 when a constant target is missed), without importing scikit-learn."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    residual = float(np.sum((y - pred) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


def train_and_log(
    config: str | Path | TunedConfig | None = None,
    *,
    data: str | None = "diabetes",
    target: str | None = None,
    task: str = "auto",
    experiment: str | None = None,
    register_as: str | None = None,
    alias: str | None = None,
    test_size: float = SplitSpec.test_size,
    seed: int = SplitSpec.seed,
    val_fraction: float = SplitSpec.val_fraction,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    workdir: str | Path | None = None,
    monitor: bool = True,
    monitor_every_n_steps: int | None = None,
    monitor_histograms_every_n_epochs: int | None = None,
    quiet: bool = False,
    config_from_run: str | None = None,
    config_from_experiment: str | None = None,
    metric: str | None = None,
    mode: str = "min",
    echo: Callable[[str], None] | None = None,
) -> TrainOutcome:
    """Train the tuned config on the test part of the data and log everything to MLflow.

    The config is ``config`` (a file, ``default`` or a :class:`TunedConfig`), or the
    params of a tuning run: ``config_from_run``, or the best finished run of the
    experiment ``config_from_experiment`` by ``metric`` (``mode`` ``min`` or ``max``).
    ``echo`` gets one line saying where the config came from and which keys were filled
    from the defaults.
    """
    from mlflow_xai.checkpoint import sha256_file
    from mlflow_xai.data import load_dataset, split_dataset
    from mlflow_xai.train import checkpoint_meta, default_workdir, fit

    if alias and not register_as:
        raise XAIError("--alias needs --register-as NAME: an alias names a registered model version")
    _check_config_choice(config, config_from_run, config_from_experiment, metric, mode)
    # Validated here, where they enter, before any run starts.
    split_spec = SplitSpec(test_size=test_size, seed=seed, val_fraction=val_fraction)
    trainer_options = TrainerOptions(accelerator=accelerator, devices=devices, strategy=strategy,
                                     num_nodes=num_nodes, quiet=quiet)
    data_spec = data or "diabetes"
    with tracking.run_context(experiment) as run:
        run_id = run.info.run_id
        tracking.set_tags({tracking.ROLE_TAG: "train"})
        source_run_id = None
        if config_from_run or config_from_experiment:
            cfg, source_run_id = _config_from_mlflow(config_from_run, config_from_experiment, metric, mode,
                                                     echo or (lambda _line: None))
        else:
            cfg = config if isinstance(config, TunedConfig) else load_config(config)
        ds = load_dataset(data_spec, target, task)
        split = split_dataset(ds, split_spec)
        cfg.check_size(ds.X.shape[1], ds.n_out)
        params: dict[str, Any] = {**cfg.to_dict(), "learning_rate": cfg.learning_rate}
        if cfg.hidden_sizes is not None:
            params["hidden_sizes"] = json.dumps(list(cfg.hidden_sizes))
        params.update(
            data=ds.name, target=ds.target, task=ds.task, n_features=ds.X.shape[1],
            test_size=test_size, seed=seed, val_fraction=val_fraction,
            n_train=split.n_train, n_test=len(split.X_test), n_fit=len(split.X_fit), n_val=len(split.X_val),
        )
        tracking.log_params(params)

        out_dir = default_workdir(workdir) / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = checkpoint_meta(cfg, ds, split, data_spec)
        epoch_metrics = tracking.epoch_metrics_callback()
        callbacks = [epoch_metrics]
        if monitor:
            from mlflow_xai.monitor import XAIMonitor

            callbacks.append(XAIMonitor(
                run_id=run_id, log_every_n_steps=monitor_every_n_steps,
                histogram_every_n_epochs=monitor_histograms_every_n_epochs, quiet=quiet,
                module="net",  # layer names as explain gives them: layers.0, not net.layers.0
            ))
        result = fit(cfg, ds, split, out_dir, meta, trainer_options, callbacks=callbacks)
        if not result.trainer.is_global_zero:
            # Under DDP only rank 0 logs; the other ranks are done once the fit is.
            return TrainOutcome(run_id, run.info.experiment_id, {}, workdir=out_dir)

        # From here on a lost tracking server ends with one line naming out_dir and the upload command.
        tracking.keep_local_results(run_id, out_dir)
        config_json = out_dir / "config.json"
        config_json.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        tracking.log_artifact(config_json)
        epoch_metrics.flush(final=True)  # type: ignore[attr-defined] # what the server missed while training
        if result.last_checkpoint is not None:
            tracking.set_tags({tracking.CHECKSUM_TAG: sha256_file(result.last_checkpoint)})
            tracking.log_artifact(result.last_checkpoint, "checkpoints")
        if result.tensorboard_dir.is_dir():
            tracking.log_artifacts(result.tensorboard_dir, "tensorboard")
        if result.interrupted:
            # The run is marked KILLED by run_context; what was written so far is logged.
            raise KeyboardInterrupt
        if result.last_checkpoint is None:
            raise XAIError("training wrote no checkpoint (no epoch finished); check the data and config")
        if result.best_checkpoint is not None:
            tracking.log_artifact(result.best_checkpoint, "checkpoints")
            tracking.set_tags({"mlflow_xai.best_val_loss": result.best_score})
        net = result.module.net.cpu().eval()
        metrics = test_metrics(net, split.X_test, split.y_test, ds.task, split.y_mean, split.y_std)
        tracking.log_metrics({**metrics, "epochs_run": result.epochs_run})
        raw_example = (split.X_test[:5] * split.std + split.mean).astype(np.float32)
        tracking.log_pytorch_model(serving_model(net, split), raw_example, register_as)
        version = None
        if register_as:
            version = tracking.latest_version(register_as, run_id)
            # The version points back along the lineage: its train run and the tuning trial.
            tracking.tag_model_version(register_as, version, tracking.lineage_tags(run_id, source_run_id))
            if alias:
                tracking.set_alias(register_as, alias, version)
        return TrainOutcome(run_id, run.info.experiment_id, metrics, version, workdir=out_dir,
                            config_source_run_id=source_run_id)


def _check_config_choice(config: Any, from_run: str | None, from_experiment: str | None,
                         metric: str | None, mode: str) -> None:
    """One source of the config; the options that go with a tuning experiment."""
    if from_run and from_experiment:
        raise XAIError("pass either --config-from-run or --config-from-experiment, not both")
    explicit = config is not None and not (isinstance(config, str) and config.strip() in ("", "default"))
    if explicit and (from_run or from_experiment):
        raise XAIError("pass either --config or --config-from-run/--config-from-experiment, not both")
    if from_experiment and not metric:
        raise XAIError("--config-from-experiment needs --metric NAME (e.g. val_loss) to pick the best run")
    if metric and not from_experiment:
        raise XAIError("--metric picks the best run of --config-from-experiment NAME; pass that too")
    if mode not in ("min", "max"):
        raise XAIError(f"--mode {mode!r} is invalid; use min or max")


def _config_from_mlflow(from_run: str | None, from_experiment: str | None, metric: str | None, mode: str,
                        echo: Callable[[str], None]) -> tuple[TunedConfig, str]:
    """The config in a tuning run's params; tags the train run with where it came from."""
    tags: dict[str, Any] = {}
    if from_experiment:
        assert metric is not None  # checked by _check_config_choice
        src, n = tracking.best_run(from_experiment, metric, mode)
        value = src.data.metrics[metric]
        origin = (f"best of {n} finished run{'s' if n != 1 else ''} of experiment {from_experiment!r} "
                  f"by {metric}={value:.6g} ({mode})")
        tags.update({"mlflow_xai.config_source_experiment": from_experiment,
                     "mlflow_xai.config_source_metric": metric, "mlflow_xai.config_source_mode": mode,
                     "mlflow_xai.config_source_metric_value": value})
    else:
        assert from_run is not None
        src = tracking.get_run(from_run)
        origin = "given run"
    run_id = src.info.run_id
    try:
        cfg, filled = TunedConfig.from_params(src.data.params)
    except XAIError as exc:
        raise XAIError(f"params of run {run_id}: {exc}") from exc
    if len(filled) == len(fields(TunedConfig)):  # every key from the defaults: not a tuning run
        raise XAIError(f"run {run_id} has none of the config keys ({', '.join(filled)}) among its params; "
                       "pick the tuning run that logged the tuned hyperparameters")
    tags[tracking.CONFIG_SOURCE_TAG] = run_id
    tags["mlflow_xai.config_defaults_filled"] = ",".join(filled) or "none"
    tracking.set_tags(tags)
    defaults = cfg.to_dict()
    rest = (f"filled from the defaults: {', '.join(f'{k}={defaults[k]}' for k in filled)}" if filled
            else "no key filled from the defaults")
    echo(f"config from run {run_id} ({origin}); {rest}")
    return cfg, run_id
