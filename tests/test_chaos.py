"""Chaos: about 30 % of the clients crash in every phase and one client poisons its updates; the run
completes, lists every failure, and the global student stays finite and useful.

One Flower simulation (synthetic data, 10 clients) through `tests/combination_runner.py` with its chaos
wrapper around every ClientApp handler: crashes are decided by a hash of (partition, message type,
round), so the same clients fail on every run; partition 7 (one that survives the set-up phases)
multiplies its float weights by 1e40 (odd rounds: inf in float32) or 1e3 (even rounds) and claims 1e12
examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one 10-client simulation (about 40 s); `make test-slow` and CI run it

CELL = {
    "dataset": "synthetic",
    "num-clients": 10,
    "num-rounds": 4,
    "local-epochs": 8,
    "batch-size": 16,
    "teacher-epochs": 8,
    "server-share": 0.5,
    "emulator-steps": 3,
    "emulator-width": 8,
    "num-samples": 2,
    "method": "mekd",
    "run-name": "chaos",
    "min-reply-fraction": 0.3,
}


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chaos")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    runner = Path(__file__).with_name("combination_runner.py")
    proc = subprocess.run(
        [sys.executable, str(runner), str(out / "runs"), str(out / "cache"), json.dumps([CELL]), "crash=0.3,poison=7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcome = out / "runs" / "outcome.json"
    assert outcome.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "runs" / "chaos", json.loads(outcome.read_text())


def test_the_run_completes_despite_crashes_in_every_phase(chaos_run: tuple[Path, dict]) -> None:
    folder, outcome = chaos_run
    assert outcome["chaos"] == "ok", outcome["chaos"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed"
    phases = {f["phase"] for f in summary["failures"]}
    assert {"emulator", "query", "train", "evaluate"} <= phases, phases
    for failure in summary["failures"]:
        assert set(failure) == {"phase", "round", "node", "partition", "reason"}
        assert failure["reason"] and isinstance(failure["node"], int)
    crashes = [f for f in summary["failures"] if "chaos: client" in f["reason"]]
    assert len(crashes) >= 8
    # Every crash names the client that crashed: the server's label matches the crashing partition.
    assert all(f"chaos: client {f['partition']} " in f["reason"] for f in crashes)


def test_the_poisoner_is_refused_or_bounded_and_the_student_learns(chaos_run: tuple[Path, dict]) -> None:
    folder, _ = chaos_run
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    poisoned = [e for e in summary["rejected-updates"] + summary["clipped-updates"] if e["partition"] == 7]
    assert poisoned, "partition 7 trained but its poison was neither refused nor bounded"
    assert {e["round"] for e in summary["rejected-updates"] if e["partition"] == 7} >= {1, 3} - {
        f["round"] for f in summary["failures"] if f["partition"] == 7 and "chaos" in f["reason"]
    }
    honest_rejections = [
        e for e in summary["rejected-updates"] if e["partition"] != 7 and "client error" not in e["reason"]
    ]
    assert honest_rejections == []
    assert summary["student-accuracy"] > 0.3, summary["student-accuracy"]
    assert all(r["round"] == 0 or r["failures"] is not None for r in rounds)


def test_failures_are_in_the_metrics_lines_and_the_query_log(chaos_run: tuple[Path, dict]) -> None:
    folder, _ = chaos_run
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("failures") for r in rounds[1:])
    log = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    assert log and all(set(e) >= {"phase", "node", "partition", "asked", "sent", "answered", "charged"} for e in log)
    assert not any("images" in e or "responses" in e for e in log)
