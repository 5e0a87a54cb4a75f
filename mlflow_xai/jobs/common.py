"""What the three jobs share: the progress line, the device, our own train run's
checkpoint (downloaded, checksum-verified, loaded safely) and the test rows it was
trained on."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow_xai import tracking
from mlflow_xai.errors import XAIError


def progress_printer(quiet: bool) -> Callable[[str], None]:
    """One line per stage on stderr when it is a terminal and not ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        return lambda _msg: None
    return lambda msg: print(f"[mlflow-xai] {msg}", file=sys.stderr, flush=True)


def explain_data(meta: Any, data_override: str | None, batch_rows: int) -> tuple[Any, Any, Any]:
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


def load_source(source: tracking.Source, dst: Path, device: str) -> tuple[Any, Any]:
    """The source run's checkpoint, downloaded into ``dst``, checksum-verified and loaded
    safely on ``device``; and the train run it came from."""
    from mlflow_xai.checkpoint import load_checkpoint, verify_checksum

    path, sha, train_run = tracking.download_checkpoint(source, dst)
    verify_checksum(path, sha, f"run {source.run_id}")
    return load_checkpoint(path, device), train_run


def resolve_device(device: str) -> str:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be there."""
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
