"""`mekd-fl report DIR`: the table, figures and provenance of a bench folder (written by `mekd-fl bench`).

Values are the mean and the sample standard deviation over every axis that is neither the rows nor the
columns (usually the seeds). The supervised reference reads true labels, so it is shown as an upper bound
and never marked best. The folder is read by `cells.py`, the figures are chosen by `figures.py`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mekd_fl.bench import cells
from mekd_fl.bench.cells import SPEC_FILE, CellResult, load_results
from mekd_fl.bench.figures import draw_all
from mekd_fl.bench.plateau import PlateauCheck, plateau_section
from mekd_fl.bench.relative import relative_section
from mekd_fl.bench.spec import METRICS, Reference, Spec
from mekd_fl.bench.tables import markdown_table, write_csv
from mekd_fl.bench.versus import versus_section
from mekd_fl.errors import ConfigError

INVOCATIONS_FILE = "invocations.jsonl"
UPPER_BOUND = " (labels, upper bound)"


@dataclass(frozen=True)
class Stat:
    """The values of one table entry and whether they all come from source-blind runs."""

    values: tuple[float, ...]
    expected: int
    blind: bool

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


def stat(members: list[CellResult], metric: str) -> Stat:
    """Mean/std inputs of one entry; an entry is source-blind unless a finished run says otherwise."""
    values = tuple(v for v in (m.value(metric) for m in members) if v is not None)
    blind = all(m.summary.source_blind for m in members if m.summary is not None)
    return Stat(values, len(members), blind)


def teacher_stat(members: list[CellResult]) -> Stat:
    """Teacher accuracy, one value per distinct teacher (methods sharing a teacher count it once; a recipe
    trained again on another machine is another teacher, told apart by its accuracy)."""
    teachers = {
        (m.cell.config.teacher_arch, m.cell.config.seed, m.cell.config.dataset, m.value("teacher-accuracy"))
        for m in members
        if m.summary is not None
    }
    return Stat(tuple(key[-1] for key in teachers if key[-1] is not None), len(teachers) or 1, True)


def format_stat(value: Stat, metric: str) -> str:
    if not value.values:
        return "n/a"
    percent = "accuracy" in metric or "agreement" in metric
    if percent:
        scale, digits = 100.0, 2
    elif metric.startswith("fidelity-"):  # shares and distances in [0, 2]
        scale, digits = 1.0, 3
    else:  # FID to one decimal, counts and seconds whole
        scale, digits = 1.0, 1 if "fid" in metric else 0
    text = f"{value.mean * scale:.{digits}f}"
    if len(value.values) > 1:
        text += f" ± {value.std * scale:.{digits}f}"
    if len(value.values) < value.expected:
        text += f" (n={len(value.values)}/{value.expected})"
    return text


def build_table(spec: Spec, results: list[CellResult]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Markdown header and body (best source-blind entry per column in bold) and long-format CSV rows."""
    rows, cols, metrics = spec.report.rows, spec.report.columns, spec.report.metrics
    row_labels, col_labels = cells.axis_labels(spec, rows), cells.axis_labels(spec, cols)
    columns = [(metric, col) for metric in metrics for col in col_labels]
    stats = {
        (row, metric, col): stat(cells.members(spec, results, row, col), metric)
        for row in row_labels
        for metric, col in columns
    }
    best = {}
    for metric, col in columns:
        candidates = [s.mean for (r, m, c), s in stats.items() if (m, c) == (metric, col) and s.blind and s.values]
        if candidates:
            best[metric, col] = max(candidates) if METRICS[metric] else min(candidates)

    def col_title(metric: str, col: str | None) -> str:
        upper = col is not None and all(not stats[row, metric, col].blind for row in row_labels)
        title = metric if col is None else (col if len(metrics) == 1 else f"{metric} {col}")
        return title + (UPPER_BOUND if upper else "")

    header = [rows + (f" \\ {cols}" if cols else "")] + [col_title(m, c) for m, c in columns]
    body, csv_rows = [], []
    for row in row_labels:
        upper = all(not stats[row, m, c].blind for m, c in columns)
        line = [row + (UPPER_BOUND if upper else "")]
        for metric, col in columns:
            value = stats[row, metric, col]
            text = format_stat(value, metric)
            is_best = value.blind and bool(value.values) and value.mean == best.get((metric, col))
            line.append(f"**{text}**" if is_best else text)
            csv_rows.append(_csv_row(spec, row, col, metric, value, is_best))
        body.append(line)
    if "student-accuracy" in metrics:  # the teacher beside its students, as in the paper's tables
        line = ["teacher (reference)"]
        for metric, col in columns:
            value = teacher_stat(cells.members(spec, results, None, col))
            line.append(format_stat(value, "teacher-accuracy") if metric == "student-accuracy" else "")
            if metric == "student-accuracy":
                csv_rows.append(_csv_row(spec, "teacher", col, "teacher-accuracy", value, False))
        body.append(line)
    reference = spec.report.reference
    if reference is not None and "student-accuracy" in metrics:
        header, body = _with_reference(header, body, columns, row_labels, reference)
    return header, body, csv_rows


def _with_reference(
    header: list[str],
    body: list[list[str]],
    columns: list[tuple[str, str | None]],
    row_labels: list[str | None],
    reference: Reference,
) -> tuple[list[str], list[list[str]]]:
    """Insert a published column right after each measured student-accuracy column it has numbers for."""
    keys = [str(row) for row in row_labels] + ["teacher"]  # body rows, in order (the teacher row last)
    new_header, new_body = [header[0]], [[line[0]] for line in body]
    for i, (metric, col) in enumerate(columns, 1):
        new_header.append(header[i])
        for line, new_line in zip(body, new_body):
            new_line.append(line[i])
        published = reference.values.get(col if col is not None else "all")
        if metric == "student-accuracy" and published:
            new_header.append(f"{col or 'all'} ({reference.title})")
            for key, new_line in zip(keys, new_body):
                new_line.append(f"{published[key]:.2f}" if key in published else "")
    return new_header, new_body


def _csv_row(spec: Spec, row: str, col: str | None, metric: str, value: Stat, best: bool) -> dict[str, Any]:
    out: dict[str, Any] = {spec.report.rows: row}
    if spec.report.columns:
        out[spec.report.columns] = col
    out.update(
        {
            "metric": metric,
            "mean": value.mean if value.values else "",
            "std": value.std if value.values else "",
            "n": len(value.values),
            "expected": value.expected,
            "source-blind": value.blind,
            "best": best,
        }
    )
    return out


def csv_header(spec: Spec) -> list[str]:
    axes = [spec.report.rows] + ([spec.report.columns] if spec.report.columns else [])
    return axes + ["metric", "mean", "std", "n", "expected", "source-blind", "best"]


# ---------------------------------------------------------------------------------------- report
def write_report(folder: Path) -> str:
    """Write report.md, report.csv and the plots into `folder`; returns the Markdown."""
    spec, results = load_results(folder)
    header, body, csv_rows = build_table(spec, results)
    write_csv(folder / "report.csv", csv_header(spec), csv_rows)
    plots = draw_all(spec, results, folder)
    markdown = "\n".join(
        [
            f"# {spec.name}",
            "",
            spec.description.strip(),
            "",
            _caption(spec, results),
            "",
            markdown_table(header, body),
            "",
        ]
        + [f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots if p is not None]
        + (relative_section(spec, results, spec.report.relative_to) if spec.report.relative_to else [])
        + (versus_section(spec, results, spec.report.versus) if spec.report.versus else [])
        + (plateau_section(results, PlateauCheck(*spec.report.plateau)) if spec.report.plateau else [])
        + provenance(folder)
    )
    (folder / "report.md").write_text(markdown)
    return markdown


def _caption(spec: Spec, results: list[CellResult]) -> str:
    aggregated = [a for a in spec.grid if a.name not in (spec.report.rows, spec.report.columns)]
    over = ", ".join(f"{a.name} ({len(a.levels)})" for a in aggregated) or "nothing (one run per entry)"
    missing = [r.cell.name for r in results if r.summary is None]
    text = (
        f"{len(results) - len(missing)}/{len(results)} cells finished. Each entry: mean ± sample std over "
        f"{over}; accuracies in %. Bold: best source-blind entry per column; "
        f"'{UPPER_BOUND.strip()}' marks the supervised reference, which reads true labels."
    )
    if spec.report.reference is not None:
        ref = spec.report.reference
        text += f" Columns marked ({ref.title}): published numbers, not measured here" + (
            f"; source: {ref.source}." if ref.source else "."
        )
    if spec.overrides:
        changed = " ".join(f"{k}={v}" for k, v in spec.overrides.items())
        text += f" Shortened or changed from the spec's base for every cell (`--set`): {changed}."
    if missing:
        text += f" Not finished: {_missing_summary(spec, results)}."
    seconds = sum(r.value("wall-seconds") or 0.0 for r in results)
    return text + f" Run time of the finished cells: {seconds / 3600:.2f} h in total."


KEPT_PER_CELL = ("config.json", "summary.json", "metrics.jsonl", "partition.json")
KEPT_FILES = ("report.md", "report.csv", SPEC_FILE, INVOCATIONS_FILE, "cells.jsonl")


def copy_results(folder: Path, dest: Path) -> list[Path]:
    """Copy what a reader needs to check a report into `dest`: the report, its plots, the spec, the
    provenance and, per finished cell, its settings and numbers (not its logs, plots or checkpoints).

    Why: `experiments/runs/` is ignored by git; results worth committing go to `experiments/results/`
    as small text files and PNGs, and the report there still reads the same and can be redrawn from it.
    """
    _, results = load_results(folder)
    if dest.resolve() == folder.resolve():
        raise ConfigError(f"--copy-to {dest}: that is the bench folder itself; give another folder")
    sources = [p for p in sorted(folder.iterdir()) if p.is_file() and (p.name in KEPT_FILES or p.suffix == ".png")]
    sources += [folder / r.cell.name / name for r in results if r.summary is not None for name in KEPT_PER_CELL]
    copied = []
    for source in sources:
        if source.is_file():
            target = dest / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copyfile(source, target)))
    return copied


def provenance(folder: Path) -> list[str]:
    """How the cells were made: every `mekd-fl bench` call into this folder, with its date and machine."""
    file = folder / INVOCATIONS_FILE
    lines = file.read_text().splitlines() if file.is_file() else []
    entries = [json.loads(line) for line in lines if line.strip()]
    if not entries:
        return []
    out = [
        "## How these results were made",
        "",
        "Every `mekd-fl bench` call that ran cells into this folder (from `invocations.jsonl`); "
        "each cell's own settings are in its `config.json`, and `spec.yaml` holds the grid and `--set`.",
        "",
    ]
    for e in entries:
        m = e.get("machine", {})
        where = f"{m.get('cores')} CPU cores ({m.get('cpu')})" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        out.append(
            f"- {e.get('started-at')}: `{e.get('command')}` -> {e.get('cells-to-run')} cells on {where}, "
            f"torch {m.get('torch')}, Python {m.get('python')}"
        )
    return out + [""]


def _missing_summary(spec: Spec, results: list[CellResult]) -> str:
    """Unfinished cells, whole grid levels first ("seed=2, seed=3: 60 cells", as `--only` leaves them)."""
    missing = [r for r in results if r.summary is None]
    parts, covered = [], set()
    for axis in spec.grid:
        for level in axis.levels:
            members = [r for r in results if r.cell.labels[axis.name] == level.label]
            if len(members) < len(results) and all(r.summary is None for r in members):
                parts.append(f"{axis.name}={level.label}")
                covered.update(r.cell.name for r in members)
    rest = [r.cell.name for r in missing if r.cell.name not in covered]
    text = f"{', '.join(parts)} ({len(covered)} cells, not run yet)" if parts else ""
    if rest:
        text += ("; " if text else "") + _shorten(rest)
    return text


def _shorten(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
