"""The jobs, composed from the stages: train_and_log and explain_and_log.

Each job runs inside one MLflow run (the one ``mlflow run`` started, or a new one),
and every failure inside it ends that run FAILED with the one-line error as the
``mlflow_xai.error`` tag, before the CLI prints the line and exits non-zero.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlflow_xai import tracking
from mlflow_xai.config import TunedConfig, load_config
from mlflow_xai.errors import XAIError


def progress_printer(quiet: bool) -> Callable[[str], None]:
    """One line per stage on stderr when it is a terminal and not ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        return lambda _msg: None
    return lambda msg: print(f"[mlflow-xai] {msg}", file=sys.stderr, flush=True)


@dataclass
class TrainOutcome:
    run_id: str
    experiment_id: str
    test_metrics: dict[str, float]
    registered_version: str | None = None
    interrupted: bool = False
    workdir: Path | None = None


def test_metrics(model: Any, X: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """``test_loss`` plus rmse/mae/r2 (regression) or accuracy/f1 (classification) on the test part."""
    import torch
    from sklearn import metrics as skm

    from mlflow_xai.nets import loss_for

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(torch.as_tensor(X, device=device)).cpu()
    finally:
        model.train(was_training)
    if task == "classification":
        yt = torch.as_tensor(y, dtype=torch.long)
        pred = out.argmax(dim=1).numpy()
        return {
            "test_loss": float(loss_for(task)(out, yt)),
            "test_accuracy": float(skm.accuracy_score(y, pred)),
            "test_f1": float(skm.f1_score(y, pred, average="macro")),
        }
    pred = out.squeeze(-1).numpy()
    mse = float(np.mean((pred - y) ** 2))
    return {
        "test_loss": mse,
        "test_rmse": float(np.sqrt(mse)),
        "test_mae": float(skm.mean_absolute_error(y, pred)),
        "test_r2": float(skm.r2_score(y, pred)),
    }


def train_and_log(
    config: str | Path | TunedConfig | None = None,
    *,
    data: str | None = "diabetes",
    target: str | None = None,
    task: str = "auto",
    experiment: str | None = None,
    register_as: str | None = None,
    alias: str | None = None,
    test_size: float = 0.4,
    seed: int = 42,
    val_fraction: float = 0.2,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    workdir: str | Path | None = None,
    monitor: bool = True,
    monitor_every_n_steps: int = 50,
    monitor_histograms_every_n_epochs: int = 1,
    quiet: bool = False,
) -> TrainOutcome:
    """Train the tuned config on the test part of the data and log everything to MLflow."""
    from mlflow_xai.checkpoint import sha256_file
    from mlflow_xai.data import load_dataset, split_dataset
    from mlflow_xai.train import checkpoint_meta, default_workdir, fit

    if alias and not register_as:
        raise XAIError("--alias needs --register-as NAME: an alias names a registered model version")
    data_spec = data or "diabetes"
    with tracking.run_context(experiment) as run:
        run_id = run.info.run_id
        tracking.set_tags({tracking.ROLE_TAG: "train"})
        cfg = config if isinstance(config, TunedConfig) else load_config(config)
        ds = load_dataset(data_spec, target, task)
        split = split_dataset(ds, test_size=test_size, seed=seed, val_fraction=val_fraction)
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
        callbacks = [tracking.epoch_metrics_callback()]
        if monitor:
            from mlflow_xai.monitor import XAIMonitor

            callbacks.append(XAIMonitor(
                run_id=run_id, log_every_n_steps=monitor_every_n_steps,
                histogram_every_n_epochs=monitor_histograms_every_n_epochs, quiet=quiet,
            ))
        result = fit(cfg, ds, split, out_dir, meta, accelerator=accelerator, devices=devices,
                     strategy=strategy, quiet=quiet, callbacks=callbacks)
        if not result.trainer.is_global_zero:
            # Under DDP only rank 0 logs; the other ranks are done once the fit is.
            return TrainOutcome(run_id, run.info.experiment_id, {}, workdir=out_dir)

        config_json = out_dir / "config.json"
        config_json.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        tracking.log_artifact(config_json)
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
        metrics = test_metrics(net, split.X_test, split.y_test, ds.task)
        tracking.log_metrics({**metrics, "epochs_run": result.epochs_run})
        tracking.log_pytorch_model(net, split.X_test[:5], register_as)
        version = None
        if register_as:
            version = tracking.latest_version(register_as, run_id)
            if alias:
                tracking.set_alias(register_as, alias, version)
        return TrainOutcome(run_id, run.info.experiment_id, metrics, version, workdir=out_dir)


@dataclass
class ExplainOutcome:
    run_id: str
    source: Any
    artifacts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
