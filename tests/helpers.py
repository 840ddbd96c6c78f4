"""Helpers that several test files call: the `mekd-fl` command and Flower's `flwr` CLI in subprocesses.

Plain functions live here and are imported (`from tests.helpers import ...`); fixtures that several files
share live in `tests/conftest.py`, where pytest finds them without an import. No test file imports
another test file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def run_mekd_fl(*args: str, cwd: Path, command: str = "run") -> subprocess.CompletedProcess:
    """`mekd-fl <command> <args>` in a subprocess (Ray and Flower keep process-wide state), one thread."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "mekd_fl.cli", command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def flwr_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for `flwr` commands: the test's own FLWR_HOME (so its SuperLink can be found and
    stopped), no telemetry, no dependency installs (offline), the venv's bin on PATH."""
    bin_dir = Path(sys.executable).parent
    return dict(
        os.environ,
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        **extra,
    )


def stop_superlink(flwr_home: Path) -> None:
    """Stop the SuperLink that `flwr` started detached under `flwr_home` (found by its database path), and
    its children: exactly that process tree, nothing else."""
    found = subprocess.run(["pgrep", "-f", str(flwr_home / "local-superlink")], capture_output=True, text=True)
    for pid in found.stdout.split():
        children = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
        for p in [*children, pid]:
            try:
                os.kill(int(p), signal.SIGTERM)
            except ProcessLookupError:
                pass


def write_run_folder(
    folder: Path, wall: float, rounds: list[tuple[float, float]], status: str = "completed", **summary: object
) -> None:
    """A finished run's folder as `mekd-fl run` writes it (summary.json, metrics.jsonl), for the benchmarks'
    readers: `rounds` are (elapsed seconds, server accuracy) per round; `summary` adds summary.json keys."""
    folder.mkdir(parents=True)
    timeline = {"round-0": 10.0, **{f"round-{i + 1}": t for i, (t, _) in enumerate(rounds)}}
    summary = {
        **summary,
        "status": status,
        "wall-seconds": wall,
        "student-accuracy": rounds[-1][1],
        "phase-seconds": {"emulator": 6.0, "query": 1.0, "total": wall},
        "timeline": timeline,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    lines = [{"round": 0, "elapsed-s": 0.1, "server/accuracy": 0.1}]
    lines += [{"round": i + 1, "elapsed-s": t, "server/accuracy": a} for i, (t, a) in enumerate(rounds)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
