"""Registry workflows on a real sqlite store: the config from a tuning run, lineage tags, explanations on versions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_xai import tracking
from mlflow_xai.cli import main
from mlflow_xai.config import TunedConfig
from mlflow_xai.errors import XAIError
from mlflow_xai.jobs.explain import explain_and_log
from tests.conftest import _isolate
from tests.registry_study import log_trial as _trial


@pytest.fixture(scope="module")
def reg(registry_study: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, registry_study["root"])
        yield registry_study


def test_best_run_in_min_and_max_mode(reg: dict[str, Any]) -> None:
    t1, t2, t3 = reg["trials"]
    assert tracking.best_run("tune", "val_loss", "min")[0].info.run_id == t2
    best, n = tracking.best_run("tune", "val_loss", "max")
    assert best.info.run_id == t3 and n == 3  # the FAILED trial is no candidate
    assert tracking.best_run("tune", "r2", "max")[0].info.run_id == t3
    assert tracking.best_run("tune", "r2", "min")[0].info.run_id == t2


def test_config_from_params_reads_config_keys_only() -> None:
    cfg, filled = TunedConfig.from_params({"l1": "4", "act_fn": "relu", "lr_mult": "2", "batch_norm": "true",
                                           "hidden_sizes": "[8, 4]", "optuna_trial": "7", "patience": ""})
    assert (cfg.l1, cfg.act_fn, cfg.lr_mult, cfg.batch_norm, cfg.hidden_sizes) == (4, "ReLU", 2.0, True, (8, 4))
    assert "patience" in filled and "l1" not in filled and cfg.patience == TunedConfig().patience
    with pytest.raises(XAIError, match="param epochs='ten' is not an integer"):
        TunedConfig.from_params({"epochs": "ten"})
    with pytest.raises(XAIError, match=r"config l1=2.5 is invalid"):
        TunedConfig.from_params({"l1": "2.5"})


def test_train_from_experiment_and_from_run_records_the_lineage(reg: dict[str, Any]) -> None:
    client = MlflowClient()
    t1, t2, _ = reg["trials"]
    r1 = client.get_run(reg["v1"].run_id)
    assert r1.info.status == "FINISHED"
    assert (r1.data.params["lr_mult"], r1.data.params["epochs"], r1.data.params["batch_size"]) == ("3.0", "2", "64")
    assert "trial_number" not in r1.data.params
    tags = r1.data.tags
    assert tags["mlflow_xai.config_source_run_id"] == t2
    assert tags["mlflow_xai.config_source_experiment"] == "tune"
    assert (tags["mlflow_xai.config_source_metric"], tags["mlflow_xai.config_source_mode"]) == ("val_loss", "min")
    assert "patience" in tags["mlflow_xai.config_defaults_filled"].split(",")
    assert reg["v1"].config_source_run_id == t2

    r2 = client.get_run(reg["v2"].run_id)
    assert r2.data.params["act_fn"] == "ReLU" and r2.data.tags["mlflow_xai.config_source_run_id"] == t1

    # One printed line each: where the config came from and what was filled from the defaults.
    first, second = reg["lines"]
    assert first.startswith(f"config from run {t2} (best of 3 finished runs of experiment 'tune' by val_loss=0.3")
    assert "filled from the defaults: optimizer=Adam, dropout_prob=0.01, patience=8" in first
    assert "\n" not in first and second.startswith(f"config from run {t1} (given run)")

    # The version points back to its train run and the tuning trial.
    for version, run_id, trial in (("1", reg["v1"].run_id, t2), ("2", reg["v2"].run_id, t1)):
        mv = client.get_model_version("reg", version)
        assert mv.run_id == run_id
        assert mv.tags["mlflow_xai.train_run_id"] == run_id
        assert mv.tags["mlflow_xai.config_source_run_id"] == trial


def test_explain_by_alias_tags_the_version_with_diagnostics_and_lineage(reg: dict[str, Any]) -> None:
    client = MlflowClient()
    # A stale tag from an earlier explanation with attributions; this one has none.
    client.set_model_version_tag("reg", "2", "mlflow_xai.ig_completeness_error_max", "0.5")
    out = explain_and_log(model_uri="models:/reg@challenger", attributions="none", quiet=True)
    assert out.source.version == "2" and out.source.run_id == reg["v2"].run_id
    tags = client.get_model_version("reg", "2").tags
    assert tags["mlflow_xai.explain_run_id"] == out.run_id
    assert tags["mlflow_xai.explain_report"] == f"runs:/{out.run_id}/xai/report.html"
    run = client.get_run(out.run_id)
    for key in ("dead_unit_share", "nan_count", "inf_count", "max_grad_norm", "batch_loss"):
        assert float(tags[f"mlflow_xai.{key}"]) == pytest.approx(run.data.metrics[key]), key
    assert "mlflow_xai.ig_completeness_error_max" not in tags
    assert tags["mlflow_xai.explain_findings"]
    assert tags["mlflow_xai.train_run_id"] == reg["v2"].run_id
    assert tags["mlflow_xai.config_source_run_id"] == reg["trials"][0]
    assert "mlflow_xai.explain_run_id" not in client.get_model_version("reg", "1").tags  # the other version


def _cli_train(args: list[str]) -> Any:
    return CliRunner().invoke(main, ["train", "--quiet", "--no-monitor", "--experiment", "bad", *args])


def _last_run(experiment: str) -> Any:
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        ("no_params", ["--config-from-run", "RUN"], "has none of the config keys (l1, epochs"),
        ("bad_value", ["--config-from-run", "RUN"], "params of run RUN: param l1='wide' is not an integer"),
        (None, ["--config-from-run", "0123456789abcdef0123456789abcdef"], "run '0123456789abcdef0123456789abcdef' "
                                                                          "was not found"),
        (None, ["--config-from-experiment", "nosuch", "--metric", "val_loss"], "tuning experiment 'nosuch' does "
                                                                                "not exist"),
        ("unfinished", ["--config-from-experiment", "open", "--metric", "val_loss"], "tuning experiment 'open' has "
                                                                                      "no finished run"),
        (None, ["--config-from-experiment", "tune", "--metric", "accuracy"], "has the metric 'accuracy'; pass "
                                                                              "--metric with one of: r2, val_loss"),
    ],
)
def test_bad_tuning_source_one_line_and_failed_run(reg: dict[str, Any], setup: str | None, args: list[str],
                                                    needle: str) -> None:
    rid = None
    if setup in ("no_params", "bad_value"):
        mlflow.set_experiment("odd")
        rid = _trial({"trial_number": "4"} if setup == "no_params" else {"l1": "wide"}, {"val_loss": 1.0})
    elif setup == "unfinished":
        mlflow.set_experiment("open")
        rid = _trial({"l1": "1"}, {"val_loss": 1.0}, status="RUNNING")
    args = [rid if a == "RUN" else a for a in args]
    needle = needle.replace("RUN", rid or "")
    result = _cli_train(args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-xai: error:") and needle in lines[0], result.stderr
    run = _last_run("bad")
    assert run.info.status == "FAILED" and needle in run.data.tags["mlflow_xai.error"]
    assert run.data.tags["mlflow_xai.role"] == "train"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "cfg.json", "--config-from-run", "abc"], "pass either --config or --config-from-run"),
        (["--config-from-run", "abc", "--config-from-experiment", "tune", "--metric", "m"], "not both"),
        (["--config-from-experiment", "tune"], "--config-from-experiment needs --metric NAME"),
        (["--metric", "val_loss"], "--metric picks the best run of --config-from-experiment"),
    ],
)
def test_conflicting_config_options_are_refused_before_any_run(reg: dict[str, Any], args: list[str],
                                                               needle: str) -> None:
    before = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    result = _cli_train(args)
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    after = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    assert after == before


def test_latest_version_of_a_name_with_a_quote(store: str) -> None:
    """A registered name may hold a quote, which MLflow's filter strings cannot escape."""
    client = MlflowClient()
    exp = client.create_experiment("quotes")
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    with mlflow.start_run(experiment_id=exp) as other:
        pass
    for name in ("team's net", "team net"):
        client.create_registered_model(name)
    client.create_model_version("team's net", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.create_model_version("team's net", f"runs:/{other.info.run_id}/model", run_id=other.info.run_id)
    client.create_model_version("team's net", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.create_model_version("team net", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert tracking.latest_version("team's net", run.info.run_id) == "3"
    assert tracking.latest_version("team's net", other.info.run_id) == "2"
    assert tracking.latest_version("team net", run.info.run_id) == "1"
    with pytest.raises(XAIError, match="no version of registered model"):
        tracking.latest_version("team net", other.info.run_id)
