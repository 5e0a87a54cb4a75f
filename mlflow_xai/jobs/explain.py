"""The jobs, composed from the stages: train_and_log and explain_and_log.

Each job runs inside one MLflow run (the one ``mlflow run`` started, or a new one),
and every failure inside it ends that run FAILED with the one-line error as the
``mlflow_xai.error`` tag, before the CLI prints the line and exits non-zero.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_xai import tracking
from mlflow_xai.config import SplitSpec, TrainerOptions, TunedConfig, load_config
from mlflow_xai.errors import XAIError


def progress_printer(quiet: bool) -> Callable[[str], None]:
    """One line per stage on stderr when it is a terminal and not ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        return lambda _msg: None
    return lambda msg: print(f"[mlflow-xai] {msg}", file=sys.stderr, flush=True)


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
    from sklearn import metrics as skm

    from mlflow_xai.data import raw_target
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
    raw_pred, raw_y = raw_target(pred, y_mean, y_std), raw_target(y, y_mean, y_std)
    return {
        "test_loss": float(np.mean((pred - y) ** 2)),
        "test_rmse": float(np.sqrt(np.mean((raw_pred - raw_y) ** 2))),
        "test_mae": float(skm.mean_absolute_error(raw_y, raw_pred)),
        "test_r2": float(skm.r2_score(raw_y, raw_pred)),
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
    test_size: float = SplitSpec.test_size,
    seed: int = SplitSpec.seed,
    val_fraction: float = SplitSpec.val_fraction,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    workdir: str | Path | None = None,
    monitor: bool = True,
    monitor_every_n_steps: int = 50,
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


@dataclass
class ExplainOutcome:
    run_id: str
    source: Any
    artifacts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the headline metrics logged


ATTRIBUTION_METHODS = ("integrated_gradients", "deep_lift", "gradient_shap", "feature_ablation")
#: The explain run's headline metrics, also set as ``mlflow_xai.<name>`` tags on an explained model version.
HEADLINE_METRICS = ("nan_count", "inf_count", "dead_unit_share", "max_grad_norm", "batch_loss",
                    "ig_completeness_error_max")


def parse_attributions(spec: str | None) -> tuple[str, ...]:
    """``all`` (default), ``none``, or a comma-separated list of method names."""
    if spec is None or spec.strip() in ("", "all"):
        return ATTRIBUTION_METHODS
    if spec.strip() == "none":
        return ()
    methods = tuple(m.strip() for m in spec.split(",") if m.strip())
    for m in methods:
        if m not in ATTRIBUTION_METHODS:
            raise XAIError(
                f"attribution method {m!r} is not supported; use all, none or a comma-separated "
                f"list of {', '.join(ATTRIBUTION_METHODS)}"
            )
    return methods


def _explain_data(meta: Any, data_override: str | None, batch_rows: int) -> tuple[Any, Any, Any]:
    """The test part the model was trained on: same data, split and standardization as training.

    ``meta`` is the checkpoint's :class:`~mlflow_xai.checkpoint.CheckpointMeta`.
    """
    from mlflow_xai.data import load_dataset, split_dataset

    spec = data_override or meta.data or "diabetes"
    try:
        ds = load_dataset(spec, meta.target if spec != "diabetes" else None, meta.task)
    except XAIError as exc:
        raise XAIError(f"{exc} (the train run used data {meta.data!r}; pass --data PATH to point at it)") from exc
    if tuple(ds.feature_names) != tuple(meta.feature_names):
        raise XAIError(
            f"data {spec!r} has features {list(ds.feature_names)[:6]}..., not the ones the model was trained on "
            f"({list(meta.feature_names)[:6]}...); pass the training table with --data"
        )
    split = split_dataset(ds, meta.split)
    X, y = split.X_test[:batch_rows], split.y_test[:batch_rows]
    return ds, X, y


def _attributions_stage(model: Any, X: np.ndarray, meta: dict[str, Any], methods: tuple[str, ...],
                        baseline: np.ndarray, out: Path, images: dict[str, bytes], warnings: list[str],
                        baseline_note: str = "training mean (0 after standardization)") -> dict[str, Any]:
    """Feature attributions per method, the conductance of every hidden layer, and their figures.

    A method that cannot run on this model (captum's DeepLift on a module the forward
    calls twice, say) is left out with a warning instead of failing the explanation.
    """
    from mlflow_xai.attribution_plots import attribution_bar, conductance_figure, weights_vs_conductance
    from mlflow_xai.inspect.attributions import attribute_with_error, conductance, rank_features
    from mlflow_xai.plots import figure_to_png

    task = meta["task"]
    names = list(meta["feature_names"])
    section: dict[str, Any] = {"baseline": baseline_note, "methods": {}}
    (out / "attributions").mkdir(exist_ok=True)
    for method in methods:
        try:
            attr = attribute_with_error(model, X, method, baselines=baseline, task=task)  # type: ignore[arg-type]
        except (RuntimeError, AssertionError, TypeError, ValueError, XAIError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            warnings.append(f"attribution method {method} skipped: it failed on this model ({first})")
            continue
        ranked = rank_features(attr.values, names)
        err = attr.completeness_error
        entry = {
            "feature_names": names,
            "mean_abs": {n: float(v) for n, v in zip(names, np.abs(attr.values).mean(axis=0), strict=False)},
            "mean": {n: float(v) for n, v in zip(names, attr.values.mean(axis=0), strict=False)},
            "ranked": [[n, float(v)] for n, v in ranked],
            "completeness_error_max": float(np.max(err)) if err is not None else None,
            "completeness_error_mean": float(np.mean(err)) if err is not None else None,
        }
        (out / "attributions" / f"{method}.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        images[f"attributions/{method}.png"] = figure_to_png(attribution_bar(method, ranked))
        section["methods"][method] = {
            "top_features": [n for n, _ in ranked[:5]],
            "completeness_error_max": entry["completeness_error_max"],
        }
    section["agreement"] = _agreement(section["methods"])

    # Conductance of each hidden block's units (the activation output), and the cookbook's
    # comparison of the last hidden layer's conductance with the head's weights on it.
    import torch
    from torch import nn

    blocks = [n for n, m in model.named_modules() if n and isinstance(m, nn.Module)
              and not list(m.children()) and type(m).__name__ in _ACTIVATION_NAMES]
    (out / "conductance").mkdir(exist_ok=True)
    cond_means: dict[str, list[float]] = {}
    reused = {name.split("@", 1)[0] for name in _called_names(model, X) if "@" in name}
    skipped = [b for b in blocks if b in reused]
    if skipped:
        warnings.append(f"conductance skipped for {', '.join(skipped)}: the forward calls "
                        f"{'them' if len(skipped) > 1 else 'it'} more than once")
    blocks = [b for b in blocks if b not in reused]
    for layer in blocks:
        cond = conductance(model, X, layer, baselines=baseline, task=task)
        per_unit = cond.mean(axis=0)
        cond_means[layer] = [float(v) for v in per_unit]
        images[f"conductance/{layer}.png"] = figure_to_png(conductance_figure(layer, cond))
    if blocks:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            out_pred = model(torch.as_tensor(X, device=next(model.parameters()).device))
        row = int(torch.mode(out_pred.argmax(dim=1)).values) if task == "classification" else 0
        w = head.weight.detach()[row].cpu().numpy()
        last = cond_means[blocks[-1]]
        if len(last) == len(w):
            images["conductance/last_layer_weights_vs_conductance.png"] = figure_to_png(
                weights_vs_conductance(blocks[-1], w, np.asarray(last)))
    (out / "conductance" / "conductance.json").write_text(
        json.dumps({"layers": cond_means}, indent=2), encoding="utf-8")
    section["conductance_layers"] = blocks
    return section


def _called_names(model: Any, X: np.ndarray) -> list[str]:
    """Every leaf's call in one forward pass on a row of ``X``: ``name``, then ``name@1`` ..."""
    import torch

    from mlflow_xai.inspect.core import eval_mode
    from mlflow_xai.inspect.hooks import record_outputs, resolve_layers

    with eval_mode(model), torch.no_grad(), record_outputs(model, resolve_layers(model, None), per_call=True) as rec:
        rec.begin_pass()
        model(torch.as_tensor(X[:1], device=next(model.parameters()).device))
    return list(rec.order)


_ACTIVATION_NAMES = {"ReLU", "LeakyReLU", "Tanh", "Sigmoid", "ELU", "SiLU", "GELU", "SELU", "Softplus", "ReLU6"}


def _agreement(methods: dict[str, Any]) -> str:
    """Say whether the methods agree on the top features (the top 3, as sets)."""
    tops = {m: tuple(v["top_features"][:3]) for m, v in methods.items()}
    if len(tops) < 2:
        return ""
    sets = {frozenset(t) for t in tops.values()}
    if len(sets) == 1:
        return f"all methods agree on the top 3 features: {', '.join(next(iter(tops.values())))}"
    firsts = {t[0] for t in tops.values() if t}
    if len(firsts) == 1:
        return (f"all methods rank {next(iter(firsts))} first, but disagree on the rest of the top 3: "
                + "; ".join(f"{m}: {', '.join(t)}" for m, t in tops.items()))
    return "the methods disagree on the top features: " + "; ".join(f"{m}: {', '.join(t)}" for m, t in tops.items())


def explain_and_log(
    *,
    run_id: str | None = None,
    model_uri: str | None = None,
    experiment: str | None = None,
    device: str = "auto",
    batches: int = 1,
    absolute: bool = False,
    attributions: str | None = "all",
    data: str | None = None,
    target: str | None = None,
    task: str = "auto",
    allow_pickle: bool = False,
    rows: int | None = None,
    quiet: bool = False,
) -> ExplainOutcome:
    """Pull a model (a train run's, a model version, any MLflow PyTorch model), explain it and log it.

    Our own train runs are explained on their test part, rebuilt from their checkpoint.
    Any other MLflow PyTorch model is explained on ``data`` (a table with ``target``, or an
    ``.npy``/``.npz`` file; default: its input example), its first ``rows`` rows (default
    ``64 * batches``); a pickled model only with ``allow_pickle``.
    """
    say = progress_printer(quiet)
    if batches < 1:
        raise XAIError(f"--batches {batches} is invalid; use 1 or more")
    if rows is not None and rows < 1:
        raise XAIError(f"--rows {rows} is invalid; use 1 or more")
    if task not in ("auto", "regression", "classification"):
        raise XAIError(f"--task {task!r} is not supported; use auto, regression or classification")
    methods = parse_attributions(attributions)
    options = ExplainOptions(device=device, batches=batches, absolute=absolute, methods=methods, data=data,
                              target=target, task=task, allow_pickle=allow_pickle, rows=rows)
    source: tracking.Source | None = None
    failure: XAIError | None = None
    say("1/7 finding the model")
    try:
        source = tracking.resolve_source(run_id, model_uri, experiment)
    except XAIError as exc:
        failure = exc
    # The explain run lives beside the run it explains, unless an experiment is named.
    exp_id = source.experiment_id if source is not None and not experiment else None
    with tracking.run_context(experiment, experiment_id=exp_id) as run:
        tracking.set_tags({tracking.ROLE_TAG: "explain"})
        if failure is not None:
            raise failure
        assert source is not None
        tracking.set_tags({tracking.SOURCE_RUN_TAG: source.run_id, tracking.SOURCE_URI_TAG: source.model_uri})
        with tempfile.TemporaryDirectory(prefix="mlflow-xai-") as tmp:
            return explain_in_run(run, source, Path(tmp), options, say)


@dataclass(frozen=True)
class ExplainOptions:
    device: str = "auto"
    batches: int = 1
    absolute: bool = False
    methods: tuple[str, ...] = ATTRIBUTION_METHODS
    data: str | None = None
    target: str | None = None
    task: str = "auto"
    allow_pickle: bool = False
    rows: int | None = None
    inputs: Any = None  # sources.inputs.ModelInputs already in memory (the evaluator's dataset)


@dataclass
class _Subject:
    """A loaded model and the batch to explain it on, whichever way it came."""

    model: Any
    inputs: Any  # tensor, batch first
    targets: Any  # tensor or None
    loss_fn: Any  # None: the default loss for the targets
    task: str
    feature_names: list[str] | None
    data: dict[str, Any]  # summary.json's "data"
    baseline: np.ndarray | None  # attribution baseline; None: no attributions on these inputs
    gradient_of: str
    train_run: Any = None
    batch_size: int | None = None  # the one batch size the model takes, if fixed
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # summary.json "meta" additions


def _checkpoint_subject(source: tracking.Source, tmp: Path, dev: str, opts: ExplainOptions,
                        say: Callable[[str], None]) -> _Subject:
    """A run of ``mlflow-xai train``: its checkpoint, on the test part it was trained on."""
    import torch

    say("2/7 downloading and verifying the checkpoint")
    loaded, train_run = load_source(source, tmp, dev)
    meta = loaded.meta
    _, X, y = _explain_data(meta, opts.data, opts.batches * loaded.cfg.batch_size)
    task = meta.task
    targets = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
    return _Subject(
        model=loaded.model, inputs=torch.as_tensor(X), targets=targets, loss_fn=None, task=task,
        feature_names=list(meta.feature_names),
        data={"data": meta.data, "task": task, "rows": len(X), "feature_names": list(meta.feature_names)},
        baseline=np.zeros(X.shape[1], dtype=np.float32),  # the training mean, after standardization
        gradient_of=("loss: cross-entropy with the targets" if task == "classification"
                     else "loss: mean squared error with the targets"),
        train_run=train_run, meta={"model_format": "mlflow-xai checkpoint"},
    )


def _model_subject(source: tracking.Source, tmp: Path, dev: str, opts: ExplainOptions,
                   say: Callable[[str], None]) -> _Subject:
    """Any MLflow PyTorch model: pt2 unflattened, pickle on opt-in, on the user's data."""
    import torch

    from mlflow_xai.inspect.hooks import first_tensor
    from mlflow_xai.sources.inputs import load_model_inputs, objective, resolve_task
    from mlflow_xai.sources.pytorch_model import load_pytorch_model

    say(f"2/7 downloading and loading the model {source.artifact_uri}")
    model_dir = tracking.download_model(source, tmp)
    loaded = load_pytorch_model(model_dir, source.model_uri, device=dev, allow_pickle=opts.allow_pickle)
    model = loaded.model
    got = opts.inputs or load_model_inputs(opts.data, opts.target, model_dir=model_dir, mlmodel=loaded.mlmodel,
                                           rows=opts.rows or 64 * opts.batches)
    warnings = [*loaded.warnings, *got.warnings]
    inputs = torch.as_tensor(got.x)
    if loaded.input_shape is not None and tuple(inputs.shape[1:]) != tuple(
            d if d != -1 else inputs.shape[1 + i] for i, d in enumerate(loaded.input_shape)):
        raise XAIError(f"{got.description} has inputs of shape {tuple(inputs.shape[1:])} per row, but the model was "
                       f"exported for {loaded.input_shape}; pass the data the model takes"
                       + ("" if opts.target or opts.inputs else " (--target COLUMN leaves a table's label out)"))
    probe_rows = loaded.fixed_batch or min(len(inputs), 2)
    if len(inputs) < probe_rows:
        raise XAIError(f"the model takes batches of exactly {probe_rows} rows, but {got.description} has "
                       f"{len(inputs)}; pass more rows")
    was_training = model.training
    try:
        with torch.no_grad():
            out = first_tensor(model(inputs[:probe_rows].to(dev)))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise XAIError(f"the model does not run on {got.description} (inputs of shape "
                       f"{tuple(inputs.shape)}): {first}; pass the data the model takes") from exc
    finally:
        model.train(was_training)
    if out is None:
        raise XAIError("the model returned no tensor; mlflow-xai explains models whose output is a tensor")
    task = resolve_task(opts.task, tuple(out.shape))
    targets = None
    if got.y is not None:
        if task == "classification":
            if not np.all(np.equal(np.mod(got.y, 1), 0)):
                raise XAIError("the target column has non-integer values, but the model is a classifier; "
                               "pass class indices 0..K-1 or --task regression")
            targets = torch.as_tensor(got.y.astype(np.int64))
        else:
            targets = torch.as_tensor(np.asarray(got.y, dtype=np.float32))
    gradient_of, loss_fn = objective(task, targets is not None)
    if targets is None:
        targets = torch.zeros(len(inputs))  # the objective ignores them; they switch gradients on
    feature_names = list(got.feature_names) if got.feature_names is not None else None
    baseline: np.ndarray | None = None
    if inputs.dim() == 2 and inputs.is_floating_point():
        baseline = got.x.mean(axis=0).astype(np.float32)
    elif inputs.dim() != 2 or not inputs.is_floating_point():
        warnings.append(f"attributions and conductance skipped: the inputs ({tuple(inputs.shape[1:])} "
                        f"{str(got.x.dtype)} per row) are not feature vectors")
    if loaded.fixed_batch is not None and baseline is not None:
        baseline = None
        warnings.append(f"attributions and conductance skipped: they run the model on batches of other sizes "
                        f"than the {loaded.fixed_batch} it was exported for")
    train_run = tracking.get_run(source.run_id) if source.run_id else None
    return _Subject(
        model=model, inputs=inputs, targets=targets, loss_fn=loss_fn, task=task, feature_names=feature_names,
        data={"data": got.description, "task": task, "rows": len(inputs), "feature_names": feature_names,
              "target": opts.target},
        baseline=baseline, gradient_of=gradient_of, train_run=train_run, batch_size=loaded.fixed_batch,
        warnings=warnings, meta={"model_format": loaded.format,
                                 "exported_in_training_mode": loaded.training_mode,
                                 "fixed_batch": loaded.fixed_batch},
    )


def load_source(source: tracking.Source, dst: Path, device: str) -> tuple[Any, Any]:
    """The source run's checkpoint, downloaded into ``dst``, checksum-verified and loaded
    safely on ``device``; and the train run it came from."""
    from mlflow_xai.checkpoint import load_checkpoint, verify_checksum

    path, sha, train_run = tracking.download_checkpoint(source, dst)
    verify_checksum(path, sha, f"run {source.run_id}")
    return load_checkpoint(path, device), train_run


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise XAIError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise XAIError("--device mps was asked for, but MPS is not available; use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps"):
        raise XAIError(f"--device {device!r} is not supported; use auto, cpu, cuda or mps")
    return device


def explain_in_run(run: Any, source: tracking.Source, tmp: Path, opts: ExplainOptions,
                   say: Callable[[str], None]) -> ExplainOutcome:
    """Explain ``source`` and log the ``xai/`` artifacts into the active ``run``."""
    import torch  # noqa: F401 - the stages below need it loaded

    from mlflow_xai.diagram import architecture_dot, render_all
    from mlflow_xai.inspect import explain, summary_dict
    from mlflow_xai.inspect.summary import json_safe
    from mlflow_xai.plots import distribution_grid, figure_to_png, heatmap, mean_activation_map
    from mlflow_xai.report import render_report

    dev = _resolve_device(opts.device)
    absolute, methods = opts.absolute, opts.methods
    subject = (_checkpoint_subject if source.kind == "checkpoint" else _model_subject)(source, tmp, dev, opts, say)
    model, inputs = subject.model, subject.inputs
    train_run = subject.train_run

    say(f"3/7 computing weights, activations and gradients on {len(inputs)} rows")
    from torch import nn

    # Dropout is the identity in eval mode: its output would repeat the activation before it.
    expl = explain(model, inputs, subject.targets, subject.loss_fn, copy=False, per_call=True,
                   batch_size=subject.batch_size, layers=lambda _n, m: not isinstance(m, nn.Dropout))
    out = tmp / "xai"
    for kind in ("weights", "activations", "gradients"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}

    say("4/7 drawing the figures")
    images["weights/distributions.png"] = figure_to_png(distribution_grid("Weights", expl.weights))
    for name, lw in expl.weights.items():
        images[f"weights/{name}.png"] = figure_to_png(heatmap(f"{name} weight", lw.values, absolute=absolute))
    images["activations/distributions.png"] = figure_to_png(distribution_grid("Activations", expl.activations))
    images["activations/mean_activations.png"] = figure_to_png(mean_activation_map(expl.activations))
    images["gradients/distributions.png"] = figure_to_png(distribution_grid("Gradients", expl.gradients))
    for name, lg in expl.gradients.items():
        images[f"gradients/{name}.png"] = figure_to_png(heatmap(f"{name} weight gradient", lg.values, absolute=absolute))

    say("5/7 drawing the architecture")
    warnings: list[str] = list(subject.warnings)
    dot = architecture_dot(model, inputs[:subject.batch_size or 2].to(dev))
    (out / "architecture.dot").write_text(dot, encoding="utf-8")
    rendered, render_warnings = render_all(dot)
    for msg in render_warnings:
        warnings.append(f"architecture diagram: {msg}")
    for fmt, data_bytes in rendered.items():
        images[f"architecture.{fmt}"] = data_bytes

    summary = summary_dict(expl)
    summary["meta"] = {**summary.get("meta", {}), **subject.meta, "gradient_of": subject.gradient_of}
    summary["source"] = {"run_id": source.run_id or None, "model_uri": source.model_uri,
                         "registered_model": source.registered_name, "version": source.version}
    summary["data"] = subject.data
    if methods and subject.baseline is not None:
        say(f"6/7 attributions ({', '.join(methods)}) and conductance")
        X = inputs.numpy()
        names = subject.feature_names or [f"x{i}" for i in range(X.shape[1])]
        summary["attributions"] = _attributions_stage(
            model, X, {"task": subject.task, "feature_names": names}, methods, subject.baseline, out, images,
            warnings, baseline_note=("training mean (0 after standardization)" if source.kind == "checkpoint"
                                     else f"mean of the {len(X)} explained rows"))
    else:
        say("6/7 attributions skipped" + (" (--attributions none)" if not methods else ""))

    say("7/7 logging the artifacts")
    for path, blob in images.items():
        if path.endswith(".svg") or path.endswith(".png"):
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_bytes(blob)
    summary["warnings"] = warnings
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False), encoding="utf-8")
    title = f"mlflow-xai: {source.model_uri}"
    (out / "report.html").write_text(render_report(summary, images, title=title), encoding="utf-8")
    tracking.log_artifacts(out, "xai")
    diag = summary["diagnostics"]
    headline = {"nan_count": diag["nan_count"], "inf_count": diag["inf_count"]}
    if diag.get("dead_unit_share") is not None:
        headline["dead_unit_share"] = diag["dead_unit_share"]
    if diag.get("max_grad_norm") is not None:
        headline["max_grad_norm"] = diag["max_grad_norm"]
    if summary.get("loss") is not None:
        headline["batch_loss"] = summary["loss"]
    ig = summary.get("attributions", {}).get("methods", {}).get("integrated_gradients")
    if ig and ig.get("completeness_error_max") is not None:
        headline["ig_completeness_error_max"] = ig["completeness_error_max"]
    tracking.log_metrics(headline)
    if source.registered_name and source.version:
        # The registry page of the version answers "explained? how does it look? from where?".
        lineage = tracking.lineage_tags(source.run_id, train_run.data.tags.get(tracking.CONFIG_SOURCE_TAG)) \
            if train_run is not None and source.kind == "checkpoint" else {}
        tracking.tag_model_version(source.registered_name, source.version, {
            tracking.EXPLAIN_RUN_TAG: run.info.run_id,
            # Every headline key, so a metric this explanation lacks drops the earlier one's tag.
            **{f"mlflow_xai.{k}": headline.get(k) for k in HEADLINE_METRICS},
            "mlflow_xai.explain_findings": "; ".join(diag.get("flags") or ()) or "none",
            "mlflow_xai.explain_report": f"runs:/{run.info.run_id}/xai/report.html",
            **lineage,
        })
    return ExplainOutcome(run.info.run_id, source, sorted(["xai/" + p for p in images] +
                          ["xai/summary.json", "xai/report.html", "xai/architecture.dot"]), warnings, summary,
                          headline)
