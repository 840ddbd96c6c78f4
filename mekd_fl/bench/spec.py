"""Experiment specs (`experiments/*.yaml`): a base of settings, a grid of axes, and how to report them.

Why a parser of its own: a sweep of dozens of cells must fail on a typo before the first cell spends
an hour, so every key, method, axis and cell's RunConfig is checked here, with one line naming the
problem, before anything runs. The grid's cells get stable, readable, filesystem-safe names, which
are also their result folders: that is what lets a second `mekd-fl bench` find what is done.

Format::

    name: noniid-fmnist            # folder name under the bench output directory
    description: free text
    base: {dataset: fashion-mnist, num-clients: 10}   # settings shared by every cell
    grid:                          # the cells are the cartesian product of the axes, in this order
      method: [kd, mekd]           # an axis over one setting's values
      partition:                   # or a named list of setting-mappings (label optional)
        - {label: iid, partition: iid}
        - {label: dirichlet-a0.1, partition: dirichlet, alpha: 0.1}
    report: {rows: method, columns: partition, metrics: [student-accuracy]}
      # optional: plateau: {rounds: 3, points: 0.3} adds a per-cell check that the last 3 rounds moved
      # the server accuracy by less than 0.3 points (`mekd_fl.bench.plateau`); relative-to: f1 (a label of
      # the columns axis) adds each row's accuracy as a % of its own at that column (`mekd_fl.bench.relative`);
      # versus: {ours: [mekd], baselines: [kd], points: 1} (labels of the rows axis) adds, per column and
      # seed, the best of `ours` against the best of `baselines` and whether it wins by `points`
      # (`mekd_fl.bench.versus`)
    timing: how long the sweep takes
    set: {}                        # written by `mekd-fl bench --set`: applied over base
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mekd_fl.config import RunConfig
from mekd_fl.distill import get_class
from mekd_fl.errors import ConfigError

TOP_LEVEL_KEYS = ("name", "description", "base", "grid", "report", "timing", "set")
# The bench owns these: one folder per cell, named after the cell, under the bench's folder.
RESERVED_SETTINGS = ("run-name", "out-dir")
# Numbers a run writes to summary.json that a report can tabulate; True: higher is better.
METRICS: dict[str, bool] = {
    "student-accuracy": True,
    "student-best-accuracy": True,
    "student-agreement": True,
    "client-test-accuracy": True,
    "teacher-accuracy": True,
    "emulator-fid-mean": False,
    "fidelity-consistency": True,
    "fidelity-class-separation": True,
    "fidelity-student-distance": False,
    "queries-total": False,
    "wall-seconds": False,
}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Level:
    """One entry of an axis: its label (in cell names and tables) and the settings it sets."""

    label: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Axis:
    """`named`: written as a list of setting-mappings (kept that way when the spec is saved)."""

    name: str
    levels: tuple[Level, ...]
    named: bool


@dataclass(frozen=True)
class ReportLayout:
    rows: str
    columns: str | None
    metrics: tuple[str, ...]
    reference: Reference | None = None
    plateau: tuple[int, float] | None = None  # (last rounds, points): the report's plateau check; None: none
    relative_to: str | None = None  # a columns label: add accuracies as a % of the row's own at that column
    versus: Versus | None = None  # two groups of rows labels: add the best of one against the best of the other


@dataclass(frozen=True)
class Versus:
    """Two disjoint groups of the rows axis's labels and the margin (points) the first should win by."""

    ours: tuple[str, ...]
    baselines: tuple[str, ...]
    points: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"ours": list(self.ours), "baselines": list(self.baselines), "points": self.points}


@dataclass(frozen=True)
class Reference:
    """Published numbers shown beside the measured ones (e.g. the paper's table), in %.

    `values[column label][row label]` (the row "teacher" for the teacher); a spec without columns uses
    the single column label "all". Why in the spec: the comparison is then redrawn by `mekd-fl report`
    with every rerun, instead of being copied into a document by hand.
    """

    title: str
    source: str
    values: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "source": self.source, "values": self.values}


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its folder name, its label on each axis, and its validated settings."""

    name: str
    labels: dict[str, str]
    config: RunConfig


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    base: dict[str, Any]
    grid: tuple[Axis, ...]
    report: ReportLayout
    timing: str
    overrides: dict[str, Any]

    def axis(self, name: str) -> Axis:
        return next(a for a in self.grid if a.name == name)

    def cells(self, out_dir: str = "runs") -> list[Cell]:
        """The cartesian product of the axes, each cell's RunConfig validated, results under `out_dir`."""
        cells = []
        for levels in itertools.product(*(axis.levels for axis in self.grid)):
            labels = {axis.name: level.label for axis, level in zip(self.grid, levels)}
            name = "__".join(f"{axis}={label}" for axis, label in labels.items())
            settings = {**self.base, **self.overrides}
            for level in levels:
                settings.update(level.settings)
            settings.update({"run-name": name, "out-dir": out_dir})
            try:
                config = RunConfig.from_mapping(settings)
            except ConfigError as exc:
                raise ConfigError(f"spec {self.name!r}, cell {name}: {exc}") from None
            cells.append(Cell(name, labels, config))
        return cells

    def select(self, cells: list[Cell], only: Mapping[str, list[str]]) -> list[Cell]:
        """The cells whose labels match `only` (axis -> accepted labels), e.g. {"seed": ["1"]}.

        Why: a grid that takes days can be run in slices (one seed today, the others on a GPU later)
        into the same folder; the report then shows how many seeds each entry holds.
        """
        for axis, labels in only.items():
            known = [a.name for a in self.grid]
            if axis not in known:
                raise ConfigError(
                    f"--only {axis}=...: no such grid axis in spec {self.name!r}; accepted: {', '.join(known)}"
                )
            accepted = [level.label for level in self.axis(axis).levels]
            for label in labels:
                if label not in accepted:
                    raise ConfigError(
                        f"--only {axis}={label}: not a level of axis {axis!r}; accepted: {', '.join(accepted)}"
                    )
        return [cell for cell in cells if all(cell.labels[a] in labels for a, labels in only.items())]

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML data, `set` included, so the saved copy reproduces the cells exactly."""
        grid: dict[str, Any] = {}
        for axis in self.grid:
            if axis.named:
                grid[axis.name] = [{"label": level.label, **level.settings} for level in axis.levels]
            else:
                grid[axis.name] = [level.settings[axis.name] for level in axis.levels]
        report: dict[str, Any] = {"rows": self.report.rows}
        if self.report.columns:
            report["columns"] = self.report.columns
        report["metrics"] = list(self.report.metrics)
        if self.report.reference is not None:
            report["reference"] = self.report.reference.to_dict()
        if self.report.plateau is not None:
            report["plateau"] = {"rounds": self.report.plateau[0], "points": self.report.plateau[1]}
        if self.report.relative_to is not None:
            report["relative-to"] = self.report.relative_to
        if self.report.versus is not None:
            report["versus"] = self.report.versus.to_dict()
        return {
            "name": self.name,
            "description": self.description,
            "base": self.base,
            "grid": grid,
            "report": report,
            "timing": self.timing,
            "set": self.overrides,
        }


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Spec:
    """Read and validate a spec file; `overrides` (from `--set`) are merged over its own `set`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"spec {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"spec {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_spec(data, str(path), overrides or {})


def parse_spec(data: Any, source: str, overrides: Mapping[str, Any]) -> Spec:
    """Validate everything that can be checked without data or training; see the module docstring."""
    if not isinstance(data, dict):
        raise ConfigError(f"spec {source}: must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"spec {source}: unknown top-level key {key!r}; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or _SAFE.search(name):
        raise ConfigError(f"spec {source}: name={name!r} must be a non-empty folder name (letters, digits, . _ -)")
    base = _settings(data.get("base") or {}, f"spec {source}: base")
    sets = _settings({**(data.get("set") or {}), **overrides}, f"spec {source}: --set")
    grid = _grid(data.get("grid"), f"spec {source}: grid")
    for key in sets:
        setters = [axis.name for axis in grid if any(key in level.settings for level in axis.levels)]
        if setters:
            raise ConfigError(f"spec {source}: --set {key}: the grid axis {setters[0]!r} sets it; change the grid")
    spec = Spec(
        name=name,
        description=str(data.get("description") or ""),
        base=base,
        grid=grid,
        report=_report(data.get("report"), grid, f"spec {source}: report"),
        timing=str(data.get("timing") or ""),
        overrides=sets,
    )
    spec.cells()  # every cell's RunConfig validated up front
    return spec


def _settings(values: Any, where: str) -> dict[str, Any]:
    """A mapping of known, bench-settable settings in kebab-case; methods checked against the registry."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping of settings")
    out = {}
    keys = RunConfig.keys()
    for raw, value in values.items():
        key = str(raw).replace("_", "-")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"accepted: {', '.join(keys)}"
            raise ConfigError(f"{where}: unknown setting {raw!r}; {hint}")
        if key in RESERVED_SETTINGS:
            raise ConfigError(f"{where}: {key} is chosen by the bench (one folder per cell); remove it")
        if key == "method":
            try:
                get_class(str(value))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        out[key] = value
    return out


def _grid(data: Any, where: str) -> tuple[Axis, ...]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: is empty; give at least one axis, e.g. grid: {{seed: [1, 2, 3]}}")
    axes = []
    owner: dict[str, str] = {}
    for name, entries in data.items():
        name = str(name)
        if _SAFE.search(name) or "=" in name:
            raise ConfigError(f"{where}: axis name {name!r} must be letters, digits, . _ -")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}.{name}: empty axis; give a non-empty list of values")
        levels = tuple(_level(name, entry, f"{where}.{name}") for entry in entries)
        labels = [level.label for level in levels]
        duplicate = next((label for label in labels if labels.count(label) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"{where}.{name}: label {duplicate!r} appears twice; give each entry its own label")
        for key in {k for level in levels for k in level.settings}:
            if key in owner:
                raise ConfigError(f"{where}: setting {key!r} is set by two axes ({owner[key]!r} and {name!r})")
            owner[key] = name
        axes.append(Axis(name, levels, named=any(isinstance(entry, dict) for entry in entries)))
    return tuple(axes)


def _level(axis: str, entry: Any, where: str) -> Level:
    """A scalar is a value of the axis' own setting; a mapping is a named set of settings."""
    if isinstance(entry, dict):
        entry = dict(entry)
        label = entry.pop("label", None)
        settings = _settings(entry, where)
        if not settings:
            raise ConfigError(f"{where}: entry {label or '{}'} sets nothing")
        if label is None:
            label = "-".join(_label(v) if k == axis else f"{k}{_label(v)}" for k, v in settings.items())
        return Level(_safe_label(str(label), where), settings)
    if isinstance(entry, list):
        raise ConfigError(f"{where}: entry {entry!r} is a list; give a value or a mapping of settings")
    settings = _settings({axis: entry}, where)
    return Level(_safe_label(_label(entry), where), settings)


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _safe_label(label: str, where: str) -> str:
    safe = _SAFE.sub("-", label).strip("-")
    if not safe:
        raise ConfigError(f"{where}: label {label!r} has no letters or digits")
    return safe


def _report(data: Any, grid: tuple[Axis, ...], where: str) -> ReportLayout:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: missing; give rows (an axis), optional columns (an axis) and metrics")
    unknown = set(data) - {"rows", "columns", "metrics", "reference", "plateau", "relative-to", "versus"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; accepted: rows, columns, metrics, reference, plateau, "
            "relative-to, versus"
        )
    axes = [axis.name for axis in grid]
    rows, columns = data.get("rows"), data.get("columns")
    for role, axis in (("rows", rows), ("columns", columns)):
        if (axis is not None or role == "rows") and axis not in axes:
            raise ConfigError(f"{where}: {role}={axis!r} is not a grid axis; accepted: {', '.join(axes)}")
    if rows == columns:
        raise ConfigError(f"{where}: rows and columns are both {rows!r}; choose two different axes")
    metrics = data.get("metrics") or ["student-accuracy"]
    if isinstance(metrics, str):
        metrics = [metrics]
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{where}: unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    reference = None
    if data.get("reference") is not None:
        reference = _reference(data["reference"], grid, rows, columns, f"{where}.reference")
    plateau = _plateau(data["plateau"], f"{where}.plateau") if data.get("plateau") is not None else None
    relative_to = data.get("relative-to")
    if relative_to is not None:
        labels = [level.label for axis in grid if axis.name == columns for level in axis.levels]
        if str(relative_to) not in labels:
            raise ConfigError(
                f"{where}.relative-to={relative_to!r} is not a label of the columns axis; accepted: "
                + (", ".join(labels) if labels else "none (give columns first)")
            )
        relative_to = str(relative_to)
    versus = None
    if data.get("versus") is not None:
        row_labels = [level.label for axis in grid if axis.name == rows for level in axis.levels]
        versus = _versus(data["versus"], row_labels, f"{where}.versus")
    return ReportLayout(
        rows=rows,
        columns=columns,
        metrics=tuple(metrics),
        reference=reference,
        plateau=plateau,
        relative_to=relative_to,
        versus=versus,
    )


def _versus(data: Any, row_labels: list[str], where: str) -> Versus:
    """`{ours: [...], baselines: [...], points: 1}`: two disjoint, non-empty lists of the rows axis's labels."""
    if not isinstance(data, dict) or set(data) - {"ours", "baselines", "points"}:
        raise ConfigError(f"{where}: give a mapping with ours and baselines (lists of rows labels) and points")
    groups = {}
    for key in ("ours", "baselines"):
        value = data.get(key)
        labels = [value] if isinstance(value, str) else value
        if not isinstance(labels, list) or not labels:
            raise ConfigError(f"{where}.{key}: give a non-empty list of rows labels; accepted: {', '.join(row_labels)}")
        for label in map(str, labels):
            if label not in row_labels:
                raise ConfigError(
                    f"{where}.{key}: {label!r} is not a label of the rows axis; accepted: {', '.join(row_labels)}"
                )
        groups[key] = tuple(dict.fromkeys(map(str, labels)))
    both = set(groups["ours"]) & set(groups["baselines"])
    if both:
        raise ConfigError(f"{where}: {sorted(both)[0]!r} is in both ours and baselines; give each label to one group")
    points = data.get("points", 1.0)
    if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
        raise ConfigError(f"{where}.points={points!r} is not accepted; accepted: a number >= 0")
    return Versus(groups["ours"], groups["baselines"], float(points))


def _plateau(data: Any, where: str) -> tuple[int, float]:
    """`{rounds: 3, points: 0.3}`: a cell is at its plateau when its last `rounds` rounds moved < `points`."""
    if not isinstance(data, dict) or set(data) - {"rounds", "points"}:
        raise ConfigError(f"{where}: give a mapping with rounds (an integer >= 2) and points (a number > 0)")
    rounds, points = data.get("rounds", 3), data.get("points", 0.3)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ConfigError(f"{where}.rounds={rounds!r} is not accepted; accepted: an integer >= 2")
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not points > 0:
        raise ConfigError(f"{where}.points={points!r} is not accepted; accepted: a number > 0")
    return rounds, float(points)


def _reference(data: Any, grid: tuple[Axis, ...], rows: str, columns: str | None, where: str) -> Reference:
    """Published numbers keyed by the report's own column and row labels (checked against the grid)."""
    if (
        not isinstance(data, dict)
        or set(data) - {"title", "source", "values"}
        or not isinstance(data.get("values"), dict)
        or not data["values"]
    ):
        raise ConfigError(f"{where}: give title, source and values (column label -> row label -> number in %)")
    by_name = {axis.name: [level.label for level in axis.levels] for axis in grid}
    col_labels = by_name[columns] if columns else ["all"]
    row_labels = by_name[rows] + ["teacher"]
    values: dict[str, dict[str, float]] = {}
    for col, entries in data["values"].items():
        col = str(col)
        if col not in col_labels:
            raise ConfigError(
                f"{where}.values: column {col!r} is not a label of {columns or 'the table'}; "
                f"accepted: {', '.join(col_labels)}"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}.values.{col}: give a mapping of row label -> number")
        values[col] = {}
        for row, value in entries.items():
            row = str(row)
            if row not in row_labels:
                raise ConfigError(
                    f"{where}.values.{col}: row {row!r} is not a label of {rows}; accepted: {', '.join(row_labels)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.values.{col}.{row}: {value!r} is not a number")
            values[col][row] = float(value)
    source = " ".join(str(data.get("source") or "").split())  # YAML's folded text ends in a newline
    return Reference(title=str(data.get("title") or "reference").strip(), source=source, values=values)
