"""Every method x emulator x query-source combination runs end to end (synthetic data, tiny settings).

All cells share one Flower simulation (one Ray start) through `tests/combination_runner.py`, so the
whole grid costs about as much as a few separate runs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mekd_fl.distill import methods

EMULATORS = ("dcgan", "wgan-gp", "infogan")
SOURCES = ("local", "generated", "mixed")
TINY = {"dataset": "synthetic", "num-clients": 2, "num-rounds": 1, "local-epochs": 1, "batch-size": 32,
        "teacher-epochs": 1, "teacher-arch": "resnet8", "server-share": 0.3, "emulator-steps": 3,
        "emulator-width": 8, "wgan-n-critic": 2, "num-samples": 2, "query-views": 2, "emulator-fid": True}


@pytest.fixture(scope="module")
def grid_outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("grid")
    cells = [dict(TINY, method=m, emulator=e, **{"query-source": q, "run-name": f"{m}-{e}-{q}"})
             for m, e, q in itertools.product(methods(), EMULATORS, SOURCES)]
    cells.append(dict(TINY, method="mekd", emulator="dcgan", **{"query-source": "local", "run-name": "fed-emulator",
                                                                 "federated-emulator": True, "emulator-rounds": 2}))
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    runner = Path(__file__).with_name("combination_runner.py")
    proc = subprocess.run([sys.executable, str(runner), str(out / "runs"), str(out / "cache"), json.dumps(cells)],
                          env=env, capture_output=True, text=True, timeout=1500)
    outcome_file = out / "runs" / "outcome.json"
    assert outcome_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "runs", json.loads(outcome_file.read_text())


@pytest.mark.parametrize("method, emulator, source",
                         list(itertools.product(methods(), EMULATORS, SOURCES)))
def test_combination_runs_end_to_end(grid_outcome: tuple[Path, dict], method: str, emulator: str,
                                     source: str) -> None:
    runs, outcome = grid_outcome
    name = f"{method}-{emulator}-{source}"
    assert outcome.get(name) == "ok", outcome.get(name)
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["method"] == method and summary["emulator-kind"] == emulator
    assert summary["query-source"] == source
    # 2 views of each local image (or as many generated samples), all counted against the budget; the
    # supervised reference trains on labels and never queries the teacher
    assert (summary["queries-total"] > 0) == (method != "supervised"), summary["queries-total"]


def test_federated_emulator_runs_and_measures_fid(grid_outcome: tuple[Path, dict]) -> None:
    runs, outcome = grid_outcome
    assert outcome.get("fed-emulator") == "ok", outcome.get("fed-emulator")
    summary = json.loads((runs / "fed-emulator" / "summary.json").read_text())
    assert summary["federated-emulator"] is True
    assert all("fid" in m for m in summary["emulator"].values())
