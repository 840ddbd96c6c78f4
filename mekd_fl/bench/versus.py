"""The best of one group of rows against the best of another, cell by cell: "does any of our methods beat
every baseline by `points`, in each seed?".

Why per matching cell and not from the table's means: a goal such as "the best MEKD variant beats the best
of KD and DKD by 1 point in each of 3 seeds" is a statement about each seed (all methods of a seed share
its teacher and partition), and which method is best may change from seed to seed. So for every column
(e.g. budget) and every combination of the other labels (e.g. seed), the best finished cell of each
group is found and their margin compared with `points`. A pair where only one group has finished is left
out; one where some listed rows have not finished is shown with the rows missing, since a missing row
might have been the best. That a seed's cells share one teacher is checked, not assumed (`same_teacher`):
the teacher cache is per machine, and the same recipe trained on another CPU gives another teacher.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from mekd_fl.bench.cells import CellResult, same_teacher
from mekd_fl.bench.plateau import PlateauCheck, movement
from mekd_fl.bench.spec import Spec, Versus
from mekd_fl.bench.tables import markdown_table

METRIC = "student-accuracy"


@dataclass(frozen=True)
class Match:
    """One column label and one combination of the other labels: the best finished cell of each group."""

    column: str | None
    others: dict[str, str]
    ours: CellResult
    baseline: CellResult
    missing: tuple[str, ...]  # rows of either group that have no finished cell here
    one_teacher: bool  # every finished cell compared here distilled from the same teacher

    def reached(self, points: float) -> bool:
        """The goal holds here: a margin of `points` or more between cells of one teacher (cells taught by
        different teachers, e.g. the same recipe trained on another machine, are no fair pairing)."""
        return self.one_teacher and self.margin >= points

    @property
    def margin(self) -> float:
        """ours - baseline, in points."""
        return 100.0 * (_value(self.ours) - _value(self.baseline))


def _value(result: CellResult) -> float:
    value = result.value(METRIC)
    assert value is not None  # only finished cells are matched
    return value


def matches(spec: Spec, results: list[CellResult], versus: Versus) -> list[Match]:
    """Every (column, other labels) where both groups have at least one finished cell, in grid order."""
    rows_axis, cols_axis = spec.report.rows, spec.report.columns
    others = [a.name for a in spec.grid if a.name not in (rows_axis, cols_axis)]
    groups: dict[tuple, list[CellResult]] = defaultdict(list)
    for r in results:
        groups[(r.cell.labels[cols_axis] if cols_axis else None, *(r.cell.labels[a] for a in others))].append(r)
    out = []
    for (column, *labels), members in groups.items():
        finished = {r.cell.labels[rows_axis]: r for r in members if r.value(METRIC) is not None}
        ours = [finished[row] for row in versus.ours if row in finished]
        base = [finished[row] for row in versus.baselines if row in finished]
        if not ours or not base:
            continue
        missing = tuple(row for row in (*versus.ours, *versus.baselines) if row not in finished)
        best_ours, best_base = max(ours, key=_value), max(base, key=_value)
        out.append(Match(column, dict(zip(others, labels)), best_ours, best_base, missing, same_teacher(ours + base)))
    return out


def versus_section(spec: Spec, results: list[CellResult], versus: Versus) -> list[str]:
    """The report's section: one line per match with both bests, the margin and whether it reaches `points`."""
    rows_axis, cols_axis = spec.report.rows, spec.report.columns
    found = matches(spec, results, versus)
    check = PlateauCheck(*spec.report.plateau) if spec.report.plateau else None

    def entry(r: CellResult) -> str:
        moved = movement(r, check.rounds) if check else None
        flag = "*" if check and (moved is None or moved >= check.points) else ""
        return f"{r.cell.labels[rows_axis]} {100.0 * _value(r):.2f}{flag}"

    body = []
    for m in found:
        met = "**yes**" if m.reached(versus.points) else "no"
        where = ([str(m.column)] if cols_axis else []) + list(m.others.values())
        teacher = "yes" if m.one_teacher else "**no**"
        body.append(
            [*where, entry(m.ours), entry(m.baseline), f"{m.margin:+.2f}", met, teacher, ", ".join(m.missing) or "-"]
        )
    met = [m for m in found if m.reached(versus.points)]
    mixed = [m for m in found if not m.one_teacher]
    complete = [m for m in found if not m.missing]
    verdict = (
        f"Reached in {len(met)} of {len(found)} comparisons ({len(complete)} of them with every listed "
        f"{rows_axis} finished)."
        if found
        else "No comparison yet: no column and seed has a finished cell of both groups."
    )
    if mixed:
        verdict += (
            f" **{len(mixed)} of them compare cells taught by different teachers** ('one teacher': no; the same "
            "recipe trained on another machine gives other weights): none of those counts as reached."
        )
    others = [a.name for a in spec.grid if a.name not in (rows_axis, cols_axis)]
    header = ([cols_axis] if cols_axis else []) + others
    header += [
        f"best of {', '.join(versus.ours)}",
        f"best of {', '.join(versus.baselines)}",
        "margin",
        "reached",
        "one teacher",
    ]
    plateau_note = (
        f" An entry marked * is a cell not at its plateau (its last {check.rounds} rounds moved "
        f"{check.points:g} points or more)."
        if check
        else ""
    )
    return [
        f"## Best of {', '.join(versus.ours)} against the best of {', '.join(versus.baselines)}",
        "",
        f"For each {' and '.join(([cols_axis] if cols_axis else []) + others)}: the highest student accuracy (%) "
        f"among the finished cells of each group, and the margin between them; the goal is reached where the "
        f"margin is {versus.points:g} point{'s' if versus.points != 1 else ''} or more. {verdict}{plateau_note} "
        f"'not finished' lists the {rows_axis}s of either group without a finished cell there (one of them "
        "might have been the best).",
        "",
        markdown_table([*header, "not finished"], body) if body else "",
        "",
    ]
