"""A resumed bench folder keeps one teacher per recipe: cells that another teacher would teach are refused.

Why: the teacher is cached per recipe, but the same recipe trained on another machine (other CPU
kernels) gives other weights, a test accuracy some tenths apart, and students that move by up to a
point. A bench resumed on a fresh machine would retrain the teacher and silently add its cells to
those of the old one, and a report would compare students of two teachers. So before any cell runs,
each cell to run whose recipe already taught finished cells of the folder gets its teacher resolved
(loaded from the cache, or trained and cached: the cell would do the same first) and compared, by the
digest of its weights, with theirs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mekd_fl.bench.cells import read_summary
from mekd_fl.bench.spec import Cell
from mekd_fl.config import RunConfig
from mekd_fl.device import pick_device
from mekd_fl.errors import ConfigError
from mekd_fl.run_data import run_data
from mekd_fl.server.summary import RunSummary
from mekd_fl.teacher.training import teacher_for_run

#: The settings a teacher's recipe (`TeacherRecipe`, the cache key) is made of: the data set, its
#: stratified server share (drawn from the seed before any partition) and the teacher's training.
RECIPE_SETTINGS = (
    "dataset", "seed", "server_share", "teacher_arch", "teacher_epochs", "teacher_lr", "teacher_batch_size",
)  # fmt: skip


def recipe_group(config: RunConfig) -> str:
    """Cells with equal groups share one teacher recipe, told from their settings without loading data."""
    return json.dumps([getattr(config, name) for name in RECIPE_SETTINGS], default=str)


def check_teachers(cells: list[Cell], todo: list[Cell], folder: Path, log: Callable[[str], None] = print) -> None:
    """Raise ConfigError when a cell of `todo` would be taught by another teacher than the finished cells
    of `cells` (the spec's grid, in `folder`) of the same recipe: by weights digest, or, where no finished
    cell has one (written before it), by test accuracy, as `cells.same_teacher` does. Resolving a
    teacher may train it."""
    taught: dict[str, list[RunSummary]] = {recipe_group(cell.config): [] for cell in todo}
    for cell in cells:
        group = recipe_group(cell.config)
        summary = read_summary(folder / cell.name / "summary.json") if group in taught else None
        if summary is not None and summary.status == "completed":
            taught[group].append(summary)
    for cell in todo:
        before = taught.pop(recipe_group(cell.config), [])  # one check per recipe
        if not before:
            continue
        _, meta = teacher_for_run(run_data(cell.config), cell.config, pick_device(cell.config.device), log)
        digests = {s.teacher_digest for s in before if s.teacher_digest}
        if meta["digest"] in digests or (not digests and meta["test_accuracy"] in {s.teacher_accuracy for s in before}):
            continue
        old = next((s for s in before if s.teacher_digest), before[0])
        raise ConfigError(
            f"cell {cell.name}: its teacher (test accuracy {meta['test_accuracy']:.4f}, weights {meta['digest']}) "
            f"is not the one that taught this folder's {len(before)} finished cell(s) of the same recipe "
            f"({_accuracy(old.teacher_accuracy)}, weights {old.teacher_digest or 'not recorded'}; retrained on "
            f"another machine?); students of two teachers are not comparable: use another --out"
        )


def _accuracy(value: float | None) -> str:
    return "test accuracy not recorded" if value is None else f"{value:.4f}"
