"""The settings schema: each setting declared once, everything else derived from the declarations.

The heart of it is the toy method below: a method with a new hyperparameter, declared in one place (its
class, here in the test file), reaches RunConfig, validation, the clients' settings, EdgeSettings,
DistillContext and the method's `losses` with nothing else edited.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import mekd_fl.config as config
from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.config import RunConfig, client_settings, pyproject_table, settings_table
from mekd_fl.distill import DistillContext, get_distiller, methods
from mekd_fl.distill.base import Distiller, register, unregister
from mekd_fl.emulator import EmulatorConfig
from mekd_fl.errors import ConfigError
from mekd_fl.settings import methods as declared_methods
from mekd_fl.settings.run import RUN_SETTINGS, SCORED_SELECTIONS, run_setting
from mekd_fl.settings.schema import Setting

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- a method added in one place
class Toy(Distiller):
    """KD scaled by a hyperparameter of its own, `toy-gain`, declared here and nowhere else."""

    settings = (Setting("toy-gain", 2.0, "Toy scale of the loss.", "client", within="> 0"),)

    def losses(self, student_logits, teacher_response, images, epoch, labels=None) -> dict[str, torch.Tensor]:
        gain = torch.tensor(self.ctx.toy_gain, device=student_logits.device)
        return {"loss": gain * student_logits.square().mean(), "gain": gain}


@pytest.fixture
def toy() -> Iterator[type[Distiller]]:
    """The toy method registered for one test, and removed after it, so no other test sees it."""
    register("toy")(Toy)
    try:
        yield Toy
    finally:
        unregister("toy")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_a_method_declares_its_hyperparameter_in_its_own_file_only(toy: type[Distiller]) -> None:
    cfg = RunConfig.from_mapping({"method": "toy", "toy-gain": "3.5"})  # coerced like any setting
    assert cfg.toy_gain == 3.5 and "toy" in config.METHODS
    with pytest.raises(ConfigError, match=r"^toy-gain=0\.0 must be > 0$"):
        RunConfig.from_mapping({"toy-gain": 0})
    sent = cfg.client_dict()
    assert sent["toy-gain"] == 3.5 and "toy-gain" in config.CLIENT_SETTINGS
    assert "toy-gain = 2.0" in pyproject_table().splitlines()
    assert "| `toy-gain` | `2.0` | clients (method toy) | Toy scale of the loss. |" in settings_table()

    edge_settings = EdgeSettings.from_config(sent)  # what a client rebuilds from its message
    assert edge_settings.toy_gain == 3.5
    with pytest.raises(ConfigError, match=r"^edge settings: toy-gain=-1\.0 must be > 0$"):
        EdgeSettings.from_config({"toy-gain": -1.0})
    ctx = DistillContext.from_config(edge_settings, num_classes=3)
    assert ctx.toy_gain == 3.5 and DistillContext(num_classes=3).toy_gain == 2.0
    parts = get_distiller("toy", ctx).losses(torch.ones(2, 3), torch.full((2, 3), 1 / 3), torch.zeros(2, 1, 4, 4), 1.0)
    assert parts["gain"].item() == 3.5

    # Through the whole edge core: the method's own setting reaches `losses` on the device.
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    edge = EdgeClient(images, TinyNet, settings=edge_settings.updated(batch_size=4, local_epochs=1), device="cpu")
    _, metrics, _ = edge.distill(TinyNet().state_dict(), images, torch.full((8, 3), 1 / 3))
    assert metrics["train-gain"] == pytest.approx(3.5)


def test_a_removed_method_leaves_no_setting_behind(toy: type[Distiller]) -> None:
    assert "toy-gain" in RunConfig.keys()
    unregister("toy")
    assert "toy" not in methods() and "toy" not in config.METHODS
    assert "toy-gain" not in RunConfig.keys() and "toy-gain" not in client_settings()
    with pytest.raises(ConfigError, match=r"^unknown setting 'toy-gain'"):
        RunConfig.from_mapping({"toy-gain": 1.0})
    with pytest.raises(ConfigError, match=r"^method='toy' is not accepted; accepted: can, cdl, dkd, kd, mekd"):
        RunConfig.from_mapping({"method": "toy"})


def test_a_setting_is_declared_once() -> None:
    """A method may not declare a setting the run or another method declares, nor a server-only one."""
    for taken in ("lr", "dkd-alpha"):

        class Clash(Distiller):
            settings = (Setting(taken, 1.0, "A second declaration.", "client"),)

        with pytest.raises(ValueError, match=f"setting '{taken}' is already declared elsewhere"):
            register("clash")(Clash)

    class Secret(Distiller):
        settings = (Setting("secret-weight", 1.0, "Kept on the server.", "server"),)

    with pytest.raises(ValueError, match="must reach the clients"):
        register("secret")(Secret)
    assert "clash" not in methods() and "secret" not in methods()
    assert len(set(RunConfig.keys())) == len(RunConfig.keys())


# ---------------------------------------------------------------------------- what is derived
def test_methods_declare_the_settings_they_read() -> None:
    """Each method's hyperparameters are declared by its own class (mekd_fl/distill/<method>.py)."""
    owned = {name: [s.name for s in declared_methods.declared_by(name)] for name in methods()}
    assert owned == {
        "can": ["can-weight", "can-lr"],
        "cdl": ["cdl-weight", "cdl-margin"],
        "dkd": ["dkd-alpha", "dkd-beta", "dkd-warmup"],
        "kd": [],
        "mekd": ["distance", "emulator-input", "weight-emulation", "weight-kl", "weight-synthetic"],
        "mekd-dkd": [],  # reads mekd's and dkd's, declared by their classes
        "supervised": [],
    }
    assert config.METHODS == methods() == run_setting("method").accepted()


def test_client_settings_are_the_audience_client_or_both() -> None:
    declared = config.all_settings()
    assert client_settings() == tuple(s.name for s in declared if s.audience in ("client", "both"))
    assert list(RunConfig().client_dict()) == list(client_settings())
    assert all(s.audience == "client" for s in declared_methods.method_settings())


def test_distill_context_holds_what_the_methods_read() -> None:
    ctx = DistillContext(num_classes=10)
    shared = {s.name for s in RUN_SETTINGS if s.distill}
    assert shared == {"temperature", "oracle-output"}
    assert set(ctx.to_dict()) == shared | {s.name for s in declared_methods.method_settings()}
    assert ctx == DistillContext.from_config(RunConfig(), 10)
    assert ctx.replace(dkd_beta=2.0).dkd_beta == 2.0 and ctx.dkd_beta == 8.0
    with pytest.raises(TypeError, match="unknown settings: lr"):
        DistillContext(num_classes=10, lr=0.1)  # a client setting no method reads


def test_emulator_config_reads_the_emulator_settings() -> None:
    default = EmulatorConfig()
    assert default == EmulatorConfig.from_settings(RunConfig(), seed=0)
    cfg = RunConfig.from_mapping({"emulator-steps": 7, "wgan-n-critic": 2, "emulator": "wgan-gp", "precision": "bf16"})
    got = EmulatorConfig.from_settings(cfg, seed=3)
    assert (got.steps, got.n_critic, got.kind, got.precision, got.seed) == (7, 2, "wgan-gp", "bf16", 3)
    assert EdgeSettings.from_config(cfg.client_dict()).emulator_config(None, 3) == got


def test_values_are_frozen_comparable_and_picklable() -> None:
    import copy
    import pickle

    cfg = RunConfig.from_mapping({"lr": 0.2})
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg) and hash(cfg) == hash(cfg.replace())
    assert cfg != RunConfig() and cfg.replace(lr=0.05) == RunConfig()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.lr = 1.0
    with pytest.raises(AttributeError, match="no setting or attribute 'nope'"):
        _ = cfg.nope
    with pytest.raises(TypeError, match="unknown settings: nope"):
        RunConfig(nope=1)


# ---------------------------------------------------------------------------- declarations
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="Bad_Name", default=1, help="", audience="client"), "kebab-case"),
        (dict(name="x", default=None, help="", audience="client"), "bool, int, float or str"),
        (dict(name="x", default=1, help="", audience="everyone"), "audience"),
        (dict(name="x", default=0, help="", audience="client", within=">= 1"), "whose default it accepts"),
        (dict(name="x", default="a", help="", audience="client", within="> 0"), "number setting"),
        (dict(name="x", default=1.0, help="", audience="client", within="between 0 and 1"), "write"),
        (dict(name="x", default=1, help="", audience="client", choices=("a",)), "choices need a str"),
    ],
)
def test_a_malformed_declaration_is_refused_when_it_is_made(kwargs: dict, words: str) -> None:
    with pytest.raises((ValueError, TypeError), match=words):
        Setting(**kwargs)


@pytest.mark.parametrize(
    "within, value, message",
    [
        ("> 0", 0.0, "x=0.0 must be > 0"),
        (">= -1", -2, "x=-2 must be an integer >= -1"),
        ("(0, 1]", 0.0, "x=0.0 must be in (0, 1]"),
        ("[0, 0.5)", 0.5, "x=0.5 must be in [0, 0.5)"),
        ("[0, 10]", 11, "x=11 must be an integer in [0, 10]"),
    ],
)
def test_ranges_refuse_in_the_words_they_are_declared_in(within: str, value: float, message: str) -> None:
    default = 1 if isinstance(value, int) else 0.25
    s = Setting("x", default, "", "client", within=within)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        s.check_value(value)


def test_scored_selections_are_query_selections() -> None:
    assert set(SCORED_SELECTIONS) <= set(run_setting("query-selection").accepted())


def test_the_modules_that_implement_a_choice_accept_exactly_the_declared_values() -> None:
    """Where the implementation keeps its own list (it dispatches on it), the declaration must not drift
    from it: a value the schema accepts would fail after the run started, one it refuses could not run.
    (`mekd_fl.queries` reads its lists from the declarations instead.)"""
    from mekd_fl.data import DATASETS, PARTITIONS
    from mekd_fl.emulator import EMULATORS
    from mekd_fl.queries import SELECTIONS, SOURCES
    from mekd_fl.server.aggregation import AGGREGATIONS

    implemented = {
        "dataset": DATASETS,
        "partition": PARTITIONS,
        "emulator": EMULATORS,
        "aggregation": AGGREGATIONS,
        "query-source": SOURCES,
        "query-selection": SELECTIONS,
    }
    for name, values in implemented.items():
        assert tuple(values) == run_setting(name).accepted(), name


def test_importing_the_configuration_loads_no_torch_and_no_flower() -> None:
    """The CLI refuses a bad setting fast: `mekd_fl.config` and the schema load torch only when a RunConfig
    is built (the methods, whose files declare their settings, are loaded then)."""
    code = (
        "import json, sys\nimport mekd_fl.config, mekd_fl.settings.values\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr', 'strategies'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_command_prints_the_generated_tables() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mekd_fl.config", "--pyproject"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == pyproject_table()
