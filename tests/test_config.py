"""`RunConfig`: pyproject's table is the generated one, merging from mappings, and one-line refusals."""

import re
from pathlib import Path

import pytest

from mekd_fl.config import CLIENT_SETTINGS, RunConfig, default_flower_config, pyproject_table
from mekd_fl.errors import ConfigError

try:  # Python 3.11+; the package supports 3.10, where Flower's own dependency tomli parses the same
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_block() -> str:
    """The `[tool.flwr.app.config]` block of pyproject.toml, as text: its header to the first blank line."""
    text = PYPROJECT.read_text()
    start = text.index("[tool.flwr.app.config]\n")
    return text[start : text.index("\n\n", start) + 1]


def test_pyproject_config_table_is_the_generated_one() -> None:
    assert pyproject_block() == pyproject_table(), "run `python -m mekd_fl.config --pyproject` and paste its output"


def test_generated_pyproject_table_reads_back_as_the_defaults() -> None:
    """Through a TOML parser, as Flower reads it: every value and its type (0.0002 a float, 42 an int)."""
    table = tomllib.loads(pyproject_table())["tool"]["flwr"]["app"]["config"]
    defaults = default_flower_config()
    assert list(table) == list(defaults) == RunConfig.keys()
    for key, default in defaults.items():
        assert table[key] == default and type(table[key]) is type(default), key


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
    ("alpha", 0),
    ("alpha", -1),
    ("num-clients", 0),
    ("partition", "zipf"),
    ("min-partition-size", 0),
    ("partition-retries", -1),
    ("shards-per-client", 0),
    ("dataset", "foo"),
    ("method", "foo"),
    ("teacher-arch", "resnet9"),
    ("server-share", 1.0),
    ("fraction-train", 0),
    ("lr", 0),
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


@pytest.mark.parametrize(
    "key, value",
    [("partition", "zipf"), ("dataset", "foo"), ("device", "tpu"), ("method", "foo"), ("teacher-arch", "resnet9")],
)
def test_choice_errors_list_what_is_accepted(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match="accepted: ") as info:
        RunConfig.from_mapping({key: value})
    listed = str(info.value).split("accepted: ", 1)[1]
    expected = {
        "partition": "dirichlet",
        "dataset": "fashion-mnist",
        "device": "cuda",
        "method": "mekd",
        "teacher-arch": "resnet20",
    }[key]
    assert expected in listed


def test_partition_settings_accept_shard_and_large_federation_values() -> None:
    cfg = RunConfig.from_mapping(
        {"partition": "shard", "shards-per-client": "3", "min-partition-size": 1, "partition-retries": 0}
    )
    assert (cfg.partition, cfg.shards_per_client, cfg.min_partition_size, cfg.partition_retries) == ("shard", 3, 1, 0)
    with pytest.raises(ConfigError, match=r"^partition='shards' is not accepted; accepted: .*\bshard\b"):
        RunConfig.from_mapping({"partition": "shards"})
    with pytest.raises(ConfigError, match=r"^partition-retries=1.5 "):
        RunConfig.from_mapping({"partition-retries": 1.5})


def test_validate_false_skips_checks() -> None:
    cfg = RunConfig.from_mapping({"alpha": 0}, validate=False)
    assert cfg.alpha == 0
    with pytest.raises(ConfigError, match="alpha"):
        cfg.validate()


# ---------------------------------------------------------------------------- new settings
NEW_BAD = [
    ("aggregation", "fedprox"),
    ("trim-beta", 0.5),
    ("trim-beta", -0.1),
    ("num-malicious", -1),
    ("dp-clip", -0.1),
    ("dp-noise", -1.0),
    ("max-update-norm", -1.0),
    ("norm-outlier-factor", -0.5),
    ("min-reply-fraction", 1.5),
    ("min-reply-fraction", -0.1),
    ("reply-timeout", 0),
    ("reply-timeout", -5.0),
    ("oracle-top-k", -1),
    ("oracle-decimals", -2),
]


@pytest.mark.parametrize("key, value", NEW_BAD, ids=[f"{k}={v}" for k, v in NEW_BAD])
def test_new_settings_refuse_bad_values(key: str, value) -> None:
    test_bad_setting_gives_one_line_error_naming_it(key, value)


def test_new_settings_accept_their_edges() -> None:
    cfg = RunConfig.from_mapping(
        {
            "aggregation": "bulyan",
            "trim-beta": 0.0,
            "num-malicious": 2,
            "dp-clip": 1.0,
            "dp-noise": 0.5,
            "max-update-norm": 10.0,
            "norm-outlier-factor": 0,
            "min-reply-fraction": 1,
            "reply-timeout": 0.5,
            "oracle-top-k": 3,
            "oracle-decimals": 0,
        }
    )
    assert cfg.aggregation == "bulyan" and cfg.min_reply_fraction == 1.0 and type(cfg.min_reply_fraction) is float
    RunConfig.from_mapping({"min-reply-fraction": 0, "trim-beta": 0.49, "oracle-decimals": -1})
    for aggregation in ("fedavg", "trimmed-mean", "median", "krum", "multikrum", "bulyan"):
        RunConfig.from_mapping({"aggregation": aggregation})


def test_aggregation_error_lists_the_strategies() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^aggregation='fedprox' is not accepted; accepted: fedavg, trimmed-mean, "
        r"median, krum, multikrum, bulyan$",
    ):
        RunConfig.from_mapping({"aggregation": "fedprox"})


def test_dp_noise_needs_dp_clip() -> None:
    with pytest.raises(ConfigError, match=r"^dp-noise=1\.0 needs dp-clip > 0") as info:
        RunConfig.from_mapping({"dp-noise": 1.0})
    assert "\n" not in str(info.value)
    RunConfig.from_mapping({"dp-noise": 1.0, "dp-clip": 2.0})
    RunConfig.from_mapping({"dp-clip": 2.0})  # clipping alone is fine


def test_oracle_top_k_needs_probs() -> None:
    with pytest.raises(ConfigError, match=r"^oracle-top-k=3 needs oracle-output=probs") as info:
        RunConfig.from_mapping({"oracle-top-k": 3, "oracle-output": "logits"})
    assert "\n" not in str(info.value)
    RunConfig.from_mapping({"oracle-top-k": 0, "oracle-output": "logits"})
    RunConfig.from_mapping({"oracle-top-k": 3, "oracle-output": "probs"})


# ---------------------------------------------------------------------------- client allow-list
def test_client_settings_are_known_and_hold_no_server_secrets() -> None:
    keys = RunConfig.keys()
    assert len(set(CLIENT_SETTINGS)) == len(CLIENT_SETTINGS)
    assert [k for k in CLIENT_SETTINGS if k not in keys] == []
    for secret in (
        "teacher-arch",
        "teacher-epochs",
        "teacher-lr",
        "teacher-batch-size",
        "server-share",
        "cache-dir",
        "out-dir",
        "data-dir",
        "query-budget",
        "answer-cache",
    ):
        assert secret not in CLIENT_SETTINGS, secret


def test_client_dict_holds_only_the_client_settings() -> None:
    cfg = RunConfig.from_mapping({"teacher-arch": "resnet14", "lr": 0.01, "cache-dir": "/secret"})
    sent = cfg.client_dict()
    assert list(sent) == list(CLIENT_SETTINGS)
    assert sent["lr"] == 0.01
    assert "teacher-arch" not in sent and "/secret" not in sent.values()
    # A client rebuilds its RunConfig from what it was sent.
    assert RunConfig.from_mapping(sent).lr == 0.01


# ---------------------------------------------------------------------------- values that used to get through
@pytest.mark.parametrize(
    "key, value", [("batch-size", True), ("lr", True), ("num-rounds", False), ("alpha", False), ("seed", True)]
)
def test_bool_for_a_number_is_refused(key: str, value: bool) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}={value} is not a valid (int|float)") as info:
        RunConfig.from_mapping({key: value})
    assert "\n" not in str(info.value)


def test_bool_for_a_number_is_refused_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^batch-size=True is not a valid int"):
        RunConfig(batch_size=True).validate()
    with pytest.raises(ConfigError, match=r"^lr=True is not a valid float"):
        RunConfig(lr=True).validate()
    with pytest.raises(ConfigError, match=r"^download=1 is not a valid bool"):
        RunConfig(download=1).validate()
    RunConfig(lr=1).validate()  # an int for a float setting is a number all the same


NON_FINITE = [
    ("lr", float("inf")),
    ("alpha", float("nan")),
    ("query-budget", float("nan")),
    ("dp-noise", float("inf")),
    ("reply-timeout", float("-inf")),
    ("lr", "inf"),
    ("alpha", "NaN"),
    ("num-rounds", "inf"),
    ("temperature", "1e400"),
]


@pytest.mark.parametrize("key, value", NON_FINITE, ids=[f"{k}={v}" for k, v in NON_FINITE])
def test_non_finite_numbers_are_refused(key: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* must be a finite number$"):
        RunConfig.from_mapping({key: value})


def test_non_finite_numbers_are_refused_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^trim-beta=nan must be a finite number$"):
        RunConfig(trim_beta=float("nan")).validate()
    with pytest.raises(ConfigError, match=r"^max-update-norm=inf must be a finite number$"):
        RunConfig(max_update_norm=float("inf")).validate()


def test_seed_range() -> None:
    assert RunConfig.from_mapping({"seed": 0}).seed == 0
    assert RunConfig.from_mapping({"seed": 2**32 - 1}).seed == 2**32 - 1
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"^seed={bad} must be an integer in \[0, 4294967295\]$"):
            RunConfig.from_mapping({"seed": bad})


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "a\\b", "x y", "-x", "a" * 129, "é"])
def test_run_name_must_be_one_safe_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^run-name=.* is not accepted; accepted: empty") as info:
        RunConfig.from_mapping({"run-name": name})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x",
        "run-1.a_b",
        "a" * 128,
        "method=kd__partition=iid__seed=1",
        "20240101-120000-mekd-fashion-mnist-dirichlet",
    ],
)
def test_run_name_accepts_plain_names_and_bench_cells(name: str) -> None:
    assert RunConfig.from_mapping({"run-name": name}).run_name == name


def test_the_strategy_and_oracle_defaults_agree_with_runconfig() -> None:
    """`strategies` imports nothing from `mekd_fl`, so MEKD keeps literal defaults: they must be RunConfig's,
    or a user of the API and a user of `mekd-fl run` get different runs. (TeacherOracle reads its defaults
    from the schema; the check shows it does.)"""
    import inspect

    from mekd_fl.teacher.oracle import TeacherOracle
    from strategies import MEKD

    run = RunConfig()
    pairs = {
        (MEKD, "query_budget"): run.query_budget,
        (MEKD, "emulator_steps"): run.emulator_steps,
        (MEKD, "emulator_rounds"): run.emulator_rounds,
        (MEKD, "federated_emulator"): run.federated_emulator,
        (MEKD, "emulator_phase"): run.emulator_phase,
        (MEKD, "max_update_norm"): run.max_update_norm,
        (MEKD, "norm_outlier_factor"): run.norm_outlier_factor,
        (MEKD, "min_reply_fraction"): run.min_reply_fraction,
        (TeacherOracle, "budget"): run.query_budget,
        (TeacherOracle, "batch_size"): run.oracle_batch_size,
        (TeacherOracle, "output"): run.oracle_output,
        (TeacherOracle, "top_k"): run.oracle_top_k,
    }
    for (cls, name), expected in pairs.items():
        assert inspect.signature(cls.__init__).parameters[name].default == expected, f"{cls.__name__}({name})"


def test_lazy_phases_and_a_federated_emulator_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="emulator-phase=lazy") as err:
        RunConfig(emulator_phase="lazy", federated_emulator=True).validate()
    assert "\n" not in str(err.value)
    RunConfig(emulator_phase="lazy").validate()
    with pytest.raises(ConfigError, match="emulator-phase"):
        RunConfig(emulator_phase="later").validate()
