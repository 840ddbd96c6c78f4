"""A bench folder read back: its saved spec and what each cell's folder holds (for tables and figures).

Why from the folder alone: a sweep runs for hours and may be resumed, moved or half finished; its saved
`spec.yaml` says which cells exist and how to lay them out, and each cell's folder holds its numbers,
so a report can be redrawn at any time without running anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mekd_fl.bench.spec import Cell, Spec, load_spec
from mekd_fl.errors import ConfigError
from mekd_fl.server.summary import RunSummary

SPEC_FILE = "spec.yaml"


@dataclass(frozen=True)
class CellResult:
    """What one cell's folder holds; `summary` is None while the cell is unfinished (no readable summary.json)."""

    cell: Cell
    summary: RunSummary | None
    rounds: list[dict[str, Any]]
    partition: dict[str, Any] | None

    def value(self, metric: str) -> float | None:
        """A metric of `spec.METRICS` (a summary field, or `fidelity-<key>`) as a float; None when absent."""
        if self.summary is None:
            return None
        if metric.startswith("fidelity-"):
            value = self.summary.fidelity.get(metric[len("fidelity-") :])
        else:
            value = getattr(self.summary, metric.replace("-", "_"))
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def same_teacher(results: list[CellResult]) -> bool:
    """Whether the finished cells share one teacher. By digest where every cell has one; else by test
    accuracy, the only mark an older summary has (two teachers of equal accuracy would pass)."""
    finished = [r.summary for r in results if r.summary is not None]
    if all(s.teacher_digest for s in finished):
        return len({s.teacher_digest for s in finished}) <= 1
    return len({s.teacher_accuracy for s in finished}) <= 1


def load_results(folder: Path) -> tuple[Spec, list[CellResult]]:
    """The saved spec and every cell of its grid, finished or not."""
    if not (folder / SPEC_FILE).is_file():
        raise ConfigError(f"{folder}: no {SPEC_FILE}; give a folder written by `mekd-fl bench`")
    spec = load_spec(folder / SPEC_FILE)
    return spec, [_read_cell(folder / cell.name, cell) for cell in spec.cells(out_dir=str(folder))]


def _read_cell(path: Path, cell: Cell) -> CellResult:
    def read(name: str) -> Any:
        file = path / name
        return json.loads(file.read_text()) if file.is_file() else None

    metrics = path / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rounds = [json.loads(line) for line in lines if line.strip()]
    return CellResult(cell, read_summary(path / "summary.json"), rounds, read("partition.json"))


def read_summary(file: Path) -> RunSummary | None:
    """The cell's summary; None when there is none, or none readable (`mekd-fl bench` reruns such a cell)."""
    if not file.is_file():
        return None
    try:
        return RunSummary.read(file)
    except ValueError:
        return None


def axis_labels(spec: Spec, axis: str | None) -> list[str | None]:
    """The labels of an axis's levels, in order; [None] for no axis (a table without columns)."""
    return [level.label for level in spec.axis(axis).levels] if axis else [None]


def members(spec: Spec, results: list[CellResult], row: str | None, col: str | None) -> list[CellResult]:
    """The cells of one table entry: those with this rows label and this columns label (None: any)."""
    rows, cols = spec.report.rows, spec.report.columns
    return [
        r
        for r in results
        if (row is None or r.cell.labels[rows] == row) and (col is None or r.cell.labels[cols] == col)
    ]
