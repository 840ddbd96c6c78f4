"""`mekd-fl bench SPEC`: every cell of an experiment spec through Flower's simulation runtime, resumable.

Why resumable by folder: a sweep of dozens of runs outlives terminals, machines and mistakes. A cell's
folder with `summary.json` is finished and is never touched again; a folder without one is the trace
of a killed run, and one whose `summary.json` says "failed" (a timeout, a crash) is a failed run: both
are moved aside (nothing is deleted) and run again. Cells with the same
`num-clients` share one simulation (`multirun.run_configs`), so Ray starts once per federation size.
A resumed folder keeps one teacher per recipe (`teachers.check_teachers`).

Layout of `OUT/<spec name>/`: `spec.yaml` (the resolved spec, `--set` included), one folder per cell,
`cells.jsonl` (one line per attempted cell: status, error, wall time), `bench.log` (every log line),
`invocations.jsonl` (each call: command line, date, machine), and the report (`report.md`, `report.csv`, plots).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mekd_fl.bench.cells import SPEC_FILE
from mekd_fl.bench.report import INVOCATIONS_FILE, write_report
from mekd_fl.bench.spec import Cell, load_spec
from mekd_fl.bench.teachers import check_teachers
from mekd_fl.distill.base import get_class
from mekd_fl.errors import ConfigError
from mekd_fl.server.summary import RunSummary

DEFAULT_OUT = "experiments/runs"
# Settings that do not change a cell's result: a finished cell stays valid when only these differ.
NEUTRAL_SETTINGS = ("out-dir", "cache-dir", "data-dir", "download", "device", "answer-cache")
_START = re.compile(r"^=== run \d+/\d+: (\S+)$")
_FAILED = re.compile(r"^=== run (\S+) failed: (.*)$")
_ROUND = re.compile(r"^\[round (\d+)/(\d+)\]")


def cell_state(path: Path) -> str:
    """done (summary.json says completed), failed (summary.json says failed), partial (a run started there
    and never finished) or todo. Failed and partial cells are run again by the next call."""
    summary = path / "summary.json"
    if summary.is_file():
        try:
            status = RunSummary.read(summary).status
        except ValueError:
            return "partial"  # unreadable: treat as the trace of an unfinished run
        return "failed" if status == "failed" else "done"
    return "partial" if path.exists() else "todo"


#: Cell states whose folder is moved aside and the cell run again.
RERUN = ("partial", "failed")


def _as_run(config: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings as its method runs with them (`Distiller.runs_with`): a setting of another
    method, or a default that now means the same, never makes a finished cell count as changed."""
    try:
        return get_class(str(config.get("method"))).runs_with(config)
    except ConfigError:  # a method no longer registered (a plug-in): compare every setting
        return config


def check_finished(cells: list[Cell], folder: Path) -> None:
    """Refuse to resume when a finished cell was run with other settings than the spec now gives it."""
    for cell in cells:
        saved_file = folder / cell.name / "config.json"
        if cell_state(folder / cell.name) != "done" or not saved_file.is_file():
            continue
        saved, wanted = _as_run(json.loads(saved_file.read_text())), _as_run(cell.config.to_dict())
        changed = [k for k in wanted if k not in NEUTRAL_SETTINGS and saved.get(k, wanted[k]) != wanted[k]]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"cell {cell.name} was finished with {key}={saved[key]!r} but the spec now gives "
                f"{key}={wanted[key]!r}; use another --out, or move that folder away to rerun it"
            )


def move_aside(path: Path) -> Path:
    """Rename an unfinished cell's folder to `<name>.incomplete-<timestamp>` (never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.incomplete-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.incomplete-{stamp}-{n}")
    path.rename(target)
    return target


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The `log` callback of `run_configs`: the whole log to bench.log, short progress lines to the
    console, and one cells.jsonl line per cell as soon as it ends (so a kill loses no record)."""

    def __init__(self, folder: Path, cells: list[Cell], to_run: int, echo: Callable[[str], None]) -> None:
        self.folder, self.echo, self.to_run = folder, echo, to_run
        self.index = {cell.name: i for i, cell in enumerate(cells, 1)}
        self.total = len(cells)
        self.t0 = time.time()
        self.finished = 0
        self.current: str | None = None
        self.cell_t0 = self.t0
        self.recorded: set[str] = set()
        self.moved: dict[str, str] = {}
        self.log_file = (folder / "bench.log").open("a")

    def __call__(self, line: str) -> None:
        self.log_file.write(line + "\n")
        self.log_file.flush()
        if match := _START.match(line):
            self.current, self.cell_t0 = match.group(1), time.time()
            self.echo(f"{self.tag(self.current)} ... started")
        elif match := _FAILED.match(line):
            self.record(match.group(1), "failed", match.group(2))
        elif (match := _ROUND.match(line)) and self.current:
            self._round(int(match.group(1)), int(match.group(2)))
        elif line.startswith("[done]") and self.current:
            self.record(self.current, "ok", None)
        elif line.startswith(("[teacher]", "[emulator]")) and not line.startswith("[emulator] client") and self.current:
            self.echo(f"{self.tag(self.current)} ... {line}")  # the long phases before round 1

    def tag(self, name: str) -> str:
        return f"cell {self.index[name]}/{self.total} {name}"

    def _round(self, done: int, rounds: int) -> None:
        now = time.time()
        units = self.finished + done / rounds
        eta = _duration((now - self.t0) / units * (self.to_run - units)) if units > 0 else "?"
        self.echo(
            f"{self.tag(self.current)} ... round {done}/{rounds}, {_duration(now - self.cell_t0)} in cell, "
            f"{_duration(now - self.t0)} elapsed, ETA {eta}"
        )

    def record(self, name: str, status: str, error: str | None) -> None:
        if name in self.recorded:
            return
        self.recorded.add(name)
        self.finished += 1
        wall = time.time() - self.cell_t0 if name == self.current else None
        entry = {
            "cell": name,
            "status": status,
            "error": error,
            "wall-s": None if wall is None else round(wall, 1),
            "moved-aside": self.moved.get(name),
            "finished-at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with (self.folder / "cells.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.echo(f"{self.tag(name)} ... {status}" + (f": {error}" if error else f" in {_duration(wall or 0)}"))
        self.current = None if name == self.current else self.current

    def close(self) -> None:
        self.log_file.close()


def bench(
    spec_path: str,
    out: str = DEFAULT_OUT,
    overrides: Mapping[str, Any] | None = None,
    *,
    only: Mapping[str, list[str]] | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    command: str | None = None,
    **run_kwargs: Any,
) -> int:
    """Run the spec's unfinished cells (those matching `only`), then write its report.

    Returns 0, or 1 when a cell failed. `command` is the command line recorded in `invocations.jsonl`.
    """
    spec = load_spec(spec_path, overrides)
    folder = Path(out) / spec.name
    cells = spec.cells(out_dir=str(folder))
    selected = spec.select(cells, only or {})
    states = {cell.name: cell_state(folder / cell.name) for cell in cells}
    check_finished(cells, folder)
    todo = [cell for cell in selected if states[cell.name] != "done"]
    scope = f" ({len(selected)} selected by --only)" if only else ""
    echo(
        f"{spec.name}: {len(cells)} cells{scope}, {sum(states[c.name] == 'done' for c in cells)} done, "
        f"{len(todo)} to run -> {folder}"
    )
    if dry_run:
        for cell in selected:
            note = {
                "partial": "  (unfinished folder: moved aside, then rerun)",
                "failed": "  (failed run: moved aside, then rerun)",
            }.get(states[cell.name], "")
            echo(f"  [{states[cell.name]:7}] {cell.name}{note}")
        return 0
    from mekd_fl.server.app import prepare

    for cell in todo:  # data files and partitions checked before anything runs
        try:
            prepare(cell.config, resume=states[cell.name] in RERUN, in_process=True)  # that folder is moved aside below
        except ConfigError as exc:
            raise ConfigError(f"cell {cell.name}: {exc}") from None
    check_teachers(cells, todo, folder, echo)  # may train a teacher (cached for the cell); writes no result
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    if todo:
        record_invocation(folder, command or f"mekd-fl bench {spec_path}", only or {}, len(todo), run_kwargs)
    progress = Progress(folder, cells, len(todo), echo)
    for cell in todo:
        if states[cell.name] in RERUN:
            moved = move_aside(folder / cell.name)
            progress.moved[cell.name] = moved.name
            what = "unfinished" if states[cell.name] == "partial" else "failed run's"
            echo(f"{progress.tag(cell.name)} ... {what} folder moved aside to {moved.name}")
    try:
        for group in _by_num_clients(todo):
            _run_group(group, progress, run_kwargs)
    finally:
        progress.close()
    failed = _failed(folder, todo)
    if todo:
        echo(
            f"{spec.name}: {len(todo) - len(failed)} of {len(todo)} cells ran, {len(failed)} failed"
            + (f" ({', '.join(failed)}; see {folder / 'cells.jsonl'})" if failed else "")
        )
    echo(write_report(folder))
    echo(f"report: {folder / 'report.md'}")
    return 1 if failed else 0


def machine() -> dict[str, Any]:
    """What ran the cells, for the report: timings and float results depend on it."""
    import platform

    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def record_invocation(
    folder: Path, command: str, only: Mapping[str, list[str]], cells: int, run_kwargs: Mapping[str, Any]
) -> None:
    """Append who ran what, where and when to `invocations.jsonl` (the report's provenance section)."""
    entry = {
        "started-at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "only": dict(only),
        "cells-to-run": cells,
        "machine": machine(),
        "client-resources": {k: v for k, v in run_kwargs.items() if k.startswith("client_")},
    }
    with (folder / INVOCATIONS_FILE).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _by_num_clients(cells: list[Cell]) -> list[list[Cell]]:
    """One simulation per federation size, groups in the order their first cell appears."""
    groups: dict[int, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.config.num_clients, []).append(cell)
    return list(groups.values())


def _run_group(group: list[Cell], progress: Progress, run_kwargs: dict[str, Any]) -> None:
    """Run one simulation; cells it could not record itself (a crash of the runtime) are recorded failed."""
    from mekd_fl.bench.multirun import run_configs

    try:
        outcome = run_configs([cell.config for cell in group], log=progress, **run_kwargs)
    except Exception as exc:  # the runtime itself failed: record every cell of the group, go on with the next
        outcome = {cell.name: {"error": f"{type(exc).__name__}: {exc}"} for cell in group}
    for cell in group:
        result = outcome.get(cell.name, {"error": "not run"})
        if "error" in result:
            progress(f"--- traceback of {cell.name}:\n{result['error']}")
            progress.record(cell.name, "failed", result["error"].strip().splitlines()[-1])
        else:
            progress.record(cell.name, "ok", None)


def _failed(folder: Path, cells: list[Cell]) -> list[str]:
    return [cell.name for cell in cells if cell_state(folder / cell.name) != "done"]
