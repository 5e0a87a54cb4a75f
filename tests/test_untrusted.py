"""Untrusted artifacts pulled through a real ``mlflow server``: forged checkpoint configs, escaping paths.

The pickled-code and tampered-checksum cases live in test_explain.py (sqlite store);
here a forged train run on the server carries a checkpoint whose embedded config names
an unknown architecture key or an absurd size, with a matching sha256 tag so that only
the config check can stop it. Each ends in one line and a FAILED explain run, before any
network is built.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_xai import tracking
from mlflow_xai.checkpoint import sha256_file
from mlflow_xai.errors import XAIError
from tests.mlflow_server import MlflowServer, snapshot, use_server

pytestmark = pytest.mark.server


def _forged_run(uri: str, served: dict[str, Any], tmp_path: Path, edit: Any) -> str:
    """A run tagged as a train run whose last.ckpt is the served one with ``edit`` applied to its meta."""
    good = Path(mlflow.artifacts.download_artifacts(run_id=served["train_run_id"], artifact_path="checkpoints/last.ckpt",
                                                    dst_path=str(tmp_path / "good"), tracking_uri=uri))
    ckpt = torch.load(good, weights_only=True)
    edit(ckpt["mlflow_xai"])
    forged = tmp_path / "upload" / "last.ckpt"
    forged.parent.mkdir()
    torch.save(ckpt, forged)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("forged") or client.get_experiment(client.create_experiment("forged"))
    run_id = client.create_run(exp.experiment_id, tags={"mlflow_xai.role": "train",
                                                        "mlflow_xai.checkpoint_sha256": sha256_file(forged)}).info.run_id
    client.log_artifact(run_id, str(forged), "checkpoints")
    client.set_terminated(run_id)
    return run_id


def _set(key: str, value: Any) -> Any:
    return lambda meta: meta["config"].__setitem__(key, value)


@pytest.mark.parametrize(("edit", "expect"), [
    (_set("nodes", 3), r"unknown config key 'nodes'; valid keys:"),
    (_set("hidden_sizes", [10**12]), r"hidden_sizes has a layer of 1000000000000 units, over the limit"),
    (_set("l1", 10**12), r"config l1=1000000000000 is over the limit"),
    (lambda meta: meta.__setitem__("n_in", 10**12), r"hidden layer of 2000000000000 units .* over the limit"),
    (_set("act_fn", "os.system"), r"act_fn='os.system' is not supported"),
], ids=["unknown-key", "layer-1e12", "l1-1e12", "inputs-1e12", "unknown-activation"])
def test_forged_checkpoint_config_is_refused_before_anything_is_built(
        mlflow_server: MlflowServer, served: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        edit: Any, expect: str) -> None:
    import mlflow_xai.checkpoint as checkpoint
    from mlflow_xai.jobs.explain import explain_and_log

    client = MlflowClient(mlflow_server.uri)
    run_id = _forged_run(mlflow_server.uri, served, tmp_path, edit)
    use_server(monkeypatch, mlflow_server.uri, tmp_path)

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a network was built from a refused config")

    monkeypatch.setattr(checkpoint, "MLP", no_network)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(XAIError, match=expect) as caught:
        explain_and_log(run_id=run_id, attributions="none", quiet=True)
    assert "\n" not in str(caught.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: nothing big allocated
    failed = client.search_runs([client.get_experiment_by_name("forged").experiment_id],
                                filter_string=f"tags.`mlflow_xai.source_run_id` = '{run_id}'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert re.search(expect, failed[0].data.tags["mlflow_xai.error"])
    assert snapshot(client, served["train_run_id"]) == served["train_before"]


@pytest.mark.parametrize("path", ["../last.ckpt", "checkpoints/../../last.ckpt", "/etc/passwd", "..",
                                  "checkpoints/..\\..\\last.ckpt", "C:\\x\\last.ckpt", "checkpoints//last.ckpt", ""])
def test_artifact_paths_never_escape_the_download_folder(tmp_path: Path, path: str) -> None:
    with pytest.raises(XAIError, match="refusing it"):
        tracking.local_artifact_path(tmp_path, path, "run 0123")


def test_a_plain_artifact_path_stays_inside(tmp_path: Path) -> None:
    assert tracking.local_artifact_path(tmp_path, "checkpoints/last.ckpt", "run 0123") == \
        (tmp_path / "checkpoints" / "last.ckpt").resolve()
