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

from mlflow_xai.config import TunedConfig
from mlflow_xai.errors import XAIError
from mlflow_xai.nets import MLP, NET_PREFIX

_META_KEYS = ("config", "n_in", "n_out", "task", "feature_names")


@dataclass(frozen=True)
class LoadedModel:
    """A network rebuilt from a checkpoint, with what the checkpoint says about it."""

    model: MLP
    cfg: TunedConfig
    meta: dict[str, Any]


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
    meta = ckpt.get("mlflow_xai") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        raise XAIError(
            f"checkpoint {path.name} carries no mlflow-xai config; it was not written by `mlflow-xai train`"
        )
    cfg = TunedConfig.from_dict(meta["config"])
    n_in, n_out = meta["n_in"], meta["n_out"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n_in, n_out)):
        raise XAIError(f"checkpoint {path.name} has invalid input/output sizes {n_in!r}/{n_out!r}")
    if meta["task"] not in ("regression", "classification"):
        raise XAIError(f"checkpoint {path.name} names an unknown task {meta['task']!r}")
    cfg.check_size(n_in, n_out)  # before any allocation
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
