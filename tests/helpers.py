"""Helpers that several test files call: the `mekd-fl` command and Flower's `flwr` CLI in subprocesses.

Plain functions live here and are imported (`from tests.helpers import ...`); fixtures that several files
share live in `tests/conftest.py`, where pytest finds them without an import. No test file imports
another test file.
"""

from __future__ import annotations

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
