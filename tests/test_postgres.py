"""The team set-up: the whole workflow, and concurrent jobs, against an ``mlflow server`` on PostgreSQL.

One PostgreSQL and one server (two workers, proxied artifacts) serve the module
(``postgres_mlflow_server`` in tests/postgres.py; its own pytest-xdist group). Every
search mlflow-xai makes goes through PostgreSQL's SQL here: the latest train run by tag
and start time, the finished runs of a tuning study, registered versions by run id,
versions by alias. The workflow runs in-process through click (one import); the load
is real processes, as a team's users start them. Skipped with the reason where
PostgreSQL cannot run (``.ci/run`` installs Debian's ``postgresql``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_xai.checkpoint import sha256_file
from tests.conftest import env_for
from tests.mlflow_server import MlflowServer, snapshot, use_server
from tests.registry_study import log_trial

pytestmark = [pytest.mark.postgres, pytest.mark.server]

NAME = "team-net"
# The load's trainings: the smallest real network and few epochs (what is checked is the
# server path under concurrency, not the fit).
LOAD_CONFIG = {"hidden_sizes": [8, 4], "epochs": 3, "batch_size": 64, "patience": 3}
N_EXPLAINS, N_TRAINS = 8, 2


def _cli(args: list[str]) -> str:
    from mlflow_xai.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _id(label: str, out: str) -> str:
    match = re.search(rf"{label}: ([0-9a-f]{{32}})", out)
    assert match, out
    return match[1]


@pytest.fixture(scope="module")
def workflow(postgres_mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tuning study, two trained and registered versions, two explains and a compare, all on PostgreSQL.

    ``tune``: three finished trials (the best by val_loss is the second; by r2 the third)
    and a failed one with the best value of both, never to be picked. ``team``: v1 of
    ``team-net`` (@champion) from a config file, v2 (@challenger) from the study's best
    trial; an explain of the latest train run (v2's), one of ``models:/team-net@champion``;
    a compare of the two aliases.
    """
    root = tmp_path_factory.mktemp("team")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps({"l1": 1, "epochs": 3, "batch_size": 32, "patience": 2}))
    with pytest.MonkeyPatch.context() as mp:
        use_server(mp, postgres_mlflow_server.uri, root)
        mlflow.set_experiment("tune")
        trials = (
            log_trial({"l1": "1", "epochs": "2", "batch_size": "32", "act_fn": "ReLU()"}, {"val_loss": 0.5, "r2": 0.2}),
            log_trial({"l1": "1", "epochs": "2", "batch_size": "64", "act_fn": "ReLU"}, {"val_loss": 0.3, "r2": 0.1}),
            log_trial({"l1": "1", "epochs": "2", "batch_size": "16", "act_fn": "Tanh"}, {"val_loss": 0.9, "r2": 0.6}),
            log_trial({"l1": "1", "act_fn": "ReLU"}, {"val_loss": 0.01, "r2": 0.99}, status="FAILED"),
        )
        out = {"root": root, "trials": trials}
        out["train1_out"] = _cli(["train", "--quiet", "--config", str(cfg), "--experiment", "team",
                                  "--register-as", NAME, "--alias", "champion", "--no-monitor"])
        out["train2_out"] = _cli(["train", "--quiet", "--config-from-experiment", "tune", "--metric", "val_loss",
                                  "--mode", "min", "--experiment", "team", "--register-as", NAME,
                                  "--alias", "challenger", "--no-monitor"])
        out["train1"], out["train2"] = _id("train run", out["train1_out"]), _id("train run", out["train2_out"])
        out["latest_out"] = _cli(["explain", "--quiet", "--experiment", "team", "--attributions", "none"])
        out["alias_out"] = _cli(["explain", "--quiet", "--model-uri", f"models:/{NAME}@champion"])
        out["compare_out"] = _cli(["compare", "--quiet", "--rows", "32", f"models:/{NAME}@champion",
                                   f"models:/{NAME}@challenger"])
    for key in ("latest", "alias"):
        out[key] = _id("explain run", out[f"{key}_out"])
    out["compare"] = _id("compare run", out["compare_out"])
    return out


def _table_count(server: MlflowServer, table: str) -> int:
    import psycopg

    conninfo = server.store_uri.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def _checkpoint_verified(client: MlflowClient, run_id: str, dst: Path) -> None:
    """The run's last.ckpt, downloaded through the server, has the checksum its tag records."""
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, "checkpoints/last.ckpt", str(dst)))
    assert client.get_run(run_id).data.tags["mlflow_xai.checkpoint_sha256"] == sha256_file(local), run_id


def _epochs_complete(client: MlflowClient, run_id: str) -> None:
    """``train_loss`` and ``val_loss`` once for every epoch the run trained, nothing missing or doubled."""
    run = client.get_run(run_id)
    epochs = int(run.data.metrics["epochs_run"])
    assert epochs >= 1
    for key in ("train_loss", "val_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(epochs)), (run_id, key, steps, epochs)


def test_the_store_is_postgres_and_holds_the_runs(postgres_mlflow_server: MlflowServer,
                                                  workflow: dict[str, Any]) -> None:
    assert postgres_mlflow_server.store_uri.startswith("postgresql+psycopg://")
    # 4 trials, 2 trains, 2 explains, 1 compare at least (the load test may have added more).
    assert _table_count(postgres_mlflow_server, "runs") >= 9
    assert _table_count(postgres_mlflow_server, "model_versions") >= 2


def test_train_registers_versions_with_aliases_and_the_best_trials_config(
        postgres_mlflow_server: MlflowServer, workflow: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(postgres_mlflow_server.uri)
    v1 = client.get_model_version_by_alias(NAME, "champion")
    v2 = client.get_model_version_by_alias(NAME, "challenger")
    assert (v1.version, v1.run_id) == ("1", workflow["train1"])
    assert (v2.version, v2.run_id) == ("2", workflow["train2"])
    assert f"registered: models:/{NAME}/1" in workflow["train1_out"]
    # The best finished trial by val_loss (min): the second; the failed one is never picked.
    best = workflow["trials"][1]
    run2 = client.get_run(workflow["train2"])
    assert run2.data.params["batch_size"] == "64" and run2.data.params["act_fn"] == "ReLU"
    assert v2.tags["mlflow_xai.config_source_run_id"] == best
    assert v2.tags["mlflow_xai.train_run_id"] == workflow["train2"]
    assert "mlflow_xai.config_source_run_id" not in v1.tags
    for rid in (workflow["train1"], workflow["train2"]):
        assert client.get_run(rid).info.status == "FINISHED"
        _checkpoint_verified(client, rid, tmp_path / rid)
        _epochs_complete(client, rid)


def test_the_searches_on_postgres(postgres_mlflow_server: MlflowServer, workflow: dict[str, Any],
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lookup of tracking/, run directly against the PostgreSQL-backed server."""
    from mlflow_xai import tracking

    use_server(monkeypatch, postgres_mlflow_server.uri, tmp_path)
    t1, t2, t3, _failed = workflow["trials"]
    assert tracking.best_run("tune", "val_loss", "min")[0].info.run_id == t2
    assert tracking.best_run("tune", "r2", "max")[0].info.run_id == t3
    assert tracking.best_run("tune", "val_loss", "min")[1] == 3  # finished candidates only
    latest = tracking.resolve_source(None, None, "team")
    assert latest.run_id == workflow["train2"]
    assert tracking.latest_version(NAME, workflow["train1"]) == "1"
    client = MlflowClient(postgres_mlflow_server.uri)
    client.create_registered_model("team's net")  # a quote in the name: no filter string can hold it
    client.create_model_version("team's net", f"runs:/{workflow['train2']}/model", run_id=workflow["train2"])
    assert tracking.latest_version("team's net", workflow["train2"]) == "1"
    by_alias = tracking.resolve_source(None, f"models:/{NAME}@challenger", None)
    assert (by_alias.run_id, by_alias.version, by_alias.registered_name) == (workflow["train2"], "2", NAME)
    # A run that is not ours: its logged model is found by source run id (search_logged_models; the
    # lookup reads no file, so a logged model record without weights is enough here).
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("own-models")) as own:
        info = mlflow.initialize_logged_model(name="model", source_run_id=own.info.run_id)
    found = tracking.resolve_source(own.info.run_id, None, None)
    assert (found.kind, found.run_id, found.artifact_uri) == ("model", own.info.run_id, f"models:/{info.model_id}")


def test_explain_of_the_latest_run_and_of_an_alias_tags_the_version(
        postgres_mlflow_server: MlflowServer, workflow: dict[str, Any]) -> None:
    client = MlflowClient(postgres_mlflow_server.uri)
    assert f"(explains train run {workflow['train2']})" in workflow["latest_out"]
    assert f"(explains train run {workflow['train1']})" in workflow["alias_out"]
    for key, source in (("latest", workflow["train2"]), ("alias", workflow["train1"])):
        run = client.get_run(workflow[key])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow_xai.role"] == "explain"
        assert run.data.tags["mlflow_xai.source_run_id"] == source
        assert {"xai/report.html", "xai/summary.json", "xai/architecture.dot"} <= snapshot(client, workflow[key])[
            "artifacts"]
    tags = client.get_model_version(NAME, "1").tags
    assert tags["mlflow_xai.explain_run_id"] == workflow["alias"]
    assert tags["mlflow_xai.explain_report"] == f"runs:/{workflow['alias']}/xai/report.html"
    assert tags["mlflow_xai.train_run_id"] == workflow["train1"]
    assert float(tags["mlflow_xai.dead_unit_share"]) >= 0 and "mlflow_xai.ig_completeness_error_max" in tags
    # Explaining the latest run by id tags no version.
    assert "mlflow_xai.explain_run_id" not in client.get_model_version(NAME, "2").tags


def test_compare_of_two_aliases(postgres_mlflow_server: MlflowServer, workflow: dict[str, Any]) -> None:
    client = MlflowClient(postgres_mlflow_server.uri)
    run = client.get_run(workflow["compare"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_xai.role"] == "compare"
    assert run.data.tags["mlflow_xai.compare_a_run_id"] == workflow["train1"]
    assert run.data.tags["mlflow_xai.compare_b_run_id"] == workflow["train2"]
    assert {"xai/compare/report.html", "xai/compare/compare.json"} <= snapshot(client, workflow["compare"])["artifacts"]


def _verify_artifacts(client: MlflowClient, run_id: str, dst: Path) -> set[str]:
    """Download every artifact of the run; each file has the size the server lists. Returns the paths."""
    listed: dict[str, int | None] = {}

    def walk(path: str | None = None) -> None:
        for f in client.list_artifacts(run_id, path):
            if f.is_dir:
                walk(f.path)
            else:
                listed[f.path] = f.file_size
    walk()
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, "", str(dst)))
    for path, size in listed.items():
        assert (local / path).stat().st_size == size, (run_id, path)
    return set(listed)


def test_concurrent_explains_trains_and_a_compare_lose_nothing(
        postgres_mlflow_server: MlflowServer, workflow: dict[str, Any], tmp_path: Path) -> None:
    """8 explains (6 by run id, 2 by alias: they tag the same version), 2 trains and a compare, all at once."""
    uri = postgres_mlflow_server.uri
    cfg = tmp_path / "load.json"
    cfg.write_text(json.dumps(LOAD_CONFIG))
    env = env_for(uri, tmp_path / "work")
    explain = [sys.executable, "-m", "mlflow_xai", "explain", "--quiet", "--experiment", "load",
               "--attributions", "none"]
    jobs = ([("explain", [*explain, "--run-id", workflow["train1"]])] * (N_EXPLAINS - 2)
            + [("explain", [*explain, "--model-uri", f"models:/{NAME}@champion"])] * 2
            + [("train", [sys.executable, "-m", "mlflow_xai", "train", "--quiet", "--config", str(cfg),
                          "--experiment", "load"])] * N_TRAINS
            + [("compare", [sys.executable, "-m", "mlflow_xai", "compare", "--quiet", "--rows", "32",
                            "--experiment", "load", workflow["train1"], workflow["train2"]])])
    procs = [(kind, subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)) for kind, cmd in jobs]
    ids: dict[str, list[str]] = {"explain": [], "train": [], "compare": []}
    for kind, proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (kind, stderr[-3000:])
        ids[kind].append(_id(f"{kind} run", stdout))
    assert [len(ids[k]) for k in ("explain", "train", "compare")] == [N_EXPLAINS, N_TRAINS, 1]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("load")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    assert set(runs) == {i for v in ids.values() for i in v}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="attributes.status = 'RUNNING'")
    assert everywhere == []  # no run left RUNNING anywhere on the server

    listings = [_verify_artifacts(client, rid, tmp_path / "dl" / rid) for rid in ids["explain"]]
    assert all(listing == listings[0] for listing in listings)  # each complete, none mixed into another
    assert {"xai/report.html", "xai/summary.json"} <= listings[0] and len(listings[0]) > 20
    for rid in ids["train"]:
        arts = _verify_artifacts(client, rid, tmp_path / "dl" / rid)
        assert {"config.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= arts
        _checkpoint_verified(client, rid, tmp_path / "ck" / rid)
        _epochs_complete(client, rid)
    assert {"xai/compare/compare.json"} <= _verify_artifacts(client, ids["compare"][0], tmp_path / "dl" / "cmp")
    # The two explains by alias raced to tag version 1: the tag names one of them.
    assert client.get_model_version(NAME, "1").tags["mlflow_xai.explain_run_id"] in ids["explain"][-2:]
    # The explained train runs are untouched by all of it.
    _checkpoint_verified(client, workflow["train1"], tmp_path / "after")
