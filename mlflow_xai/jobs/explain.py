"""The explain job: a model's weights, activations, gradients, attributions and
architecture, logged as the ``xai/`` artifacts of one MLflow run.

``explain_and_log`` finds the source (our train run's checkpoint, or any MLflow
PyTorch model), and ``explain_in_run`` composes the stages: inputs, the inspect pass,
attributions and conductance, figures, the diagram, ``summary.json`` and the report.
Every failure ends the run FAILED with the one-line error as the ``mlflow_xai.error``
tag, before the CLI prints the line and exits non-zero.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow_xai import tracking
from mlflow_xai.errors import XAIError
from mlflow_xai.jobs.common import explain_data, load_source, progress_printer, resolve_device

if TYPE_CHECKING:
    from mlflow_xai.figures.style import Painter


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


def _attributions_stage(model: Any, X: np.ndarray, meta: dict[str, Any], methods: tuple[str, ...],
                        baseline: np.ndarray, out: Path, images: dict[str, Any], warnings: list[str],
                        paint: Painter, baseline_note: str = "training mean (0 after standardization)",
                        ) -> dict[str, Any]:
    """Feature attributions per method, the conductance of every hidden layer, and their figures.

    A method that cannot run on this model (captum's DeepLift on a module the forward
    calls twice, say) is left out with a warning instead of failing the explanation.
    """
    import torch
    from torch import nn

    from mlflow_xai.figures.attributions import attribution_bar, conductance_figure, weights_vs_conductance
    from mlflow_xai.inspect.attributions import (
        attribute_with_error,
        conductances,
        path_attributions,
        rank_features,
    )

    task = meta["task"]
    names = list(meta["feature_names"])
    section: dict[str, Any] = {"baseline": baseline_note, "methods": {}}
    (out / "attributions").mkdir(exist_ok=True)

    # Conductance of each hidden block's units (the activation output), and the cookbook's
    # comparison of the last hidden layer's conductance with the head's weights on it.
    blocks = [n for n, m in model.named_modules() if n and isinstance(m, nn.Module)
              and not list(m.children()) and type(m).__name__ in _ACTIVATION_NAMES]
    reused = {name.split("@", 1)[0] for name in _called_names(model, X) if "@" in name}
    skipped = [b for b in blocks if b in reused]
    if skipped:
        warnings.append(f"conductance skipped for {', '.join(skipped)}: the forward calls "
                        f"{'them' if len(skipped) > 1 else 'it'} more than once")
    blocks = [b for b in blocks if b not in reused]
    # Integrated gradients and every block's conductance from one walk along the
    # integration path (the input gradients come with the layers' gradients); where
    # that walk cannot run, each is computed on its own below.
    walked: tuple[Any, dict[str, np.ndarray]] | None = None
    if "integrated_gradients" in methods and blocks:
        try:
            walked = path_attributions(model, X, blocks, baselines=baseline, task=task)
            section["integrated_gradients"] = ("the path integral by Simpson's rule on the 51 uniform "
                                               "points that the conductance walk takes")
        except (RuntimeError, AssertionError, TypeError, ValueError, XAIError):
            walked = None
    for method in methods:
        try:
            if method == "integrated_gradients" and walked is not None:
                attr = walked[0]
            else:
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
        images[f"attributions/{method}.png"] = paint(lambda m=method, r=ranked: attribution_bar(m, r))
        section["methods"][method] = {
            "top_features": [n for n, _ in ranked[:5]],
            "completeness_error_max": entry["completeness_error_max"],
        }
    section["agreement"] = _agreement(section["methods"])

    (out / "conductance").mkdir(exist_ok=True)
    cond_means: dict[str, list[float]] = {}
    # Every block's conductance from one walk along the integration path.
    by_layer = walked[1] if walked is not None else conductances(model, X, blocks, baselines=baseline, task=task)
    for layer, cond in by_layer.items():
        per_unit = cond.mean(axis=0)
        cond_means[layer] = [float(v) for v in per_unit]
        images[f"conductance/{layer}.png"] = paint(lambda n=layer, c=cond: conductance_figure(n, c))
    if blocks:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            out_pred = model(torch.as_tensor(X, device=next(model.parameters()).device))
        row = int(torch.mode(out_pred.argmax(dim=1)).values) if task == "classification" else 0
        w = head.weight.detach()[row].cpu().numpy()
        last = cond_means[blocks[-1]]
        if len(last) == len(w):
            images["conductance/last_layer_weights_vs_conductance.png"] = paint(
                lambda: weights_vs_conductance(blocks[-1], w, np.asarray(last)))
    (out / "conductance" / "conductance.json").write_text(
        json.dumps({"layers": cond_means}, indent=2), encoding="utf-8")
    section["conductance_layers"] = blocks
    return section


def _called_names(model: Any, X: np.ndarray) -> list[str]:
    """Every leaf's call in one forward pass on a row of ``X``: ``name``, then ``name@1`` ..."""
    import torch

    from mlflow_xai.inspect.hooks import record_outputs, resolve_layers
    from mlflow_xai.inspect.modules import eval_mode

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
    _, X, y = explain_data(meta, opts.data, opts.batches * loaded.cfg.batch_size)
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


def explain_in_run(run: Any, source: tracking.Source, tmp: Path, opts: ExplainOptions,
                   say: Callable[[str], None]) -> ExplainOutcome:
    """Explain ``source`` and log the ``xai/`` artifacts into the active ``run``."""
    from mlflow_xai.figures.style import Painter

    with Painter() as paint:
        return _explain_in_run(run, source, tmp, opts, say, paint)


def _explain_in_run(run: Any, source: tracking.Source, tmp: Path, opts: ExplainOptions,
                    say: Callable[[str], None], paint: Painter) -> ExplainOutcome:
    import torch  # noqa: F401 - the stages below need it loaded

    from mlflow_xai.figures.diagram import architecture_dot, render_all
    from mlflow_xai.figures.layers import block_mean_matrix, distribution_grid, heatmap, mean_activation_map
    from mlflow_xai.inspect import explain, summary_dict
    from mlflow_xai.inspect.summary import json_safe
    from mlflow_xai.reports.explain import HEATMAP_MAX_SIDE, HeatmapMatrix, render_report

    dev = resolve_device(opts.device)
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
    images: dict[str, bytes | Future[bytes]] = {}
    matrices: dict[str, HeatmapMatrix] = {}  # the numbers behind each heatmap, for the report's zoom

    def numbers(values: Any) -> HeatmapMatrix:
        reduced, block = block_mean_matrix(values, HEATMAP_MAX_SIDE**2, absolute=absolute)
        return HeatmapMatrix(reduced, block, tuple(values.shape))

    say("4/7 drawing the figures")
    # Drawn on the painter's thread while the stages below compute; collected before the report.
    images["weights/distributions.png"] = paint(lambda: distribution_grid("Weights", expl.weights))
    for name, lw in expl.weights.items():
        images[f"weights/{name}.png"] = paint(lambda n=name, v=lw.values: heatmap(f"{n} weight", v, absolute=absolute))
        matrices[f"weights/{name}.png"] = numbers(lw.values)
    images["activations/distributions.png"] = paint(lambda: distribution_grid("Activations", expl.activations))
    images["activations/mean_activations.png"] = paint(lambda: mean_activation_map(expl.activations))
    images["gradients/distributions.png"] = paint(lambda: distribution_grid("Gradients", expl.gradients))
    for name, lg in expl.gradients.items():
        images[f"gradients/{name}.png"] = paint(
            lambda n=name, v=lg.values: heatmap(f"{n} weight gradient", v, absolute=absolute))
        matrices[f"gradients/{name}.png"] = numbers(lg.values)

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
            warnings, paint, baseline_note=("training mean (0 after standardization)" if source.kind == "checkpoint"
                                     else f"mean of the {len(X)} explained rows"))
    else:
        say("6/7 attributions skipped" + (" (--attributions none)" if not methods else ""))

    say("7/7 logging the artifacts")
    images = {path: blob.result() if isinstance(blob, Future) else blob for path, blob in images.items()}
    for path, blob in images.items():
        if path.endswith(".svg") or path.endswith(".png"):
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_bytes(blob)
    summary["warnings"] = warnings
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False), encoding="utf-8")
    title = f"mlflow-xai: {source.model_uri}"
    (out / "report.html").write_text(render_report(summary, images, title=title, matrices=matrices), encoding="utf-8")
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
