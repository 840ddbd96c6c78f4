"""`mekd-fl bench`: planning, resume bookkeeping and progress (fast), then the smoke spec end to end with a
SIGKILL in the middle (a real bench in a subprocess, through Flower's simulation runtime)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mekd_fl.bench.spec import load_spec
from mekd_fl.bench.sweep import Progress, bench, cell_state, move_aside
from mekd_fl.bench.teachers import check_teachers
from mekd_fl.cli import parse_only
from mekd_fl.errors import ConfigError
from mekd_fl.run_data import run_data
from mekd_fl.teacher.training import teacher_for_run

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml"


def fake_finished(folder: Path, name: str, config: dict) -> Path:
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps({"student-accuracy": 0.5, "source-blind": True}))
    return run


def test_dry_run_lists_cells_and_states_and_writes_nothing(tmp_path: Path) -> None:
    cells = load_spec(SMOKE).cells(out_dir=str(tmp_path / "smoke"))
    fake_finished(tmp_path / "smoke", cells[0].name, cells[0].config.to_dict())
    (tmp_path / "smoke" / cells[1].name).mkdir()  # a run that never finished
    lines: list[str] = []
    assert bench(str(SMOKE), str(tmp_path), dry_run=True, echo=lines.append) == 0
    assert lines[0] == f"smoke: 4 cells, 1 done, 3 to run -> {tmp_path / 'smoke'}"
    assert lines[1].split() == ["[done", "]", cells[0].name]
    assert lines[2].split()[:3] == ["[partial]", cells[1].name, "(unfinished"]
    assert lines[3].split() == ["[todo", "]", cells[2].name]
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == sorted([cells[0].name, cells[1].name])


def test_only_selects_a_slice_of_the_grid(tmp_path: Path) -> None:
    cells = load_spec(SMOKE).cells(out_dir=str(tmp_path / "smoke"))
    fake_finished(tmp_path / "smoke", cells[0].name, cells[0].config.to_dict())
    lines: list[str] = []
    assert bench(str(SMOKE), str(tmp_path), only={"method": ["mekd"]}, dry_run=True, echo=lines.append) == 0
    assert lines[0] == f"smoke: 4 cells (2 selected by --only), 1 done, 2 to run -> {tmp_path / 'smoke'}"
    assert [line.split()[-1] for line in lines[1:]] == [c.name for c in cells if c.labels["method"] == "mekd"]
    lines.clear()
    bench(str(SMOKE), str(tmp_path), only={"method": ["kd"], "partition": ["iid"]}, dry_run=True, echo=lines.append)
    assert lines[0].startswith("smoke: 4 cells (1 selected by --only), 1 done, 0 to run")


@pytest.mark.parametrize(
    ("only", "message"),
    [
        (
            {"clients": ["2"]},
            "--only clients=...: no such grid axis in spec 'smoke'; accepted: method, partition, seed",
        ),
        ({"method": ["kd", "fedavg"]}, "--only method=fedavg: not a level of axis 'method'; accepted: kd, mekd"),
        ({"partition": ["dirichlet"]}, "accepted: iid, dirichlet-a0.5"),
    ],
)
def test_only_with_unknown_axis_or_label_is_refused(tmp_path: Path, only: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        bench(str(SMOKE), str(tmp_path), only=only, echo=lambda _: None)
    assert not (tmp_path / "smoke").exists()


def test_only_on_the_command_line() -> None:
    assert parse_only(["seed=1,2", "method=kd", "seed=3"]) == {"seed": ["1", "2", "3"], "method": ["kd"]}
    for bad in ("seed", "seed=", "=1", "seed=,"):
        with pytest.raises(ConfigError, match="expected AXIS=LABEL"):
            parse_only([bad])


def test_finished_cell_with_other_settings_is_refused(tmp_path: Path) -> None:
    cell = load_spec(SMOKE).cells(out_dir=str(tmp_path / "smoke"))[0]
    fake_finished(tmp_path / "smoke", cell.name, cell.config.to_dict())
    # settings that do not change results may differ (another cache or device) ...
    bench(str(SMOKE), str(tmp_path), {"cache-dir": "elsewhere", "device": "cpu"}, dry_run=True, echo=lambda _: None)
    # ... but a finished cell is never silently mixed with cells run on other settings
    with pytest.raises(
        ConfigError, match=f"cell {cell.name} was finished with num-rounds=1 but the spec now gives num-rounds=2"
    ):
        bench(str(SMOKE), str(tmp_path), {"num-rounds": 2}, dry_run=True, echo=lambda _: None)


def test_a_cell_counts_as_changed_only_by_a_setting_its_method_runs_with(tmp_path: Path) -> None:
    """weight-emulation's -1 means each method's own weight (1 for mekd): cells finished when the spec
    gave 1.0 resume under -1, KD's (which never reads the weight) under any value, and MEKD's are
    refused when its weight really changes."""
    cells = load_spec(SMOKE).cells(out_dir=str(tmp_path / "smoke"))
    for cell in cells:
        fake_finished(tmp_path / "smoke", cell.name, {**cell.config.to_dict(), "weight-emulation": 1.0})
    lines: list[str] = []
    assert bench(str(SMOKE), str(tmp_path), dry_run=True, echo=lines.append) == 0
    assert lines[0] == f"smoke: 4 cells, 4 done, 0 to run -> {tmp_path / 'smoke'}"
    # the KD cells come first in the grid and pass under any weight: the first cell refused is MEKD's
    assert cells[0].labels["method"] == "kd"
    mekd = next(c for c in cells if c.labels["method"] == "mekd")
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"cell {mekd.name} was finished with weight-emulation=1.0 but the spec now gives weight-emulation=10.0"
        ),
    ):
        bench(str(SMOKE), str(tmp_path), {"weight-emulation": 10}, dry_run=True, echo=lambda _: None)


def test_a_resumed_folder_refuses_cells_that_another_teacher_would_teach(tmp_path: Path) -> None:
    """The same teacher recipe retrained on another machine has other weights: a bench resumed there must
    not add its students to the folder's, and must say so before any cell runs or any file is written."""
    overrides = {"cache-dir": str(tmp_path / "cache"), "teacher-epochs": 1}
    folder = tmp_path / "smoke"
    cells = load_spec(SMOKE, overrides).cells(out_dir=str(folder))
    kd_iid, mekd_iid = (
        next(c for c in cells if c.labels["method"] == m and c.labels["partition"] == "iid") for m in ("kd", "mekd")
    )
    finished = fake_finished(folder, kd_iid.name, kd_iid.config.to_dict())
    summary = {"status": "completed", "teacher-accuracy": 0.5, "teacher-digest": "0123456789abcdef"}
    (finished / "summary.json").write_text(json.dumps(summary))
    shown: list[str] = []
    with pytest.raises(
        ConfigError,
        match=rf"cell {re.escape(mekd_iid.name)}: its teacher \(test accuracy [0-9.]+, weights [0-9a-f]{{16}}\) is not "
        r"the one that taught this folder's 1 finished cell\(s\) of the same recipe \(0.5000, weights 0123456789abcdef;"
        r".*use another --out",
    ):
        bench(str(SMOKE), str(tmp_path), overrides, only={"method": ["mekd"], "partition": ["iid"]}, echo=shown.append)
    assert sorted(p.name for p in folder.iterdir()) == [kd_iid.name]  # no spec, log or cell folder written
    assert any(line.startswith("[teacher] training") for line in shown)
    # the teacher is cached: the same teacher passes, once per recipe, and a new folder needs no check
    _, meta = teacher_for_run(run_data(mekd_iid.config), mekd_iid.config, torch.device("cpu"), shown.append)
    (finished / "summary.json").write_text(json.dumps({**summary, "teacher-digest": meta["digest"]}))
    check_teachers(cells, [mekd_iid], folder, shown.append)
    check_teachers(cells, [mekd_iid], tmp_path / "elsewhere", shown.append)
    # a summary written before the digest is compared by the teacher's test accuracy
    (finished / "summary.json").write_text(
        json.dumps({"status": "completed", "teacher-accuracy": meta["test_accuracy"]})
    )
    check_teachers(cells, [mekd_iid], folder, shown.append)
    (finished / "summary.json").write_text(json.dumps({"status": "completed", "teacher-accuracy": 0.25}))
    with pytest.raises(ConfigError, match=r"\(0.2500, weights not recorded; retrained on another machine\?\)"):
        check_teachers(cells, [mekd_iid], folder, shown.append)


def test_move_aside_keeps_everything(tmp_path: Path) -> None:
    for n in range(2):
        run = tmp_path / "cell"
        run.mkdir()
        (run / "metrics.jsonl").write_text(f"{n}\n")
        moved = move_aside(run)
        assert moved.name.startswith("cell.incomplete-") and (moved / "metrics.jsonl").read_text() == f"{n}\n"
        assert cell_state(run) == "todo"
    assert len(list(tmp_path.glob("cell.incomplete-*"))) == 2


def test_a_failed_cell_is_listed_and_run_again_but_a_completed_one_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "smoke"
    cells = [c.name for c in load_spec(SMOKE).cells()]
    for name, status in zip(cells[:2], ("completed", "failed")):
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({"status": status, "reason": "no reply"}))
    assert [cell_state(folder / c) for c in cells[:3]] == ["done", "failed", "todo"]
    shown: list[str] = []
    bench(str(SMOKE), str(tmp_path), dry_run=True, echo=shown.append)
    assert shown[0].startswith("smoke: 4 cells, 1 done, 3 to run")
    assert f"  [failed ] {cells[1]}  (failed run: moved aside, then rerun)" in shown
    (folder / cells[2]).mkdir()
    (folder / cells[2] / "summary.json").write_text("{not json")
    assert cell_state(folder / cells[2]) == "partial"  # a damaged summary is not a finished cell


def test_progress_follows_the_run_log(tmp_path: Path) -> None:
    cells = load_spec(SMOKE).cells()
    shown: list[str] = []
    progress = Progress(tmp_path, cells, to_run=2, echo=shown.append)
    first, second = cells[0].name, cells[1].name
    for line in (
        f"=== run 1/2: {first}",
        "[teacher] training resnet8",
        "[round 0/2] initial student: acc 0.1",
        "[round 1/2] distill (kd): loss 1.0",
        "[round 2/2] distill (kd): loss 0.5",
        "[done] kd on synthetic",
        f"=== run 2/2: {second}",
        f"=== run {second} failed: RuntimeError: out of memory",
    ):
        progress(line)
    progress.close()
    assert shown[0] == f"cell 1/4 {first} ... started"
    assert shown[1] == f"cell 1/4 {first} ... [teacher] training resnet8"
    assert shown[3].startswith(f"cell 1/4 {first} ... round 1/2, 0s in cell, 0s elapsed, ETA ")
    assert shown[-1] == f"cell 2/4 {second} ... failed: RuntimeError: out of memory"
    entries = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert [(e["cell"], e["status"], e["error"]) for e in entries] == [
        (first, "ok", None),
        (second, "failed", "RuntimeError: out of memory"),
    ]
    assert all(isinstance(e["wall-s"], float) for e in entries)
    assert "[round 2/2]" in (tmp_path / "bench.log").read_text()


def bench_command(out: Path, cache: Path) -> dict:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1", MEKD_FL_CACHE=str(cache))
    return {
        "args": [sys.executable, "-m", "mekd_fl.cli", "bench", str(SMOKE), "--out", str(out), "--client-gpus", "0"],
        "env": env,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
    }


def run_bench(out: Path, cache: Path) -> tuple[int, str]:
    proc = subprocess.run(**bench_command(out, cache), timeout=600)
    return proc.returncode, proc.stdout


@pytest.mark.slow
def test_smoke_bench_end_to_end_resumes_after_sigkill(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "smoke"
    cells = [c.name for c in load_spec(SMOKE).cells()]
    # its own process group, so that the kill takes Ray's helper processes with it
    proc = subprocess.Popen(**bench_command(tmp_path / "runs", tmp_path / "cache"), start_new_session=True)
    deadline, unfinished = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if (folder / cells[0] / "summary.json").is_file():
            unfinished = next((c for c in cells[1:] if cell_state(folder / c) == "partial"), None)
            if unfinished:
                break
        time.sleep(0.02)
    assert unfinished, f"bench ended before a cell was caught mid-run: {proc.communicate()[0][-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sum(cell_state(folder / c) == "done" for c in cells)
    first_summary = (folder / cells[0] / "summary.json").read_bytes()
    first_mtime = (folder / cells[0] / "summary.json").stat().st_mtime_ns

    t0 = time.time()
    code, output = run_bench(tmp_path / "runs", tmp_path / "cache")
    assert code == 0, output[-3000:]
    resumed_seconds = time.time() - t0
    assert all(cell_state(folder / c) == "done" for c in cells), output[-3000:]
    # the finished cell was skipped, not redone
    assert (folder / cells[0] / "summary.json").read_bytes() == first_summary
    assert (folder / cells[0] / "summary.json").stat().st_mtime_ns == first_mtime
    assert f"smoke: 4 cells, {done_before} done, {4 - done_before} to run" in output
    assert f"cell 1/4 {cells[0]}" not in output
    # the unfinished one was moved aside (kept) and run again
    aside = list(folder.glob(f"{unfinished}.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "config.json").is_file()
    entries = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]
    rerun = [e for e in entries if e["cell"] == unfinished]
    assert rerun[-1]["status"] == "ok" and rerun[-1]["moved-aside"] == aside[0].name
    assert "round 1/1" in output and "ETA" in output
    # the report: table and plots beside the cells, the spec copy with it
    report = (folder / "report.md").read_text()
    assert "| kd |" in report and "| mekd |" in report and "4/4 cells finished" in report
    for name in (
        "report.csv",
        "spec.yaml",
        "accuracy_per_round.png",
        "accuracy_vs_queries.png",
        "label_distribution.png",
        "bench.log",
    ):
        assert (folder / name).is_file(), name
    # provenance: both calls that ran cells, with the command line and the machine
    calls = [json.loads(line) for line in (folder / "invocations.jsonl").read_text().splitlines()]
    assert [c["cells-to-run"] for c in calls] == [4, 4 - done_before]
    assert all(c["command"].startswith("mekd-fl bench ") and c["machine"]["cores"] >= 1 for c in calls)
    assert (
        "## How these results were made" in report and f"`{calls[1]['command']}` -> {4 - done_before} cells" in report
    )
    for cell in cells:
        summary = json.loads((folder / cell / "summary.json").read_text())
        assert summary["num-rounds"] == 1 and summary["dataset"] == "synthetic"
    # a third call finds everything done: runs nothing, redraws the report
    code, output = run_bench(tmp_path / "runs", tmp_path / "cache")
    assert code == 0 and "4 done, 0 to run" in output and "started" not in output
    print(f"resumed bench: {resumed_seconds:.0f}s")
