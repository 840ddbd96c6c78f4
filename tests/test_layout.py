"""The project's layout, where import-linter cannot see it.

The import rules (no cycle; cli -> bench -> Flower wiring -> method core; only the cli imports the bench
tooling; a Flower-free core; `strategies` apart from `mekd_fl`; `strategies.protocol` alone) are contracts
in pyproject.toml's `[tool.importlinter]`, checked by `lint-imports` (`make test` runs it after ruff).
They read the source. This file checks what reading imports does not show:
- what importing the protocol and the method core loads when Python runs it: the package `__init__`s run
  first, and `strategies` imports its strategy classes lazily (`importlib` in `__getattr__`), which no
  static graph models;
- that no module grows past MAX_LINES: a module that long holds more than one concept and is split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A module longer than this is split by concept.
MAX_LINES = 500
#: Where the limit holds: the packages, the benchmark scripts and the examples (tests are not counted).
SOURCES = ("mekd_fl", "strategies", "experiments", "examples")


def test_importing_the_protocol_loads_neither_torch_nor_flower_nor_the_strategies() -> None:
    """A client, a foreign Flower app or a tool that speaks MEKD's protocol loads nothing else by importing it.

    Flower counts too: its `flwr/__init__.py` imports `flwr.serverapp`, so any `import flwr...` loads the
    whole server side; the protocol imports Flower's message types only when `checked_message` is called.
    """
    code = (
        "import json, sys\n"
        "import strategies.protocol\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'flwr',"
        " 'mekd_fl') or (m.startswith('strategies.') and m != 'strategies.protocol'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import strategies.protocol` loads {loaded}"


def contract(contract_id: str) -> dict:
    """One import-linter contract of pyproject.toml, by its id."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c.get("id") == contract_id)


def test_the_method_core_runs_without_loading_flower() -> None:
    """The modules of the `flower-free-core` contract, imported as Python runs them (package `__init__`s
    included): no `flwr` module is loaded, so the method is plain PyTorch, testable without a runtime."""
    core = contract("flower-free-core")["source_modules"]
    code = (
        f"import sys\nfor m in {core!r}:\n    __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


def module_lengths(root: Path = ROOT) -> dict[str, int]:
    """Lines of every .py file under SOURCES, by path relative to the root."""
    return {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for source in SOURCES
        for path in sorted((root / source).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def test_no_module_exceeds_the_line_limit() -> None:
    too_long = {p: n for p, n in module_lengths().items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines, split by concept: {too_long}"


def layer_names(contract_id: str) -> set[str]:
    """The module names a layers contract places, its independent (`|`) and coupled (`:`) groups split."""
    return {
        name.strip()
        for layer in contract(contract_id)["layers"]
        for group in layer.split("|")
        for name in group.split(":")
    }


def children(package: Path) -> set[str]:
    """The modules and subpackages directly inside `package`, without `__init__`."""
    return {
        p.stem if p.suffix == ".py" else p.name
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }


@pytest.mark.parametrize(
    ("contract_id", "package"),
    [
        ("layers", "mekd_fl"),
        ("client-layers", "mekd_fl/client"),
        ("teacher-layers", "mekd_fl/teacher"),
        ("server-layers", "mekd_fl/server"),
    ],
)
def test_every_module_has_a_place_in_the_layers(contract_id: str, package: str) -> None:
    """import-linter leaves a module that no layer names unchecked; a new module must be placed."""
    unplaced = children(ROOT / package) - layer_names(contract_id)
    assert not unplaced, f"{package}: {sorted(unplaced)} are in no layer of contract {contract_id!r}"


def test_the_sides_export_their_public_names_lazily() -> None:
    """`from mekd_fl.teacher import TeacherOracle` loads no Flower; `register_teacher` loads it when asked."""
    code = (
        "import sys\n"
        "from mekd_fl.teacher import TeacherOracle\n"
        "from mekd_fl.client import EdgeClient\n"
        "before = sorted(m for m in sys.modules if m.split('.')[0] == 'flwr')\n"
        "from mekd_fl.teacher import register_teacher\n"
        "from mekd_fl.client import register_mekd\n"
        "print(before, callable(register_teacher) and callable(register_mekd))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[] True", proc.stdout[-2000:]
