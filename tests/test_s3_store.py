"""An S3-compatible artifact store behind the team's ``mlflow server``: train and explain through it.

moto's server mode plays the object store on 127.0.0.1 (the S3 API, as MinIO or Ceph
offer it); the ``mlflow server`` proxies artifacts into ``s3://team-artifacts/mlflow``
(``--artifacts-destination``, endpoint in ``MLFLOW_S3_ENDPOINT_URL``), so the users'
processes need no S3 credentials: only the server has them. The objects are then read
back from the bucket with boto3: what the server stored is what mlflow-xai logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from tests.mlflow_server import MlflowServer, free_port, use_server

pytestmark = pytest.mark.server

BUCKET = "team-artifacts"
# Placeholders moto accepts; nothing leaves 127.0.0.1.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """moto's S3 on a free port with an empty bucket, and an ``mlflow server`` storing artifacts there."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency: `pip install -e '.[test]'`")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency: "
                                                            "`pip install -e '.[test]'`")
    port = free_port()
    s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    server = None
    try:
        bucket = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        bucket.create_bucket(Bucket=BUCKET)
        server = MlflowServer(tmp_path_factory.mktemp("s3-server"), artifacts_destination=f"s3://{BUCKET}/mlflow",
                              env={"MLFLOW_S3_ENDPOINT_URL": endpoint, **CREDENTIALS})
        server.start()
        yield {"server": server, "s3": bucket}
    finally:
        if server is not None:
            server.stop()
        s3.stop()


def test_train_and_explain_through_an_s3_artifact_store(s3_server: dict[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow_xai.cli import main

    server: MlflowServer = s3_server["server"]
    use_server(monkeypatch, server.uri, tmp_path)
    for key in CREDENTIALS:  # the users' side has no S3 access: everything goes through the server
        monkeypatch.delenv(key, raising=False)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"hidden_sizes": [8, 4], "epochs": 2, "batch_size": 64}))
    runner = CliRunner()
    train = runner.invoke(main, ["train", "--quiet", "--no-monitor", "--config", str(cfg), "--experiment", "s3"])
    assert train.exit_code == 0, (train.output, train.exception)
    train_id = train.stdout.split("train run: ", 1)[1].split()[0]
    explain = runner.invoke(main, ["explain", "--quiet", "--run-id", train_id, "--attributions", "none"])
    assert explain.exit_code == 0, (explain.output, explain.exception)
    explain_id = explain.stdout.split("explain run: ", 1)[1].split()[0]

    client = MlflowClient(server.uri)
    assert {client.get_run(r).info.status for r in (train_id, explain_id)} == {"FINISHED"}
    # In the bucket: the train run's checkpoint with the recorded checksum, the explain run's report.
    keys = {o["Key"] for page in s3_server["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])}
    ckpt = next(k for k in keys if k.endswith(f"{train_id}/artifacts/checkpoints/last.ckpt"))
    assert ckpt.startswith("mlflow/")
    assert any(k.endswith(f"{explain_id}/artifacts/xai/report.html") for k in keys)
    assert any(k.endswith(f"{explain_id}/artifacts/xai/summary.json") for k in keys)
    stored = tmp_path / "from-bucket.ckpt"
    s3_server["s3"].download_file(BUCKET, ckpt, str(stored))
    assert client.get_run(train_id).data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(stored)
    # Nothing went to the server's local folder instead.
    assert not server.artifacts.exists() or not any(server.artifacts.rglob("last.ckpt"))
