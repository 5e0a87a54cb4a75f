"""The ``mlflow-xai`` command line: thin click commands over :mod:`mlflow_xai.jobs`.

Heavy imports (torch, Lightning, MLflow) happen inside the commands, so ``--help``
answers at once. A user's mistake (:class:`XAIError`) prints one line on stderr and
exits 2, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mlflow_xai.config import SplitSpec
from mlflow_xai.errors import XAIError

F = TypeVar("F", bound=Callable[..., Any])


def _empty_is_none(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    # MLproject passes unset parameters as empty strings.
    return None if isinstance(value, str) and value.strip() == "" else value


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XAIError as exc:
            click.echo(f"mlflow-xai: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("mlflow-xai: interrupted; the run is marked KILLED", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _quiet_mlflow(quiet: bool) -> None:
    # MLflow's artifact download bar is noise when quiet or when stderr is not a terminal,
    # and its INFO lines (creating tables, experiments) are noise under --quiet.
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if quiet:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _import_then_freeze(*modules: str, optional: tuple[str, ...] = ()) -> None:
    """Import what a command is about to use with the garbage collector paused, then freeze.

    Importing torch, Lightning and MLflow creates a few million long-lived objects and
    none of them is garbage, yet each full collection walks them all. Frozen, they are
    not walked again; and the interpreter's last collections at exit, which otherwise
    walk every object the job made, are skipped by freezing once more at exit (an
    ``atexit`` hook: in a long-lived process such as a test run it fires only at its
    end): the operating system frees the memory. Process-wide, so done here in the command, not in the library.
    ``optional`` names modules the job imports later (other packages' internals, such as
    torch.export's tracer): imported here too when they exist, so that their objects are
    frozen with the rest.
    """
    import atexit
    import gc
    import importlib

    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
        for name in optional:
            try:
                importlib.import_module(name)
            except ImportError:  # moved in another version: the job imports what it needs itself
                pass
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    global _freeze_at_exit
    if not _freeze_at_exit:
        atexit.register(gc.freeze)
        _freeze_at_exit = True


_freeze_at_exit = False


def _train_internals() -> tuple[str, ...]:
    """What ``train`` imports later on its own: torch.export's tracer (the pt2 model) and,
    for a database store, MLflow's SQLAlchemy store (the run's first call)."""
    names = ("torch.export._trace",)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"  # MLflow 3's default store
    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        names += ("mlflow.store.tracking.sqlalchemy_store",)
    return names


def _ui_hint() -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlflow-xai")
def main() -> None:
    """Train a tuned network and look inside it, with everything kept in MLflow."""


@main.command()
@click.option("--config", "config", default=None, callback=_empty_is_none,
              help="Tuned config, JSON or YAML; omitted or 'default': the built-in diabetes config.")
@click.option("--config-from-run", default=None, callback=_empty_is_none,
              help="Take the config from this tuning run's params (missing keys from the defaults).")
@click.option("--config-from-experiment", default=None, callback=_empty_is_none,
              help="Take the config from the best finished run of this tuning experiment (needs --metric).")
@click.option("--metric", default=None, callback=_empty_is_none,
              help="Metric that ranks the runs of --config-from-experiment, e.g. val_loss.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="Whether the best run has the lowest or the highest --metric.")
@click.option("--data", default="diabetes", show_default=True, callback=_empty_is_none,
              help="'diabetes' (embedded) or the path of a CSV/Parquet table.")
@click.option("--target", default=None, callback=_empty_is_none, help="Target column of a table.")
@click.option("--task", type=click.Choice(["auto", "regression", "classification"]), default="auto",
              show_default=True)
@click.option("--experiment", default=None, callback=_empty_is_none,
              help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else mlflow-xai).")
@click.option("--register-as", default=None, callback=_empty_is_none,
              help="Register the logged model under this name.")
@click.option("--alias", default=None, callback=_empty_is_none,
              help="Set this alias on the registered version (needs --register-as).")
@click.option("--test-size", default=SplitSpec.test_size, show_default=True, type=float,
              help="Share of the rows that form the test part (trained on, as in the cookbook).")
@click.option("--seed", default=SplitSpec.seed, show_default=True, type=int)
@click.option("--accelerator", default="auto", show_default=True, help="Lightning accelerator: auto, cpu, gpu, mps.")
@click.option("--devices", default="auto", show_default=True, help="Lightning devices: auto or a count.")
@click.option("--strategy", default="auto", show_default=True, help="Lightning strategy, e.g. ddp.")
@click.option("--num-nodes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Machines of a multi-node DDP fit (started by torchrun or SLURM's srun on each).")
@click.option("--monitor/--no-monitor", default=True, show_default=True,
              help="Log per-layer weight/gradient/activation statistics while training.")
@click.option("--monitor-every", default=None, type=click.IntRange(min=1),
              help="Monitor statistics every N training steps and at every epoch end (default: as often as "
                   "3% of the training time allows, the first and last epoch always).")
@click.option("--histograms-every", default=None, type=int,
              help="Distribution figures every K epochs and after the last (default: as often as the "
                   "monitor's budget allows; 0: none).")
@click.option("--workdir", default=None, help="Local folder for checkpoints and logs (default ./mlflow-xai-runs).")
@click.option("--quiet", is_flag=True, help="No progress bar, only the result lines.")
@_user_errors
def train(config: str | None, config_from_run: str | None, config_from_experiment: str | None,
          metric: str | None, mode: str, data: str | None, target: str | None, task: str,
          experiment: str | None, register_as: str | None, alias: str | None, test_size: float, seed: int,
          accelerator: str, devices: str, strategy: str, num_nodes: int, monitor: bool, monitor_every: int | None,
          histograms_every: int | None, workdir: str | None, quiet: bool) -> None:
    """Train the tuned config on the test data and log it all to MLflow."""
    _import_then_freeze("mlflow_xai.train", "mlflow_xai.tracking", *(["mlflow_xai.monitor"] if monitor else []),
                        optional=_train_internals())
    from mlflow_xai.jobs.train import train_and_log

    _quiet_mlflow(quiet)
    out = train_and_log(
        config, data=data, target=target, task=task, experiment=experiment,
        register_as=register_as, alias=alias, test_size=test_size, seed=seed,
        accelerator=accelerator, devices=devices,
        strategy=strategy, num_nodes=num_nodes, workdir=workdir, monitor=monitor, monitor_every_n_steps=monitor_every,
        monitor_histograms_every_n_epochs=histograms_every, quiet=quiet,
        config_from_run=config_from_run, config_from_experiment=config_from_experiment, metric=metric,
        mode=mode, echo=click.echo,
    )
    from mlflow_xai.tracking import distributed_rank

    if distributed_rank() > 0:
        return  # a DDP worker process: rank 0 logged the run and prints it
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in out.test_metrics.items())
    click.echo(f"train run: {out.run_id}")
    if metrics:
        click.echo(f"test metrics: {metrics}")
    if out.registered_version:
        click.echo(f"registered: models:/{register_as}/{out.registered_version}"
                   + (f" (alias {alias})" if alias else ""))
    click.echo(f"see it: {_ui_hint()}")


@main.command()
@click.option("--run-id", default=None, callback=_empty_is_none, help="Explain this train run.")
@click.option("--model-uri", default=None, callback=_empty_is_none,
              help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID/PATH: "
                   "a train run's model or any MLflow PyTorch model.")
@click.option("--experiment", default=None, callback=_empty_is_none,
              help="Where to find the latest train run, and where the explain run goes "
                   "(default: beside the run it explains).")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--batches", default=1, show_default=True, type=int,
              help="Explain on this many batches (of the config's batch size) of the test part.")
@click.option("--absolute", is_flag=True, help="Heatmaps of magnitudes instead of signed values.")
@click.option("--attributions", default="all", show_default=True,
              help="Attribution methods: all, none, or a comma-separated list of integrated_gradients, "
                   "deep_lift, gradient_shap, feature_ablation.")
@click.option("--data", default=None, callback=_empty_is_none,
              help="Our train runs: the training table, if it is no longer where the run read it. Any other "
                   "model: a CSV/TSV/Parquet table (with --target) or an .npy/.npz file of inputs "
                   "(default: the model's input example).")
@click.option("--target", default=None, callback=_empty_is_none,
              help="Label column of --data (a model mlflow-xai did not train): gradients of the loss.")
@click.option("--task", type=click.Choice(["auto", "regression", "classification"]), default="auto",
              show_default=True, help="A model mlflow-xai did not train: auto is regression for one output "
                                      "column, classification for more.")
@click.option("--rows", default=None, type=click.IntRange(min=1),
              help="A model mlflow-xai did not train: explain on this many rows of --data "
                   "(default 64 per --batches).")
@click.option("--allow-pickle", is_flag=True,
              help="Load a pickled model (as mlflow.pytorch.autolog logs it). Unpickling runs code from the "
                   "artifact: only for models you trust.")
@click.option("--allow-pickle-value", "allow_pickle_value", type=click.BOOL, default=False, hidden=True,
              help="--allow-pickle as a value (true/false), for the MLproject's allow_pickle parameter.")
@click.option("--quiet", is_flag=True, help="No progress lines, only the result lines.")
@_user_errors
def explain(run_id: str | None, model_uri: str | None, experiment: str | None, device: str, batches: int,
            absolute: bool, attributions: str, data: str | None, target: str | None, task: str,
            rows: int | None, allow_pickle: bool, allow_pickle_value: bool, quiet: bool) -> None:
    """Explain a model (a train run's, a registered version, any MLflow PyTorch model) and log it."""
    import gc

    import matplotlib.figure  # noqa: F401 - imported before gc.freeze below
    import torch  # noqa: F401

    from mlflow_xai.jobs.explain import explain_and_log

    _quiet_mlflow(quiet)
    # The long-lived torch/MLflow objects need no scanning: full GC passes otherwise cost
    # ~0.4 s each while the figures allocate. Process-wide, so done here, not in the library.
    gc.freeze()
    out = explain_and_log(run_id=run_id, model_uri=model_uri, experiment=experiment, device=device,
                          batches=batches, absolute=absolute, attributions=attributions, data=data,
                          target=target, task=task, rows=rows, allow_pickle=allow_pickle or allow_pickle_value,
                          quiet=quiet)
    for msg in out.warnings:
        click.echo(f"mlflow-xai: warning: {msg}", err=True)
    for flag in out.summary.get("diagnostics", {}).get("flags", []):
        click.echo(f"finding: {flag}")
    if out.source.kind == "checkpoint":
        click.echo(f"explain run: {out.run_id} (explains train run {out.source.run_id})")
    else:
        click.echo(f"explain run: {out.run_id} (explains {out.source.model_uri})")
    click.echo(f"report: artifact xai/report.html of run {out.run_id}")
    click.echo(f"see it: {_ui_hint()}")


def _drift_threshold(_ctx: click.Context, _param: click.Parameter, value: Any) -> float | None:
    value = _empty_is_none(_ctx, _param, value)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number; use a drift >= 0, e.g. 0.1") from None
    if not 0 <= number < float("inf"):
        raise click.BadParameter(f"{value!r} is invalid; use a drift >= 0, e.g. 0.1")
    return number


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--experiment", default=None, callback=_empty_is_none,
              help="Where the compare run goes (default: beside B's train run).")
@click.option("--rows", default=128, show_default=True, type=int,
              help="Compare activations and predictions on this many rows of A's test part.")
@click.option("--fail-above", default=None, callback=_drift_threshold, metavar="DRIFT",
              help="Exit 1 when any shared layer's weight drift ||W_B-W_A||/||W_A|| is above DRIFT.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--data", default=None, callback=_empty_is_none,
              help="A is a train run: its training table, if it is no longer where the run read it. A is any "
                   "other model: the rows to compare on, a table or an .npy/.npz file (default: A's input example).")
@click.option("--task", type=click.Choice(["auto", "regression", "classification"]), default="auto",
              show_default=True, help="Two models mlflow-xai did not train: how to compare their predictions.")
@click.option("--allow-pickle", is_flag=True,
              help="Load pickled models (as mlflow.pytorch.autolog logs them): unpickling runs code from the "
                   "artifact, only for models you trust.")
@click.option("--allow-pickle-value", "allow_pickle_value", type=click.BOOL, default=False, hidden=True,
              help="--allow-pickle as a value (true/false), for the MLproject's allow_pickle parameter.")
@click.option("--quiet", is_flag=True, help="No progress lines, only the result lines.")
@_user_errors
def compare(a: str, b: str, experiment: str | None, rows: int, fail_above: float | None, device: str,
            data: str | None, task: str, allow_pickle: bool, allow_pickle_value: bool, quiet: bool) -> None:
    """Compare model B with model A: each a run id or a model URI (models:/NAME@ALIAS, models:/NAME/VERSION,
    models:/MODEL_ID, runs:/RUN_ID/PATH), a train run's model or any MLflow PyTorch model."""
    from mlflow_xai.jobs.compare import compare_and_log

    _quiet_mlflow(quiet)
    out = compare_and_log(a, b, experiment=experiment, rows=rows, fail_above=fail_above, device=device,
                          data=data, task=task, allow_pickle=allow_pickle or allow_pickle_value, quiet=quiet)
    top = out.data.get("max_drift")
    if top:
        click.echo(f"largest weight drift: {top['layer']} {top['value']:.4g} "
                   f"({len(out.data['weights'])} shared layers)")
    else:
        click.echo("no layer in common: compared by predictions only")
    preds = out.data.get("predictions") or {}
    if preds.get("agreement") is not None:
        click.echo(f"predictions: {preds['agreement']:.1%} of {preds['rows']} rows agree")
    elif preds.get("rmse_diff") is not None:
        click.echo(f"predictions: RMS difference {preds['rmse_diff']:.4g} on {preds['rows']} rows")
    for key, side in (("only_in_a", "A"), ("only_in_b", "B")):
        if out.data.get(key):
            click.echo(f"only in {side}: {', '.join(out.data[key])}")
    click.echo(f"compare run: {out.run_id}")
    click.echo(f"report: artifact xai/compare/report.html of run {out.run_id}")
    click.echo(f"see it: {_ui_hint()}")
    if out.gate_failure:
        click.echo(f"mlflow-xai: drift gate failed: {out.gate_failure}", err=True)
        sys.exit(1)
