"""Whether each cell of a sweep reached its plateau: the check a comparison "at convergence" rests on.

Why a check and not a round count: a method that converges more slowly would be compared mid-climb, and
a table of such cells measures speed, not where methods end. A cell is at its plateau when the server
accuracy of its last `rounds` rounds moved by less than `points` percentage points (max - min); the
report lists every cell with its movement and flags the others, instead of leaving them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from mekd_fl.bench.cells import CellResult

ACCURACY = "server/accuracy"  # the per-round key of metrics.jsonl


@dataclass(frozen=True)
class PlateauCheck:
    """The spec's `report.plateau`: how many last rounds, and how far (in points) they may move."""

    rounds: int = 3
    points: float = 0.3


def last_accuracies(result: CellResult, rounds: int) -> list[float]:
    """Server accuracies (%) of the cell's last `rounds` distillation rounds (round >= 1), oldest first."""
    values = [100.0 * float(r[ACCURACY]) for r in result.rounds if r.get("round", 0) >= 1 and ACCURACY in r]
    return values[-rounds:]


def movement(result: CellResult, rounds: int) -> float | None:
    """max - min of the last `rounds` accuracies, in points; None for an unfinished cell or too few rounds."""
    values = last_accuracies(result, rounds)
    if result.summary is None or len(values) < rounds:
        return None
    return max(values) - min(values)


def plateau_section(results: list[CellResult], check: PlateauCheck) -> list[str]:
    """The report's "Plateau check" section: one line per finished cell, the unplateaued ones flagged."""
    finished = [r for r in results if r.summary is not None]
    rows, flagged = [], []
    for r in finished:
        moved = movement(r, check.rounds)
        at = moved is not None and moved < check.points
        if not at:
            flagged.append(r.cell.name)
        last = ", ".join(f"{v:.2f}" for v in last_accuracies(r, check.rounds))
        shown = f"{moved:.2f}" if moved is not None else "n/a (too few rounds)"
        rows.append(f"| {r.cell.name} | {last} | {shown} | {'yes' if at else '**NO**'} |")
    verdict = f"{len(finished) - len(flagged)} of {len(finished)} finished cells are at their plateau" + (
        f"; **not at plateau**: {', '.join(flagged)}." if flagged else "."
    )
    return [
        "## Plateau check",
        "",
        f"A cell is at its plateau when the server accuracy of its last {check.rounds} rounds moved by less "
        f"than {check.points:g} points (max - min). {verdict}",
        "",
        f"| cell | last {check.rounds} accuracies (%) | moved (points) | at plateau |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
