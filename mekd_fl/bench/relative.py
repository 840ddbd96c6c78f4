"""Each row's accuracy at every column as a percentage of its own accuracy at one reference column.

Why: on a query-budget curve, methods that end at different accuracies are compared on how much of
their own full-budget accuracy they keep with fewer queries, which the absolute table hides. Ratios
are taken per matching pair of cells (same seed and every other label), then averaged, so a seed that
is good at every budget does not widen the spread.
"""

from __future__ import annotations

import numpy as np

from mekd_fl.bench import cells
from mekd_fl.bench.cells import CellResult
from mekd_fl.bench.spec import Spec
from mekd_fl.bench.tables import markdown_table

METRIC = "student-accuracy"


def ratios(spec: Spec, results: list[CellResult], row: str | None, col: str | None, reference: str) -> list[float]:
    """100 x accuracy(row, col) / accuracy(row, reference), one per pair of finished cells that share
    every other label."""
    rows_axis, cols_axis = spec.report.rows, spec.report.columns
    others = [a.name for a in spec.grid if a.name not in (rows_axis, cols_axis)]

    def key(r: CellResult) -> tuple[str, ...]:
        return tuple(r.cell.labels[a] for a in others)

    base = {key(r): r.value(METRIC) for r in cells.members(spec, results, row, reference)}
    out = []
    for r in cells.members(spec, results, row, col):
        value, ref = r.value(METRIC), base.get(key(r))
        if value is not None and ref:
            out.append(100.0 * value / ref)
    return out


def relative_section(spec: Spec, results: list[CellResult], reference: str) -> list[str]:
    """The report's section: mean ± sample std of the ratios (n when fewer than the cells expected)."""
    rows_axis, cols_axis = spec.report.rows, spec.report.columns
    row_labels, col_labels = cells.axis_labels(spec, rows_axis), cells.axis_labels(spec, cols_axis)
    body = []
    for row in row_labels:
        line = [str(row)]
        for col in col_labels:
            values = ratios(spec, results, row, col, reference)
            expected = len(cells.members(spec, results, row, col))
            text = "n/a" if not values else f"{np.mean(values):.1f}"
            if len(values) > 1:
                text += f" ± {np.std(values, ddof=1):.1f}"
            if values and len(values) < expected:
                text += f" (n={len(values)}/{expected})"
            line.append(text)
        body.append(line)
    header = [f"{rows_axis} \\ {cols_axis}"] + [str(c) for c in col_labels]
    return [
        f"## Student accuracy as a percentage of the same {rows_axis}'s at {cols_axis} {reference}",
        "",
        f"Each cell's accuracy over that of the cell with {cols_axis} {reference} and every other label the same "
        "(seed included), x 100; mean ± sample std over those pairs.",
        "",
        markdown_table(header, body),
        "",
    ]
