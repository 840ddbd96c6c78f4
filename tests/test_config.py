"""`RunConfig`: pyproject mirrors the defaults, merging from mappings, and one-line refusals."""

import re
import tomllib
from pathlib import Path

import pytest

from mekd_fl.config import RunConfig, default_flower_config
from mekd_fl.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def flower_table() -> dict:
    with PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_config_table_equals_defaults() -> None:
    table, defaults = flower_table(), RunConfig().to_dict()
    assert set(table) == set(defaults), (
        f"only in pyproject: {sorted(set(table) - set(defaults))}; only in RunConfig: "
        f"{sorted(set(defaults) - set(table))}")
    for key, default in defaults.items():
        assert table[key] == default, key
        assert type(table[key]) is type(default), f"{key}: {type(table[key]).__name__} vs {type(default).__name__}"
    assert default_flower_config() == defaults


def test_defaults_are_valid_and_keys_are_kebab() -> None:
    RunConfig().validate()
    keys = RunConfig.keys()
    assert keys == list(RunConfig().to_dict())
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", k) for k in keys)


def test_from_mapping_accepts_kebab_and_snake_keys() -> None:
    kebab = RunConfig.from_mapping({"num-clients": 3, "teacher-arch": "resnet14"})
    snake = RunConfig.from_mapping({"num_clients": 3, "teacher_arch": "resnet14"})
    assert kebab == snake
    assert kebab.num_clients == 3 and kebab.teacher_arch == "resnet14"
    assert kebab.seed == RunConfig().seed  # untouched settings keep their defaults


def test_from_mapping_coerces_strings() -> None:
    cfg = RunConfig.from_mapping({"alpha": "0.5", "download": "true", "num-rounds": "7", "lr": 1})
    assert cfg.alpha == 0.5 and type(cfg.alpha) is float
    assert cfg.download is True
    assert cfg.num_rounds == 7 and type(cfg.num_rounds) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert RunConfig.from_mapping({"download": "false"}).download is False
    assert RunConfig.from_mapping({"alpha": "2"}).alpha == 2.0


@pytest.mark.parametrize("key, value", [("alpha", "abc"), ("num-rounds", "2.5"), ("download", "maybe")])
def test_uncoercible_value_is_a_config_error(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='{re.escape(value)}' is not a valid"):
        RunConfig.from_mapping({key: value})


def test_unknown_key_rejected_listing_accepted_keys() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"num-client": 3})
    msg = str(info.value)
    assert "unknown setting 'num-client'" in msg
    accepted = msg.split("accepted: ", 1)[1].split(", ")
    assert accepted == RunConfig.keys()
    assert "\n" not in msg


BAD = [
    ("alpha", 0), ("alpha", -1), ("num-clients", 0), ("partition", "zipf"), ("dataset", "foo"),
    ("method", "foo"), ("teacher-arch", "resnet9"), ("server-share", 1.0), ("fraction-train", 0), ("lr", 0),
    ("device", "tpu"),
]


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_bad_setting_gives_one_line_error_naming_it(key: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({key: value})
    msg = str(info.value)
    assert "\n" not in msg
    # Names the setting itself (so "lr" must not be satisfied by "teacher-lr").
    assert re.search(rf"(?<![\w-]){re.escape(key)}=", msg), msg
    assert str(value) in msg


@pytest.mark.parametrize("key, value", [("partition", "zipf"), ("dataset", "foo"), ("device", "tpu"),
                                        ("method", "foo"), ("teacher-arch", "resnet9")])
def test_choice_errors_list_what_is_accepted(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match="accepted: ") as info:
        RunConfig.from_mapping({key: value})
    listed = str(info.value).split("accepted: ", 1)[1]
    expected = {"partition": "dirichlet", "dataset": "fashion-mnist", "device": "cuda", "method": "mekd",
                "teacher-arch": "resnet20"}[key]
    assert expected in listed


def test_validate_false_skips_checks() -> None:
    cfg = RunConfig.from_mapping({"alpha": 0}, validate=False)
    assert cfg.alpha == 0
    with pytest.raises(ConfigError, match="alpha"):
        cfg.validate()
