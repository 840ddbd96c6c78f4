"""`flwr run .`: the project as a Flower app under Flower's own CLI and local SuperLink (slow).

Flower starts the SuperLink detached; the test finds it by its database path, which lives in this
test's own FLWR_HOME, and stops exactly that process tree afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import flwr_env, stop_superlink

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("flwr", path=str(Path(sys.executable).parent)) is None, reason="flwr CLI missing")
def test_flwr_run_distills_on_synthetic_data(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = flwr_env(tmp_path)
    out = tmp_path / "runs"
    settings = (
        f"dataset='synthetic' num-clients=2 num-rounds=1 teacher-epochs=2 teacher-arch='resnet8' "
        f"emulator-steps=5 emulator-width=8 run-name='flwr' out-dir='{out}' cache-dir='{tmp_path / 'cache'}'"
    )
    try:
        subprocess.run(
            [str(bin_dir / "flwr"), "federation", "simulation-config", "--num-supernodes", "2"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--stream", "--run-config", settings],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        stop_superlink(tmp_path / "flwr-home")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "flwr" / "summary.json").read_text())
    assert summary["num-clients"] == 2 and summary["method"] == "mekd"
    assert summary["status"] == "completed" and (out / "flwr" / "student.pt").is_file()
    status = subprocess.run([str(bin_dir / "mekd-fl"), "status", str(out / "flwr")], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "[done] mekd on synthetic" in proc.stdout
