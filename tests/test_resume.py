"""A run killed with SIGKILL mid-way resumes from its last saved round and ends exactly where an
uninterrupted run with the same seed ends (slow: three small simulations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SETTINGS = [
    "dataset=synthetic",
    "num-clients=3",
    "num-rounds=4",
    "local-epochs=2",
    "batch-size=32",
    "teacher-epochs=6",
    "teacher-arch=resnet8",
    "emulator-steps=10",
    "emulator-width=8",
    "num-samples=2",
    "out-dir=runs",
    "cache-dir=cache",
]
COMPARED = ("server/accuracy", "server/agreement", "train/train-loss", "train/train-emulation", "fed/accuracy")


def env() -> dict:
    return dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mekd_fl.cli", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=900
    )


def rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    whole = cli("run", *SETTINGS, "run-name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]

    folder = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mekd_fl.cli", "run", *SETTINGS, "run-name=killed"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        if (folder / "metrics.jsonl").exists() and any(r["round"] >= 2 for r in rounds(folder)):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, Ray and its workers: nothing gets to clean up
    proc.wait()
    assert not (folder / "summary.json").exists()
    status = cli("status", str(folder), cwd=tmp_path)
    assert status.returncode == 3 and "unfinished" in status.stdout

    resumed = cli("run", "--resume", str(folder), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    expected, got = rounds(tmp_path / "runs" / "whole"), rounds(folder)
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4]
    for a, b in zip(expected, got):
        for key in COMPARED:
            if a.get(key) is None:  # round 0 has no training figures
                assert b.get(key) is None, (a["round"], key)
                continue
            assert b.get(key) == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["round"], key)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed"] is True
    first = json.loads((tmp_path / "runs" / "whole" / "summary.json").read_text())
    assert summary["queries-used"] == first["queries-used"]  # the resumed clients did not pay twice
    assert cli("run", "--resume", str(folder), cwd=tmp_path).returncode == 2  # nothing left to resume
