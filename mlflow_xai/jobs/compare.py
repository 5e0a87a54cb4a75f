"""The compare job: two train runs or model versions, compared layer by layer, logged as a compare run.

Both sides are resolved like ``explain`` resolves its source (a run id or a model URI),
their checkpoints downloaded, checksummed and rebuilt safely; the numbers come from
:mod:`mlflow_xai.inspect.compare`, the figures from :mod:`mlflow_xai.figures.compare`,
the page from :mod:`mlflow_xai.reports.compare`. Everything is logged under
``xai/compare/`` of a new run tagged ``mlflow_xai.role=compare``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow_xai import tracking
from mlflow_xai.errors import XAIError
from mlflow_xai.jobs.common import explain_data, load_source, progress_printer, resolve_device

if TYPE_CHECKING:
    from mlflow_xai.figures.style import Painter

SCHEMA_VERSION = 1
COMPARE_A_TAG = "mlflow_xai.compare_a"
COMPARE_B_TAG = "mlflow_xai.compare_b"
GATE_TAG = "mlflow_xai.compare_gate"


@dataclass
class CompareOutcome:
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)  # what compare.json holds
    gate_failure: str | None = None  # the one line saying which layer drifted over --fail-above
    artifacts: list[str] = field(default_factory=list)


def compare_and_log(
    a: str,
    b: str,
    *,
    experiment: str | None = None,
    rows: int = 128,
    fail_above: float | None = None,
    device: str = "auto",
    data: str | None = None,
    bins: int = 50,
    allow_pickle: bool = False,
    task: str = "auto",
    quiet: bool = False,
) -> CompareOutcome:
    """Compare model B with model A (each a run id or a model URI) and log the comparison.

    Either side may be a train run of ours or any MLflow PyTorch model (pickled ones only
    with ``allow_pickle``). The rows are A's test part when A is ours, else ``data`` (a
    table or an ``.npy``/``.npz`` file; default: A's logged input example), fed raw to a
    model we did not train and standardized as trained to ours.

    The compare run goes beside B's train run unless ``experiment`` is given. With
    ``fail_above``, the outcome's ``gate_failure`` names the first layer whose weight
    drift is above it (or says that no layer is shared); the run still finishes.
    """
    say = progress_printer(quiet)
    if rows < 1:
        raise XAIError(f"--rows {rows} is invalid; use 1 or more")
    if fail_above is not None and not (isinstance(fail_above, (int, float)) and 0 <= fail_above < math.inf):
        raise XAIError(f"--fail-above {fail_above!r} is invalid; use a drift >= 0, e.g. 0.1")
    say("1/5 finding both models")
    sources: list[tracking.Source] = []
    failure: XAIError | None = None
    try:
        sources = [_resolve(ref, side) for ref, side in ((a, "A"), (b, "B"))]
    except XAIError as exc:
        failure = exc
    exp_id = sources[1].experiment_id if sources and not experiment else None
    with tracking.run_context(experiment, experiment_id=exp_id) as run:
        tracking.set_tags({tracking.ROLE_TAG: "compare", COMPARE_A_TAG: a, COMPARE_B_TAG: b})
        if failure is not None:
            raise failure
        src_a, src_b = sources
        tracking.set_tags({f"{COMPARE_A_TAG}_run_id": src_a.run_id, f"{COMPARE_B_TAG}_run_id": src_b.run_id})
        with tempfile.TemporaryDirectory(prefix="mlflow-xai-compare-") as tmp:
            return _compare_in_run(run.info.run_id, (a, b), (src_a, src_b), Path(tmp), rows=rows,
                                   fail_above=fail_above, device=device, data=data, bins=bins, say=say,
                                   allow_pickle=allow_pickle, task=task)


def _resolve(ref: str, side: str) -> tracking.Source:
    ref = (ref or "").strip()
    if not ref:
        raise XAIError(f"model {side} is empty; pass a run id or a model URI such as models:/NAME@ALIAS")
    if ":/" in ref:
        return tracking.resolve_source(None, ref, None)
    return tracking.resolve_source(ref, None, None)


@dataclass
class _Side:
    """One side of the comparison: our checkpoint (``meta`` set) or any MLflow PyTorch model."""

    model: Any
    meta: Any = None  # our checkpoint's CheckpointMeta
    config: dict[str, Any] | None = None
    model_format: str = "mlflow-xai checkpoint"
    model_dir: Path | None = None
    mlmodel: dict[str, Any] = field(default_factory=dict)

    def inputs(self, raw: np.ndarray) -> Any:
        """The raw rows as this model takes them: standardized as trained (ours), as they are (any other)."""
        import torch

        if self.meta is None:
            return torch.as_tensor(raw.astype(np.float32) if raw.dtype == np.float64 else raw)
        mean = np.asarray(self.meta.mean or np.zeros(raw.shape[1]), dtype=np.float64)
        std = np.asarray(self.meta.std or np.ones(raw.shape[1]), dtype=np.float64)
        return torch.as_tensor(((raw - mean) / std).astype(np.float32))

    def predictions(self, out: np.ndarray, task: str) -> np.ndarray:
        """Regression outputs of ours in the target's own units; any other model's as they are."""
        from mlflow_xai.data import raw_target

        if self.meta is None or task != "regression":
            return out
        return raw_target(out, self.meta.target_mean, self.meta.target_std)


def _load_side(source: tracking.Source, dst: Path, dev: str, allow_pickle: bool, side: str) -> _Side:
    dst.mkdir()
    if source.kind == "checkpoint":
        loaded = load_source(source, dst, dev)[0]
        return _Side(loaded.model, loaded.meta, loaded.cfg.to_dict())
    from mlflow_xai.sources.pytorch_model import load_pytorch_model

    model_dir = tracking.download_model(source, dst)
    loaded_model = load_pytorch_model(model_dir, source.model_uri, device=dev, allow_pickle=allow_pickle)
    if loaded_model.fixed_batch is not None:
        raise XAIError(f"model {side} ({source.model_uri}) was exported for batches of exactly "
                       f"{loaded_model.fixed_batch} rows; compare runs both models on one batch, so re-log it "
                       "with an input example of two or more rows")
    return _Side(loaded_model.model, model_format=loaded_model.format, model_dir=model_dir,
                 mlmodel=loaded_model.mlmodel)


def _rows(side_a: _Side, data: str | None, rows: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The raw rows both sides see, and compare.json's "data" without the task."""
    if side_a.meta is not None:
        ma = side_a.meta
        _, X, _ = explain_data(ma, data, rows)
        raw = X.astype(np.float64) * np.asarray(ma.std) + np.asarray(ma.mean)  # A's test rows, raw units
        return raw, {"data": ma.data, "rows": len(X), "feature_names": list(ma.feature_names)}
    from mlflow_xai.sources.inputs import load_model_inputs

    got = load_model_inputs(data, None, model_dir=side_a.model_dir, mlmodel=side_a.mlmodel, rows=rows)
    names = list(got.feature_names) if got.feature_names is not None else None
    return got.x, {"data": got.description, "rows": len(got.x), "feature_names": names}


def _side_dict(ref: str, source: tracking.Source, side: _Side) -> dict[str, Any]:
    return {"ref": ref, "run_id": source.run_id or None, "model_uri": source.model_uri,
            "registered_model": source.registered_name, "version": source.version,
            "n_params": sum(p.numel() for p in side.model.parameters()), "config": side.config,
            "model_format": side.model_format}


def _compare_in_run(run_id: str, refs: tuple[str, str], sources: tuple[tracking.Source, tracking.Source],
                    tmp: Path, **kwargs: Any) -> CompareOutcome:
    from mlflow_xai.figures.style import Painter

    with Painter() as paint:
        return _compare(paint, run_id, refs, sources, tmp, **kwargs)


def _compare(paint: Painter, run_id: str, refs: tuple[str, str], sources: tuple[tracking.Source, tracking.Source],
             tmp: Path, *, rows: int, fail_above: float | None, device: str, data: str | None, bins: int,
             say: Callable[[str], None], allow_pickle: bool = False, task: str = "auto") -> CompareOutcome:
    from mlflow_xai.figures.compare import drift_bars, overlaid_distributions, prediction_figure
    from mlflow_xai.figures.layers import heatmap
    from mlflow_xai.inspect.compare import (
        compare_activations,
        max_drift_layer,
        prediction_shift,
        weight_drift,
    )
    from mlflow_xai.inspect.summary import json_safe
    from mlflow_xai.reports.compare import render_compare_report
    from mlflow_xai.sources.inputs import resolve_task

    dev = resolve_device(device)
    say("2/5 downloading, verifying and loading both models")
    # Side by side: downloads wait on I/O, sha256 and torch.load release the GIL. A's error,
    # if both fail, is the one reported.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlflow-xai-load") as pool:
        loading = [pool.submit(_load_side, src, tmp / d, dev, allow_pickle, name)
                   for src, d, name in ((sources[0], "a", "A"), (sources[1], "b", "B"))]
        la, lb = (f.result() for f in loading)
    ma, mb = la.meta, lb.meta
    if ma is not None and mb is not None:
        if ma.task != mb.task:
            raise XAIError(f"A is a {ma.task} model and B a {mb.task} model; compare models of the same task")
        if ma.feature_names != mb.feature_names:
            raise XAIError(f"A and B take different inputs ({list(ma.feature_names)[:6]}... vs "
                           f"{list(mb.feature_names)[:6]}...); compare models trained on the same features")

    say("3/5 comparing weights, activations and predictions")
    raw, data_section = _rows(la, data, rows)
    for side, name in ((lb, "B"), (la, "A")):
        if side.meta is not None and (raw.ndim != 2 or raw.shape[1] != side.meta.n_in):
            raise XAIError(f"the rows have shape {tuple(raw.shape[1:])}, but model {name} was trained on "
                           f"{side.meta.n_in} features; pass the data both models take")
    drifts, only_a, only_b, mismatched = weight_drift(la.model, lb.model, bins=bins)
    # The weights' figures are drawn on the painter's thread while the activations compute.
    labels = ("A", "B")
    images: dict[str, Any] = {
        "weights/drift.png": paint(lambda: drift_bars(
            "weight drift ||W_B \u2212 W_A|| / ||W_A||", {n: d.relative_l2 for n, d in drifts.items()},
            threshold=fail_above)),
        "weights/distributions.png": paint(lambda: overlaid_distributions(
            "weights: A (blue) and B (orange)", {n: (d.hist_a, d.hist_b) for n, d in drifts.items()}, labels)),
    }
    for name, d in drifts.items():
        images[f"weights/{name}.png"] = paint(lambda n=name, v=d.diff: heatmap(f"{n} weight B \u2212 A", v))
    try:
        shifts, out_a, out_b = compare_activations(la.model, lb.model, la.inputs(raw), lb.inputs(raw), bins=bins)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise XAIError(f"the models do not both run on {data_section['data']} (rows of shape "
                       f"{tuple(raw.shape[1:])}): {first}; pass the data both models take") from exc
    known = ma or mb
    task = known.task if known is not None else resolve_task(task, tuple(out_a.shape))
    # Predictions in the target's own units, each of ours with its own scale.
    out_a, out_b = la.predictions(out_a, task), lb.predictions(out_b, task)
    preds = prediction_shift(out_a, out_b, task)
    target_name = str(known.target or "") if known is not None else ""

    gate_failure = None
    top = max_drift_layer(drifts)
    if fail_above is not None:
        if top is None:
            gate_failure = (f"A and B share no layer of the same shape, so their weight drift is unbounded "
                            f"(--fail-above {fail_above:g})")
        elif not top[1].relative_l2 <= fail_above:
            over = [n for n, d in drifts.items() if not d.relative_l2 <= fail_above]
            gate_failure = (f"layer {top[0]} drifted {top[1].relative_l2:.4g} > --fail-above {fail_above:g}"
                            + (f" ({len(over)} layers over: {', '.join(over[:8])})" if len(over) > 1 else ""))
    gate = None if fail_above is None else {
        "fail_above": fail_above, "passed": gate_failure is None,
        "message": gate_failure or f"every shared layer drifted <= {fail_above:g}"}

    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "a": _side_dict(refs[0], sources[0], la),
        "b": _side_dict(refs[1], sources[1], lb),
        "data": {**data_section, "task": task},
        "weights": {n: {"module_type": d.module_type, "shape": list(d.shape), "relative_l2": d.relative_l2,
                        "diff_l2": d.diff_l2, "max_abs_diff": d.max_abs_diff, "bias_relative_l2": d.bias_relative_l2,
                        "l2_a": d.stats_a.l2_norm, "l2_b": d.stats_b.l2_norm, "mean_a": d.stats_a.mean,
                        "mean_b": d.stats_b.mean, "std_a": d.stats_a.std, "std_b": d.stats_b.std}
                    for n, d in drifts.items()},
        "max_drift": {"layer": top[0], "value": top[1].relative_l2} if top else None,
        "activations": {n: {"module_type": s.module_type, "shape": list(s.shape), "relative_l2": s.relative_l2,
                            "wasserstein": s.wasserstein, "mean_shift": s.mean_shift, "mean_a": s.stats_a.mean,
                            "mean_b": s.stats_b.mean, "std_a": s.stats_a.std, "std_b": s.stats_b.std,
                            "dead_share_a": s.dead_share_a, "dead_share_b": s.dead_share_b}
                        for n, s in shifts.items()},
        "predictions": preds.to_dict(),
        "only_in_a": list(only_a),
        "only_in_b": list(only_b),
        "shape_mismatch": {n: {"a": list(sa), "b": list(sb)} for n, (sa, sb) in mismatched.items()},
        "fail_above": fail_above,
        "gate": gate,
    }

    say("4/5 drawing the figures")
    images["activations/shift.png"] = paint(lambda: drift_bars(
        "activation change ||act_B \u2212 act_A|| / ||act_A|| on the same rows",
        {n: s.relative_l2 for n, s in shifts.items()}, xlabel="relative L2 change"))
    images["activations/distributions.png"] = paint(lambda: overlaid_distributions(
        "activations on the same rows: A (blue) and B (orange)",
        {n: (s.hist_a, s.hist_b) for n, s in shifts.items()}, labels))
    images["predictions.png"] = paint(lambda: prediction_figure(
        preds, labels, unit=target_name if task == "regression" else ""))
    images = {path: blob.result() for path, blob in images.items()}

    say("5/5 logging the artifacts")
    out = tmp / "compare"
    for path, blob in images.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(blob)
    safe = json_safe(result)
    (out / "compare.json").write_text(json.dumps(safe, indent=2, allow_nan=False), encoding="utf-8")
    title = f"mlflow-xai compare: {refs[0]} (A) vs {refs[1]} (B)"
    (out / "report.html").write_text(render_compare_report(safe, images, title=title), encoding="utf-8")
    tracking.log_artifacts(out, "xai/compare")
    metrics: dict[str, float] = {f"weight_drift/{n}": d.relative_l2 for n, d in drifts.items()}
    metrics.update({f"activation_change/{n}": s.relative_l2 for n, s in shifts.items()})
    if top is not None:
        metrics["max_weight_drift"] = top[1].relative_l2
    for key in ("mean_abs_diff", "max_abs_diff", "rmse_diff", "agreement"):
        value = getattr(preds, key)
        if value is not None:
            metrics[f"prediction_{key}"] = value
    tracking.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    tags: dict[str, Any] = {"mlflow_xai.compare_layers_shared": len(drifts),
                            "mlflow_xai.compare_only_in_a": ",".join(only_a) or "none",
                            "mlflow_xai.compare_only_in_b": ",".join(only_b) or "none"}
    if top is not None:
        tags["mlflow_xai.max_drift_layer"] = top[0]
    if gate is not None:
        tags[GATE_TAG] = "passed" if gate["passed"] else "failed"
    tracking.set_tags({k: str(v)[:5000] for k, v in tags.items()})
    artifacts = sorted(["xai/compare/" + p for p in images] + ["xai/compare/compare.json",
                                                               "xai/compare/report.html"])
    return CompareOutcome(run_id, safe, gate_failure, artifacts)
