"""Slow end-to-end checks on the real Fashion-MNIST (`pytest -m slow`; CI runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mekd_fl.data import DEBIAN_FASHION_MNIST
from tests.helpers import run_mekd_fl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(DEBIAN_FASHION_MNIST).is_dir(), reason="needs the Debian package dataset-fashion-mnist"
    ),
]


@pytest.mark.parametrize("method, partition", [("mekd", "iid"), ("kd", "iid")])
def test_short_fashion_mnist_federation_learns(tmp_path: Path, method: str, partition: str) -> None:
    proc = run_mekd_fl(
        f"method={method}",
        f"partition={partition}",
        "num-clients=4",
        "num-rounds=2",
        "server-share=0.8",
        "client-test-fraction=0.05",
        "teacher-epochs=1",
        "teacher-arch=resnet8",
        "emulator-steps=30",
        "local-epochs=1",
        "out-dir=runs",
        "cache-dir=cache",
        "run-name=r",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["teacher-accuracy"] > 0.7
    # Two short rounds from a one-epoch teacher: KD reached 43 % on one machine and over 50 % on others (the
    # teacher's training differs by CPU; the code of 47cbc93 gives the same 43 % there). What must hold
    # everywhere is that the federation learns: far above chance and far above the initial student.
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert summary["student-accuracy"] > 0.35, summary
    assert rounds[-1]["server/accuracy"] > rounds[0]["server/accuracy"] + 0.2, rounds
    counts = json.loads((tmp_path / "runs" / "r" / "partition.json").read_text())["label_counts"]
    assert all(all(n > 0 for n in row) for row in counts)  # iid: every client holds every class
