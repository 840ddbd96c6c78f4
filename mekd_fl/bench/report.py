"""`mekd-fl report DIR`: tables and plots of a bench folder (written by `mekd-fl bench`).

Why from the folder alone: a sweep runs for hours and may be resumed, moved or half finished; its saved
`spec.yaml` says which cells exist and how to lay them out, and each cell's folder holds its numbers,
so a report can be redrawn at any time without running anything. Values are the mean and the sample
standard deviation over every axis that is neither the rows nor the columns (usually the seeds).
The supervised reference reads true labels, so it is shown as an upper bound and never marked best.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mekd_fl.bench.spec import METRICS, Cell, Reference, Spec, load_spec
from mekd_fl.bench.tables import markdown_table, write_csv
from mekd_fl.errors import ConfigError

SPEC_FILE = "spec.yaml"
INVOCATIONS_FILE = "invocations.jsonl"
UPPER_BOUND = " (labels, upper bound)"


@dataclass(frozen=True)
class CellResult:
    """What one cell's folder holds; `summary` is None while the cell is unfinished or failed."""

    cell: Cell
    summary: dict[str, Any] | None
    rounds: list[dict[str, Any]]
    partition: dict[str, Any] | None

    def value(self, metric: str) -> float | None:
        value = (self.summary or {}).get(metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
    return CellResult(cell, read("summary.json"), rounds, read("partition.json"))


# ---------------------------------------------------------------------------------------- tables
def _labels(spec: Spec, axis: str | None) -> list[str | None]:
    return [level.label for level in spec.axis(axis).levels] if axis else [None]


def _members(spec: Spec, results: list[CellResult], row: str | None, col: str | None) -> list[CellResult]:
    rows, cols = spec.report.rows, spec.report.columns
    return [
        r
        for r in results
        if (row is None or r.cell.labels[rows] == row) and (col is None or r.cell.labels[cols] == col)
    ]


def stat(members: list[CellResult], metric: str) -> Stat:
    """Mean/std inputs of one entry; an entry is source-blind unless a finished run says otherwise."""
    values = tuple(v for v in (m.value(metric) for m in members) if v is not None)
    blind = all(m.summary.get("source-blind", True) for m in members if m.summary)
    return Stat(values, len(members), blind)


def teacher_stat(members: list[CellResult]) -> Stat:
    """Teacher accuracy, one value per distinct teacher (methods sharing a teacher count it once)."""
    teachers = {
        (m.cell.config.teacher_arch, m.cell.config.seed, m.cell.config.dataset): m.value("teacher-accuracy")
        for m in members
        if m.summary
    }
    return Stat(tuple(v for v in teachers.values() if v is not None), len(teachers) or 1, True)


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
    row_labels, col_labels = _labels(spec, rows), _labels(spec, cols)
    columns = [(metric, col) for metric in metrics for col in col_labels]
    stats = {
        (row, metric, col): stat(_members(spec, results, row, col), metric)
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
        cells = [row + (UPPER_BOUND if upper else "")]
        for metric, col in columns:
            value = stats[row, metric, col]
            text = format_stat(value, metric)
            is_best = value.blind and bool(value.values) and value.mean == best.get((metric, col))
            cells.append(f"**{text}**" if is_best else text)
            csv_rows.append(_csv_row(spec, row, col, metric, value, is_best))
        body.append(cells)
    if "student-accuracy" in metrics:  # the teacher beside its students, as in the paper's tables
        cells = ["teacher (reference)"]
        for metric, col in columns:
            value = teacher_stat(_members(spec, results, None, col))
            cells.append(format_stat(value, "teacher-accuracy") if metric == "student-accuracy" else "")
            if metric == "student-accuracy":
                csv_rows.append(_csv_row(spec, "teacher", col, "teacher-accuracy", value, False))
        body.append(cells)
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


# ----------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_rounds(spec: Spec, results: list[CellResult], path: Path) -> Path | None:
    """Server test accuracy per round, one line per rows value (mean ± std band), one panel per column."""
    cols = _labels(spec, spec.report.columns)
    if not any(r.rounds for r in results):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 1, 3.6), squeeze=False, sharey=True)
    for ax, col in zip(axes[0], cols):
        for row in _labels(spec, spec.report.rows):
            curves = [
                {r["round"]: r["server/accuracy"] for r in m.rounds if r.get("server/accuracy") is not None}
                for m in _members(spec, results, row, col)
                if m.rounds
            ]
            if not curves:
                continue
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            if not rounds:
                continue
            acc = 100 * np.array([[c[k] for k in rounds] for c in curves])
            (line,) = ax.plot(rounds, acc.mean(0), marker="o", markersize=3, label=row)
            ax.fill_between(
                rounds, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=line.get_color(), alpha=0.2
            )
        ax.set_title(f"{spec.report.columns}={col}" if col is not None else spec.name, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("server test accuracy (%)")
    drawn = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]  # a half-run sweep has empty panels
    if drawn:
        drawn[-1].legend(fontsize=7, title=spec.report.rows, title_fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_alpha(spec: Spec, results: list[CellResult], path: Path) -> Path | None:
    """Final student accuracy against the Dirichlet alpha (log scale), when the sweep varies alpha."""
    dirichlet = [r for r in results if r.summary and r.cell.config.partition == "dirichlet"]
    if len({r.cell.config.alpha for r in dirichlet}) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row in _labels(spec, spec.report.rows):
        members = [r for r in dirichlet if r.cell.labels[spec.report.rows] == row]
        alphas = sorted({r.cell.config.alpha for r in members})
        values = [[100 * r.value("student-accuracy") for r in members if r.cell.config.alpha == a] for a in alphas]
        if alphas:
            ax.errorbar(
                alphas, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3, label=row
            )
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet alpha (smaller = more skewed)")
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=spec.report.rows, title_fontsize=7)
    return _save(fig, path)


def plot_scatter(spec: Spec, results: list[CellResult], metric: str, xlabel: str, path: Path) -> Path | None:
    """Final student accuracy against `metric` (teacher queries, emulator FID), one colour per rows value."""
    points = [r for r in results if r.value(metric) is not None and r.value("student-accuracy") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row in _labels(spec, spec.report.rows):
        members = [r for r in points if r.cell.labels[spec.report.rows] == row]
        if members:
            ax.scatter(
                [r.value(metric) for r in members],
                [100 * r.value("student-accuracy") for r in members],
                label=row,
                alpha=0.8,
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=spec.report.rows, title_fontsize=7)
    return _save(fig, path)


#: Settings that set how many teacher queries a client sends: an axis over them is a query-budget axis.
BUDGET_SETTINGS = ("query-fraction", "query-views", "query-budget")
QUERIES_LABEL = "teacher queries used (all clients)"


def query_curves(spec: Spec, results: list[CellResult]) -> dict[str, list[tuple[float, float, float, int]]]:
    """Accuracy-vs-queries curves: name -> [(mean queries, mean accuracy %, std %, cells)], ordered by queries.

    A curve per rows value (and per label of any other axis that is neither a budget axis, one whose
    levels set a setting in `BUDGET_SETTINGS`, nor a seed axis); its points are its budget levels, each
    the mean over the level's finished cells (the seeds). Empty when the grid has no budget axis.
    """
    rows = spec.report.rows
    budget = [
        a.name for a in spec.grid if a.name != rows and any(set(lv.settings) & set(BUDGET_SETTINGS) for lv in a.levels)
    ]
    if not budget:
        return {}
    seeds = [a.name for a in spec.grid if all(set(lv.settings) == {"seed"} for lv in a.levels)]
    other = [a.name for a in spec.grid if a.name not in (rows, *budget, *seeds)]
    groups: dict[str, dict[tuple[str, ...], list[CellResult]]] = {}
    for row in _labels(spec, rows):
        for r in results:
            if r.cell.labels[rows] != row or r.value("queries-total") is None or r.value("student-accuracy") is None:
                continue
            name = " / ".join([row, *(r.cell.labels[a] for a in other)])
            groups.setdefault(name, {}).setdefault(tuple(r.cell.labels[a] for a in budget), []).append(r)
    curves = {}
    for name, levels in groups.items():
        points = []
        for members in levels.values():
            acc = [100 * m.value("student-accuracy") for m in members]
            points.append(
                (
                    float(np.mean([m.value("queries-total") for m in members])),
                    float(np.mean(acc)),
                    float(np.std(acc)),
                    len(members),
                )
            )
        curves[name] = sorted(points)
    return curves


def plot_queries(spec: Spec, results: list[CellResult], path: Path) -> Path | None:
    """Final student accuracy against the teacher queries used: the query-efficiency curve.

    With a budget axis in the grid (query-fraction, query-views or query-budget), one line per rows value
    through its budget levels, ordered by queries (mean ± std over seeds; log x when the budgets span
    10x or more). Without one, one point per cell, as `plot_scatter` draws it.
    """
    curves = query_curves(spec, results)
    if not curves:
        return plot_scatter(spec, results, "queries-total", QUERIES_LABEL, path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        xs, ys, sd, _ = zip(*points)
        ax.errorbar(xs, ys, yerr=sd, marker="o", markersize=4, capsize=3, label=name)
    xs = [x for points in curves.values() for x, *_ in points]
    if min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        # Ticks at the budgets themselves (log-scale minor labels overlap between them).
        ticks = sorted({round(x, -1) for x in xs})
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [f"{t:,.0f}" for t in ticks], fontsize=7)
            ax.minorticks_off()
    ax.set_xlabel(QUERIES_LABEL)
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=spec.report.rows, title_fontsize=7)
    return _save(fig, path)


def partition_title(cell: Cell) -> str:
    cfg = cell.config
    detail = {
        "dirichlet": f" alpha={cfg.alpha}",
        "pathological": f" {cfg.classes_per_client} classes/client",
        "shard": f" {cfg.shards_per_client} shards/client",
    }
    return f"{cfg.partition}{detail.get(cfg.partition, '')}, {cfg.num_clients} clients"


def plot_partitions(results: list[CellResult], path: Path) -> Path | None:
    """Each distinct partition's label counts (stacked bars per client), from a cell's partition.json."""
    shown: dict[str, CellResult] = {}
    for r in results:
        if r.partition and partition_title(r.cell) not in shown:
            shown[partition_title(r.cell)] = r
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown) + 1.5, 3.4), squeeze=False)
    for ax, (title, r) in zip(axes[0], shown.items()):
        counts = np.asarray(r.partition["label_counts"])
        names = r.partition.get("class_names") or [str(c) for c in range(counts.shape[1])]
        cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
        bottom = np.zeros(len(counts))
        for c in range(counts.shape[1]):
            ax.bar(range(len(counts)), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=names[c])
            bottom += counts[:, c]
        ax.set_title(f"{title} (seed {r.cell.config.seed})", fontsize=9)
        ax.set_xlabel("client")
        ax.set_xticks(range(len(counts)))
    axes[0][0].set_ylabel("images")
    if counts.shape[1] <= 20:
        axes[0][-1].legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- report
def write_report(folder: Path) -> str:
    """Write report.md, report.csv and the plots into `folder`; returns the Markdown."""
    spec, results = load_results(folder)
    header, body, csv_rows = build_table(spec, results)
    write_csv(folder / "report.csv", csv_header(spec), csv_rows)
    plots = [
        plot_rounds(spec, results, folder / "accuracy_per_round.png"),
        plot_alpha(spec, results, folder / "accuracy_vs_alpha.png"),
        plot_queries(spec, results, folder / "accuracy_vs_queries.png"),
        plot_scatter(
            spec,
            results,
            "emulator-fid-mean",
            "emulator FID (mean over clients; lower is better)",
            folder / "accuracy_vs_fid.png",
        ),
        plot_partitions(results, folder / "label_distribution.png"),
    ]
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
