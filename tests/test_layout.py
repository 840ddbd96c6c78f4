"""The project's layout, read from the source (parsed with `ast`, nothing imported).

Rules: no import cycle among the project's modules; only `mekd_fl/bench/` itself and the command line
(`mekd_fl/cli.py`) import the benchmark tooling `mekd_fl.bench`, so the method never depends on it; and
`strategies/protocol.py` (the message contract a foreign Flower app may share) imports nothing from the
project and not torch.

Every import counts, also one inside a function or a method. An import names the most specific project
module it loads (`from mekd_fl.data import partition` -> `mekd_fl.data.partition`, `from mekd_fl.distill
import get_class` -> `mekd_fl.distill`) and the packages above it, whose `__init__` Python runs first,
except the importer's own packages (already loading), so a package's `__init__` importing its own
submodules, which import each other, is not a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mekd_fl", "strategies")
BENCH = "mekd_fl.bench"
MAY_IMPORT_BENCH = ("mekd_fl.cli",)
PROTOCOL = "strategies.protocol"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported project module
    where: str  # path:line of the import statement


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything a file imports, anywhere in it.

    `from a.b import c` yields `a.b.c` (c may be a module or a name in a.b: `project_target` tells which);
    relative imports are made absolute. Each `import` statement is found wherever it sits: module level,
    functions, classes, `if` and `try` blocks.
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names += [(base if alias.name == "*" else f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific project module that importing `name` loads, or None outside the project."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def loaded_modules(target: str, importer: str, modules: dict[str, Path]) -> list[str]:
    """`target` and the packages above it that importing it runs, less those `importer` sits in."""
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if m in modules and m != importer and not importer.startswith(m + ".")]


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Edge]]:
    """Module -> its edges to other project modules (one per imported module, first import wins)."""
    modules = module_files(root, packages)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        edges: dict[str, Edge] = {}
        for name, line in imported_names(path, module):
            target = project_target(name, modules)
            for loaded in loaded_modules(target, module, modules) if target else []:
                edges.setdefault(loaded, Edge(module, loaded, f"{path.relative_to(root)}:{line}"))
        graph[module] = list(edges.values())
    return graph


def find_cycle(graph: dict[str, list[Edge]]) -> list[Edge] | None:
    """One import cycle as the list of its edges, or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[Edge] = []

    def visit(module: str) -> list[Edge] | None:
        state[module] = 1
        for edge in graph.get(module, []):
            if state.get(edge.target) == 1:
                start = next((i for i, e in enumerate(path) if e.source == edge.target), len(path))
                return [*path[start:], edge]
            if edge.target not in state:
                path.append(edge)
                found = visit(edge.target)
                if found:
                    return found
                path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def describe_cycle(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(e.target for e in cycle)])
    steps = "\n".join(f"  {e.source} imports {e.target} ({e.where})" for e in cycle)
    return f"import cycle: {chain}\n{steps}"


def bench_importers(graph: dict[str, list[Edge]]) -> list[str]:
    """Imports of mekd_fl.bench from modules that may not make them, as readable lines."""

    def inside(module: str) -> bool:
        return module == BENCH or module.startswith(BENCH + ".")

    return [
        f"{e.where}: {e.source} imports {e.target}"
        for module, edges in sorted(graph.items())
        if not inside(module) and module not in MAY_IMPORT_BENCH
        for e in edges
        if inside(e.target)
    ]


def standalone_violations(path: Path, module: str, root: Path = ROOT) -> list[str]:
    """Imports of the project or torch in a module that must stand alone, as readable lines."""
    return [
        f"{path.relative_to(root)}:{line}: imports {name}"
        for name, line in imported_names(path, module)
        if name.split(".")[0] in (*PACKAGES, "torch", "torchvision")
    ]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail(describe_cycle(cycle), pytrace=False)


def test_only_bench_and_cli_import_bench() -> None:
    offenders = bench_importers(import_graph())
    if offenders:
        pytest.fail(
            "the benchmark tooling (mekd_fl.bench) may be imported only by itself and mekd_fl/cli.py:\n  "
            + "\n  ".join(offenders),
            pytrace=False,
        )


def test_protocol_imports_neither_project_nor_torch() -> None:
    bad = standalone_violations(module_files(ROOT)[PROTOCOL], PROTOCOL)
    if bad:
        pytest.fail(
            "strategies/protocol.py must stand alone (no project module, no torch):\n  " + "\n  ".join(bad),
            pytrace=False,
        )


def test_graph_sees_the_known_imports() -> None:
    """Guards the checker itself: a parse that found nothing would pass every rule above."""
    targets = {e.target for e in import_graph()["mekd_fl.cli"]}
    assert {"mekd_fl.errors", "mekd_fl.bench.sweep", "mekd_fl.simulation", "mekd_fl.saved_run"} <= targets
    assert "mekd_fl.distill.base" in {e.target for e in import_graph()["mekd_fl.distill"]}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cycle_through_a_function_import_is_found_and_named(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/b.py": "def f():\n    from . import c\n",
            "pkg/c.py": "import pkg.a as again\n",
            "pkg/d.py": "import os, pkg\n",
        },
    )
    cycle = find_cycle(import_graph(tmp_path, ("pkg",)))
    assert cycle is not None
    message = describe_cycle(cycle)
    assert message.splitlines()[0] == "import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a"
    assert "pkg.b imports pkg.c (pkg/b.py:2)" in message


def test_package_init_importing_its_submodules_is_no_cycle(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a, b\n",
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/b.py": "from .sub import g\n",
            "pkg/sub/__init__.py": "from pkg.sub.x import g\n",
            "pkg/sub/x.py": "g = 1\n",
        },
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert [e.target for e in graph["pkg"]] == ["pkg.a", "pkg.b"]
    assert [e.target for e in graph["pkg.b"]] == ["pkg.sub"]
    assert find_cycle(graph) is None


def test_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    """`from pkg.sub.x import g` runs pkg/sub/__init__.py first: its imports count too."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/config.py": "def check():\n    from pkg.sub.x import g\n",
            "pkg/sub/__init__.py": "from pkg.sub import x, y\n",
            "pkg/sub/x.py": "g = 1\n",
            "pkg/sub/y.py": "from pkg.config import check\n",
        },
    )
    cycle = find_cycle(import_graph(tmp_path, ("pkg",)))
    assert cycle is not None
    assert describe_cycle(cycle).splitlines()[0] == "import cycle: pkg.config -> pkg.sub -> pkg.sub.y -> pkg.config"


def test_config_imports_neither_distill_nor_emulator() -> None:
    """RunConfig holds the defaults that DistillContext and EmulatorConfig read, so it must not import them."""
    targets = {e.target for e in import_graph()["mekd_fl.config"]}
    assert not {t for t in targets if t.startswith(("mekd_fl.distill", "mekd_fl.emulator"))}, targets


def test_rule_breakers_are_named(tmp_path: Path) -> None:
    """The bench and protocol rules on a made-up tree: each offending import is named with its line."""
    _write(
        tmp_path,
        {
            "mekd_fl/__init__.py": "",
            "mekd_fl/bench/__init__.py": "",
            "mekd_fl/bench/spec.py": "",
            "mekd_fl/cli.py": "from mekd_fl.bench import spec\n",
            "mekd_fl/results.py": "def f():\n    from mekd_fl import bench\n",
            "strategies/__init__.py": "",
            "strategies/protocol.py": "import json\nimport torch.nn\nfrom . import other\n",
            "strategies/other.py": "",
        },
    )
    assert bench_importers(import_graph(tmp_path)) == ["mekd_fl/results.py:2: mekd_fl.results imports mekd_fl.bench"]
    assert standalone_violations(tmp_path / "strategies/protocol.py", PROTOCOL, tmp_path) == [
        "strategies/protocol.py:2: imports torch.nn",
        "strategies/protocol.py:3: imports strategies.other",
    ]
