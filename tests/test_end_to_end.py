"""End to end through Flower's simulation runtime (Ray), on the synthetic data set.

Each run is a real `mekd-fl run` in a subprocess (Ray and Flower keep process-wide state), so these
tests exercise exactly what a user runs: settings -> data split -> teacher -> emulators -> queries
-> federated distillation -> result files.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import run_mekd_fl

SMALL = [
    "dataset=synthetic",
    "num-clients=3",
    "num-rounds=3",
    "local-epochs=4",
    "batch-size=32",
    "teacher-epochs=8",
    "server-share=0.5",
    "emulator-steps=15",
    "emulator-width=8",
    "num-samples=4",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")
    proc = run_mekd_fl(*SMALL, "out-dir=runs", "cache-dir=cache", "run-name=first", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def test_mekd_run_writes_every_result_file(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    work, proc = first_run
    folder = work / "runs" / "first"
    for name in (
        "config.json",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "label_distribution.png",
        "emulator_samples.png",
    ):
        assert (folder / name).is_file(), name
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "mekd" and summary["teacher-cached"] is False
    assert summary["status"] == "completed" and summary["failures"] == []
    assert set(summary["queries-used"]) == {"client-0", "client-1", "client-2"}
    assert summary["rejected-updates"] == []
    assert len(summary["emulator"]) == 3
    # The student learned from the teacher's answers alone: well above chance (10 classes).
    assert summary["student-accuracy"] > 0.3, summary
    assert rounds[-1]["server/agreement"] > rounds[0]["server/agreement"]
    assert "[done] mekd on synthetic" in proc.stdout
    assert json.loads((folder / "config.json").read_text())["num-clients"] == 3


def test_second_run_reuses_teacher_and_runs_kd(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    work, _ = first_run
    proc = run_mekd_fl(*SMALL, "method=kd", "num-rounds=1", "out-dir=runs", "cache-dir=cache", "run-name=kd", cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "runs" / "kd" / "summary.json").read_text())
    assert summary["teacher-cached"] is True
    assert summary["emulator"] == {}  # KD needs no emulator: the phase is skipped
    assert "loaded from cache" in proc.stdout


def test_existing_run_folder_is_refused_and_kept(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    work, _ = first_run
    summary = work / "runs" / "first" / "summary.json"
    before = summary.read_bytes(), summary.stat().st_mtime_ns
    proc = run_mekd_fl(*SMALL, "out-dir=runs", "cache-dir=cache", "run-name=first", cwd=work)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


def test_the_student_is_saved_and_can_be_evaluated_later(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    import torch

    work, _ = first_run
    folder = work / "runs" / "first"
    state = torch.load(folder / "student.pt", weights_only=True)
    assert "1.fc.weight" in state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 3 and checkpoint["strategy"]["round"] == 3
    summary = json.loads((folder / "summary.json").read_text())
    proc = run_mekd_fl(str(folder), "--json", cwd=work, command="evaluate")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["accuracy"] == pytest.approx(summary["student-accuracy"])
    assert figures["agreement"] == pytest.approx(summary["student-agreement"])
    status = run_mekd_fl(str(folder), cwd=work, command="status")
    assert status.returncode == 0 and "completed" in status.stdout


def test_a_run_whose_updates_are_all_rejected_exits_non_zero_with_one_line(
    first_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    work, _ = first_run
    proc = run_mekd_fl(
        *SMALL, "method=kd", "num-rounds=2", "lr=1e30", "out-dir=runs", "cache-dir=cache", "run-name=diverges", cwd=work
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mekd-fl: error: run failed: train round 1: 0 of 3 clients gave a usable reply"), last
    summary = json.loads((work / "runs" / "diverges" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] in last
    # a diverged update is refused by its non-finite weights, or first by its non-finite train-loss
    reasons = [r["reason"] for r in summary["rejected-updates"]]
    assert reasons and all("contains NaN or inf" in r or "not finite" in r for r in reasons), reasons
    status = run_mekd_fl(str(work / "runs" / "diverges"), cwd=work, command="status")
    assert status.returncode == 1 and "failed" in status.stdout


@pytest.mark.parametrize(
    "setting, named",
    [
        ("alpha=0", "alpha"),
        ("dataset=imagenet", "dataset"),
        ("num-clients=5000", "num-clients"),
        ("partition=zipf", "partition"),
        ("method=magic", "method"),
        ("student-arch=resnet9", "student-arch"),
        ("batch-size=true", "batch-size"),
        ("lr=inf", "lr"),
        ("seed=-1", "seed"),
        ("run-name=../x", "run-name"),
        ("query-budget=.nan", "query-budget"),
        ("out-dir=/dev/null/runs", "out-dir"),
        ("aggregation=krum num-malicious=2", "aggregation"),
        ("dp-noise=1.0", "dp-noise"),
    ],
)
def test_bad_settings_fail_fast_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], setting: str, named: str
) -> None:
    """In process (the CLI's own `main`): a subprocess per case cost 4 s of imports each; the test below
    checks once that the real process prints the same single line."""
    from mekd_fl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", *SMALL, "out-dir=runs", *setting.split()]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert any(word in lines[0] for word in ("accepted", "exceeds", "must")), lines
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_a_bad_setting_ends_the_real_process_with_one_line_and_nothing_written(tmp_path: Path) -> None:
    t0 = time.time()
    proc = run_mekd_fl(*SMALL, "out-dir=runs", "alpha=0", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mekd-fl: error: ") and "alpha" in lines[0], lines
    assert not (tmp_path / "runs").exists()
    assert time.time() - t0 < 60


def test_missing_data_files_name_the_fix(tmp_path: Path) -> None:
    proc = run_mekd_fl("dataset=mnist", f"data-dir={tmp_path / 'nothing'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "data-dir" in proc.stderr and "download=true" in proc.stderr
