"""The figures of a bench report: which numbers each one shows, taken from the cells (drawn by mekd_fl.plots).

Each `plot_*` returns the PNG's path, or None when the sweep has nothing for that figure (no rounds yet,
no alpha axis, no cell with that metric), so the report links only what exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mekd_fl import plots
from mekd_fl.bench.cells import CellResult, axis_labels, members
from mekd_fl.bench.spec import Cell, Spec
from mekd_fl.plots import Series

#: Settings that set how many teacher queries a client sends: an axis over them is a query-budget axis.
BUDGET_SETTINGS = ("query-fraction", "query-views", "query-budget")
QUERIES_LABEL = "teacher queries used (all clients)"


def draw_all(spec: Spec, results: list[CellResult], folder: Path) -> list[Path | None]:
    """Every figure of the report, written into `folder` (None for a figure with nothing to show)."""
    return [
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


def plot_rounds(spec: Spec, results: list[CellResult], path: Path) -> Path | None:
    """Server test accuracy per round, one line per rows value (mean ± std band), one panel per column."""
    if not any(r.rounds for r in results):
        return None
    panels = []
    for col in axis_labels(spec, spec.report.columns):
        lines = []
        for row in axis_labels(spec, spec.report.rows):
            curves = [
                {r["round"]: r["server/accuracy"] for r in m.rounds if r.get("server/accuracy") is not None}
                for m in members(spec, results, row, col)
                if m.rounds
            ]
            if not curves:
                continue
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            if not rounds:
                continue
            acc = 100 * np.array([[c[k] for k in rounds] for c in curves])
            lines.append(Series(row, rounds, acc.mean(0), acc.std(0)))
        panels.append((f"{spec.report.columns}={col}" if col is not None else spec.name, lines))
    return plots.accuracy_per_round(panels, spec.report.rows, path)


def plot_alpha(spec: Spec, results: list[CellResult], path: Path) -> Path | None:
    """Final student accuracy against the Dirichlet alpha (log scale), when the sweep varies alpha."""
    dirichlet = [r for r in results if r.summary is not None and r.cell.config.partition == "dirichlet"]
    if len({r.cell.config.alpha for r in dirichlet}) < 2:
        return None
    lines = []
    for row in axis_labels(spec, spec.report.rows):
        cells = [r for r in dirichlet if r.cell.labels[spec.report.rows] == row]
        alphas = sorted({r.cell.config.alpha for r in cells})
        values = [[100 * r.value("student-accuracy") for r in cells if r.cell.config.alpha == a] for a in alphas]
        if alphas:
            lines.append(Series(row, alphas, [np.mean(v) for v in values], [np.std(v) for v in values]))
    return plots.accuracy_vs_alpha(lines, spec.report.rows, path)


def plot_scatter(spec: Spec, results: list[CellResult], metric: str, xlabel: str, path: Path) -> Path | None:
    """Final student accuracy against `metric` (teacher queries, emulator FID), one colour per rows value."""
    points = [r for r in results if r.value(metric) is not None and r.value("student-accuracy") is not None]
    if not points:
        return None
    sets = []
    for row in axis_labels(spec, spec.report.rows):
        cells = [r for r in points if r.cell.labels[spec.report.rows] == row]
        if cells:
            sets.append(
                Series(row, [r.value(metric) for r in cells], [100 * r.value("student-accuracy") for r in cells])
            )
    return plots.accuracy_scatter(sets, xlabel, spec.report.rows, path)


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
    for row in axis_labels(spec, rows):
        for r in results:
            if r.cell.labels[rows] != row or r.value("queries-total") is None or r.value("student-accuracy") is None:
                continue
            name = " / ".join([row, *(r.cell.labels[a] for a in other)])
            groups.setdefault(name, {}).setdefault(tuple(r.cell.labels[a] for a in budget), []).append(r)
    curves = {}
    for name, levels in groups.items():
        points = []
        for cells in levels.values():
            acc = [100 * m.value("student-accuracy") for m in cells]
            points.append(
                (
                    float(np.mean([m.value("queries-total") for m in cells])),
                    float(np.mean(acc)),
                    float(np.std(acc)),
                    len(cells),
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
    lines = []
    for name, points in curves.items():
        xs, ys, sd, _ = zip(*points)
        lines.append(Series(name, xs, ys, sd))
    return plots.accuracy_vs_queries(lines, QUERIES_LABEL, spec.report.rows, path)


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
    panels = []
    for title, r in shown.items():
        counts = np.asarray(r.partition["label_counts"])
        names = r.partition.get("class_names") or [str(c) for c in range(counts.shape[1])]
        panels.append((f"{title} (seed {r.cell.config.seed})", counts, names))
    return plots.partitions(panels, path)
