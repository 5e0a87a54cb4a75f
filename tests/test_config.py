from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow_xai.config import OPTIMIZER_DEFAULT_LR, TunedConfig, load_config
from mlflow_xai.errors import XAIError


def test_defaults_are_the_documented_diabetes_config() -> None:
    cfg = TunedConfig()
    assert (cfg.l1, cfg.act_fn, cfg.optimizer, cfg.initialization) == (16, "ReLU", "Adam", "default")
    assert load_config(None) == cfg == load_config("default")


def test_cookbook_hidden_sizes_rule() -> None:
    cfg = TunedConfig(l1=2)
    assert cfg.hidden_layer_sizes(10) == (40, 20, 40, 20, 20, 10, 10)
    assert TunedConfig(l1=3).hidden_layer_sizes(10) == (60, 30, 60, 30, 30, 20, 20)  # ceil(3/2)=2
    assert TunedConfig(hidden_sizes=(7, 5)).hidden_layer_sizes(10) == (7, 5)


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_DEFAULT_LR))
def test_learning_rate_is_lr_mult_times_default(optimizer: str) -> None:
    cfg = TunedConfig(optimizer=optimizer, lr_mult=2.5)
    assert cfg.learning_rate == pytest.approx(2.5 * OPTIMIZER_DEFAULT_LR[optimizer])


def test_spotpython_style_names_are_accepted() -> None:
    cfg = TunedConfig.from_dict(
        {"act_fn": "LeakyReLU()", "optimizer": "adamw", "initialization": "Default", "lr_mult": 1}
    )
    assert (cfg.act_fn, cfg.optimizer, cfg.initialization, cfg.lr_mult) == ("LeakyReLU", "AdamW", "default", 1.0)
    assert TunedConfig.from_dict({"act_fn": "Swish"}).act_fn == "Swish"


def test_roundtrip_through_dict_and_json(tmp_path: Path) -> None:
    cfg = TunedConfig(l1=4, hidden_sizes=(9, 3), batch_norm=True, dropout_prob=0.2)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TunedConfig.from_file(path) == cfg


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("l1: 8\nact_fn: Tanh\nbatch_norm: true\n")
    assert TunedConfig.from_file(path) == TunedConfig(l1=8, act_fn="Tanh", batch_norm=True)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"layers": 3}, "unknown config key 'layers'; valid keys: l1, epochs"),
        ({"act_fn": "Mish"}, "act_fn='Mish' is not supported; use one of ReLU, LeakyReLU"),
        ({"optimizer": "Lion"}, "optimizer='Lion' is not supported; use one of Adadelta"),
        ({"initialization": "orthogonal"}, "initialization='orthogonal' is not supported"),
        ({"l1": 0}, "l1=0 is invalid; use an integer >= 1"),
        ({"l1": 2.5}, "l1=2.5 is invalid"),
        ({"epochs": True}, "epochs=True is invalid"),
        ({"dropout_prob": 1.0}, "dropout_prob=1.0 is invalid; use a number in [0, 1)"),
        ({"lr_mult": -1.0}, "lr_mult=-1.0 is invalid"),
        ({"batch_norm": "yes"}, "batch_norm='yes' is invalid; use true or false"),
        ({"hidden_sizes": []}, "hidden_sizes is invalid"),
        ({"hidden_sizes": [10**12]}, "over the limit"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(raw: dict, needle: str) -> None:
    with pytest.raises(XAIError) as err:
        TunedConfig.from_dict(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_absurd_network_refused_before_allocation() -> None:
    cfg = TunedConfig(hidden_sizes=(1_000_000, 1_000_000, 1_000_000))
    with pytest.raises(XAIError, match="parameters, over the limit"):
        cfg.check_size(10, 1)


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(XAIError, match="does not exist"):
        TunedConfig.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{l1: ")
    with pytest.raises(XAIError, match="does not parse"):
        TunedConfig.from_file(bad)
