"""Safe loading of a checkpoint pulled from an artifact store (untrusted input).

The file's sha256 is checked against the one recorded at training time, tensors are
loaded with ``torch.load(weights_only=True)`` (never falling back to unsafe loading),
the config inside the checkpoint is validated like a user's config, its size checked
before anything is allocated, and the network rebuilt from it. Only the network's
weights are read into memory: the file is memory-mapped, so the optimizer state in it
costs nothing.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlflow_xai.config import SplitSpec, TunedConfig
from mlflow_xai.data import Dataset, Split
from mlflow_xai.errors import XAIError
from mlflow_xai.nets import MLP, NET_PREFIX

#: The version of the metadata layout below; a checkpoint without one is of version 1.
CHECKPOINT_FORMAT = 1
_REQUIRED = ("config", "n_in", "n_out", "task", "feature_names")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint of ``mlflow-xai train`` says about itself.

    Stored under ``ckpt["mlflow_xai"]`` as plain Python types (:meth:`to_dict`), so the
    checkpoint loads with ``torch.load(weights_only=True)``; read back and validated by
    :meth:`from_dict`, where the keys older checkpoints lack take the defaults below.
    """

    config: TunedConfig
    n_in: int
    n_out: int
    task: str  # "regression" or "classification"
    feature_names: tuple[str, ...]
    classes: tuple[str, ...] = ()  # class labels in index order (classification)
    target: str | None = None
    data: str = "diabetes"  # the data as the train run was given it
    split: SplitSpec = SplitSpec()
    mean: tuple[float, ...] | None = None  # the features' standardization (training part)
    std: tuple[float, ...] | None = None
    target_mean: float = 0.0  # a regression target's standardization
    target_std: float = 1.0
    format: int = CHECKPOINT_FORMAT

    @classmethod
    def describe(cls, cfg: TunedConfig, ds: Dataset, split: Split, data_spec: str) -> CheckpointMeta:
        """The metadata of a fit of ``cfg`` on ``ds`` split by ``split``."""
        return cls(config=cfg, n_in=int(ds.X.shape[1]), n_out=int(ds.n_out), task=ds.task,
                   feature_names=tuple(ds.feature_names), classes=tuple(ds.classes), target=ds.target,
                   data=data_spec, split=split.spec, mean=tuple(float(v) for v in split.mean),
                   std=tuple(float(v) for v in split.std), target_mean=float(split.y_mean),
                   target_std=float(split.y_std))

    def to_dict(self) -> dict[str, Any]:
        """The stored form: plain Python types, the keys of format 1."""
        return {
            "format": self.format, "config": self.config.to_dict(), "n_in": self.n_in, "n_out": self.n_out,
            "task": self.task, "feature_names": list(self.feature_names), "classes": list(self.classes),
            "target": self.target, "data": self.data, "test_size": self.split.test_size, "seed": self.split.seed,
            "val_fraction": self.split.val_fraction,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "target_mean": self.target_mean, "target_std": self.target_std,
        }

    @classmethod
    def from_dict(cls, meta: Any, name: str = "checkpoint") -> CheckpointMeta:
        """Validate the stored form (untrusted: it comes from an artifact store)."""
        if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED):
            raise XAIError(f"{name} carries no mlflow-xai config; it was not written by `mlflow-xai train`")
        cfg = TunedConfig.from_dict(meta["config"])
        n_in, n_out = meta["n_in"], meta["n_out"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n_in, n_out)):
            raise XAIError(f"{name} has invalid input/output sizes {n_in!r}/{n_out!r}")
        if meta["task"] not in ("regression", "classification"):
            raise XAIError(f"{name} names an unknown task {meta['task']!r}")
        cfg.check_size(n_in, n_out)  # before anything is allocated for the network
        names = meta["feature_names"]
        if not isinstance(names, (list, tuple)) or len(names) != n_in or not all(isinstance(n, str) for n in names):
            raise XAIError(f"{name} has feature names that do not match its {n_in} inputs")
        fmt = meta.get("format", 1)
        if fmt != CHECKPOINT_FORMAT:
            raise XAIError(f"{name} has metadata format {fmt!r}; this mlflow-xai reads format {CHECKPOINT_FORMAT}, "
                           "upgrade mlflow-xai to read it")
        defaults = SplitSpec()
        try:
            split = SplitSpec(test_size=float(meta.get("test_size", defaults.test_size)),
                              seed=int(meta.get("seed", defaults.seed)),
                              val_fraction=float(meta.get("val_fraction", defaults.val_fraction)))
            mean, std = (None if meta.get(k) is None else tuple(float(v) for v in meta[k]) for k in ("mean", "std"))
            target_mean, target_std = float(meta.get("target_mean", 0.0)), float(meta.get("target_std", 1.0))
        except (TypeError, ValueError) as exc:
            raise XAIError(f"{name} has an invalid split or standardization ({exc})") from exc
        if any(v is not None and len(v) != n_in for v in (mean, std)):
            raise XAIError(f"{name} has a standardization that does not match its {n_in} inputs")
        return cls(config=cfg, n_in=n_in, n_out=n_out, task=meta["task"], feature_names=tuple(names),
                   classes=tuple(str(c) for c in meta.get("classes") or ()), target=meta.get("target"),
                   data=str(meta.get("data") or "diabetes"), split=split, mean=mean, std=std,
                   target_mean=target_mean, target_std=target_std, format=fmt)


@dataclass(frozen=True)
class LoadedModel:
    """A network rebuilt from a checkpoint, with what the checkpoint says about it."""

    model: MLP
    cfg: TunedConfig
    meta: CheckpointMeta


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str | None, source: str) -> None:
    """Refuse a checkpoint whose sha256 differs from the recorded one (or has none recorded)."""
    if not expected:
        raise XAIError(
            f"{source} has no recorded checkpoint checksum (tag mlflow_xai.checkpoint_sha256); "
            "only checkpoints logged by `mlflow-xai train` can be explained"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise XAIError(
            f"checkpoint of {source} does not match its recorded sha256 "
            f"({actual[:12]}... != {expected[:12]}...); it was changed after training, refusing to load it"
        )


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``last.ckpt`` safely and rebuild the network on ``device`` in eval mode."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise XAIError(
            f"checkpoint {path.name} holds pickled objects that would need code to load; "
            "refusing it (only weights are loaded, never code)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file, any reader error
        raise XAIError(
            f"checkpoint {path.name} is not a readable torch checkpoint ({type(exc).__name__}); "
            "retrain or re-upload it"
        ) from exc
    meta = CheckpointMeta.from_dict(ckpt.get("mlflow_xai") if isinstance(ckpt, dict) else None,
                                    f"checkpoint {path.name}")
    cfg, n_in, n_out = meta.config, meta.n_in, meta.n_out
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise XAIError(f"checkpoint {path.name} has no state_dict; it is not a Lightning checkpoint")
    net_state = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    with torch.device("meta"):
        model = MLP(cfg, n_in, n_out)  # shapes only; the weights come from the file
    try:
        model.load_state_dict(net_state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise XAIError(
            f"checkpoint {path.name} does not match the network its config describes ({first})"
        ) from exc
    model = model.to(device).eval()
    return LoadedModel(model=model, cfg=cfg, meta=meta)
