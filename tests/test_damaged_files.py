"""Run folders left damaged, half-written or by another engine (issue 21, items 5 and 10c).

`mekd-fl status`, `mekd-fl evaluate` and `mekd-fl run --resume` answer each in one line with the right
exit code; a checkpoint that would run code is refused (weights_only), never executed; and status never
recommends a command that then fails: each test runs the command status advises (with --check, which
makes every check `mekd-fl run` makes before Ray starts) on the same folder.
"""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from mekd_fl.cli import main
from mekd_fl.config import RunConfig
from mekd_fl.server.results import RunResults
from mekd_fl.server.summary import DEPLOYMENT, SIMULATION

ROUNDS = 3


def make_folder(tmp_path: Path, *, checkpoint: int | None = None, engine: str = SIMULATION, **extra: object) -> Path:
    """A run folder as the run writes it: config.json by RunResults.claim, then rounds 0..checkpoint."""
    settings = {
        "dataset": "synthetic",
        "num-clients": 2,
        "num-rounds": ROUNDS,
        "device": "cpu",
        "run-name": "r",
        "out-dir": str(tmp_path / "runs"),
        "cache-dir": str(tmp_path / "cache"),
        **extra,
    }
    results = RunResults.claim(RunConfig.from_mapping(settings))
    for r in range(0, -1 if checkpoint is None else checkpoint + 1):
        results.append_round({"round": r, "server/accuracy": 0.1 * (r + 1)})
        results.save_checkpoint(r, {"w": torch.zeros(2)}, {"last-round": r}, engine=engine)
    return results.folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    return text.strip()


def advised(line: str) -> list[str] | None:
    """The `mekd-fl ...` command a status line advises, as arguments, or None."""
    if "`mekd-fl " not in line:
        return None
    return shlex.split(line.split("`mekd-fl ", 1)[1].split("`", 1)[0])


def run_advice(capsys: pytest.CaptureFixture, line: str) -> None:
    """Run what status advises (with --check) and require it to pass."""
    args = advised(line)
    assert args is not None, line
    code, out, err = cli(capsys, *args, "--check")
    assert code == 0, f"status advised `{' '.join(args)}`, which fails: {err}"
    assert "settings and data OK" in out


# ---------------------------------------------------------------------------- checkpoint.pt


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_is_one_line_and_the_advice_works(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    folder = make_folder(tmp_path, checkpoint=1)
    path = folder / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a checkpoint" * 10)
    before = snapshot(folder)

    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 3 and "cannot be read safely" in line and "--resume" not in line, line

    code, _, err = cli(capsys, "run", "--resume", str(folder))
    assert code == 2 and one_line(err).startswith("mekd-fl: error: --resume: ") and "cannot be read safely" in err
    assert snapshot(folder) == before  # refused before the folder was touched
    run_advice(capsys, line)


class Bomb:
    """A pickle that would create `marker` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["checkpoint.pt", "student.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_never_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    folder = make_folder(tmp_path, checkpoint=1)
    marker = tmp_path / "pwned"
    with (folder / name).open("wb") as fh:  # torch.save would refuse to pickle an open file: plain pickle
        pickle.dump({"round": 1, "student": Bomb(marker), "strategy": {}}, fh, protocol=2)
    assert not marker.exists()

    status = cli(capsys, "status", str(folder))
    resume = cli(capsys, "run", "--resume", str(folder), "--check")
    evaluate = cli(capsys, "evaluate", str(folder))
    assert not marker.exists(), "a pickled call was executed"
    if name == "checkpoint.pt":
        assert status[0] == 3 and "cannot be read safely" in one_line(status[1])
        assert resume[0] == 2 and "cannot be read safely" in one_line(resume[2])
    else:
        assert evaluate[0] == 2 and "cannot be read safely" in one_line(evaluate[2])


# ---------------------------------------------------------------------------- summary.json


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_run_that_did_all_its_rounds_reads_completed_without_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    folder = make_folder(tmp_path, checkpoint=ROUNDS)
    summary = {"status": "completed", "method": "mekd", "student-accuracy": 0.4, "failures": []}
    text = json.dumps(summary)
    if damage != "missing":
        (folder / "summary.json").write_text(text[:20] if damage == "truncated" else "\x00garbage")
    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 0 and "completed 3 rounds" in line and "student accuracy 0.4000" in line, line
    assert ("summary.json is missing" if damage == "missing" else "summary.json is damaged") in line
    assert "--resume" not in line
    code, _, err = cli(capsys, "run", "--resume", str(folder))
    assert code == 2 and "nothing to resume" in one_line(err)


def test_a_damaged_summary_before_the_last_round_reads_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A summary is written only when a run ends; with fewer rounds than asked the run ended failing."""
    folder = make_folder(tmp_path, checkpoint=1)
    (folder / "summary.json").write_text('{"status": "fai')
    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 1 and line.split(": ", 1)[1].startswith("failed after round 1 of 3: summary.json is damaged")
    run_advice(capsys, line)


# ---------------------------------------------------------------------------- no checkpoint yet


def test_a_run_killed_before_its_first_checkpoint_is_not_advised_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = make_folder(tmp_path)  # killed during setup, the teacher or the first emulator phase
    (folder / "partition.json").write_text("{}")
    before = snapshot(folder)
    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 3 and "no checkpoint.pt" in line and "--resume" not in line, line
    code, _, err = cli(capsys, "run", "--resume", str(folder))
    assert code == 2 and "no checkpoint.pt" in one_line(err)
    assert snapshot(folder) == before
    run_advice(capsys, line)


def test_an_unfinished_simulation_is_advised_resume_which_passes_its_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = make_folder(tmp_path, checkpoint=1)
    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 3 and "last saved round 1 of 3" in line and advised(line) == ["run", "--resume", str(folder)]
    run_advice(capsys, line)


# ---------------------------------------------------------------------------- Deployment Engine folders


@pytest.mark.parametrize(
    ("engine", "client_data"), [(DEPLOYMENT, "node-config"), (DEPLOYMENT, "shard"), ("", "node-config")]
)
def test_resume_refuses_a_deployment_run_before_touching_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, engine: str, client_data: str
) -> None:
    """`mekd-fl run --resume` continues in-process simulations only; a Deployment Engine folder (or one
    written before checkpoints recorded the engine, with client-data=node-config) is refused in one line,
    stays as it was, and status advises only what works."""
    folder = make_folder(tmp_path, checkpoint=1, engine=engine, **{"client-data": client_data})
    before = snapshot(folder)
    code, out, _ = cli(capsys, "status", str(folder))
    line = one_line(out)
    assert code == 3 and "--resume" in line and "`mekd-fl run --resume" not in line, line
    for _ in range(2):  # a refused resume leaves the folder as it was: the same answer again
        code, _, err = cli(capsys, "run", "--resume", str(folder))
        assert code == 2 and one_line(err).startswith("mekd-fl: error: --resume: ")
        assert snapshot(folder) == before
    assert cli(capsys, "status", str(folder))[:2] == (3, out)


def test_checkpoints_and_summaries_record_the_engine(tmp_path: Path) -> None:
    from mekd_fl.server.app import engine_of
    from mekd_fl.server.summary import RunSummary

    folder = make_folder(tmp_path, checkpoint=0, engine=DEPLOYMENT)
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["engine"] == DEPLOYMENT
    assert engine_of(object()) == DEPLOYMENT  # anything but Flower's in-memory (simulation) grid
    summary = RunSummary.from_dict({"status": "completed", "engine": SIMULATION})
    assert summary.to_dict()["engine"] == SIMULATION


# ---------------------------------------------------------------------------- failures before round 0


@pytest.mark.parametrize("resume", [False, True])
def test_a_failure_during_setup_is_recorded_but_never_spoils_a_resumable_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, resume: bool
) -> None:
    """A run whose teacher cannot be built says so in summary.json (status: failed, not "unfinished"); a
    resumed run failing the same way leaves its folder resumable, as it was."""
    from mekd_fl.server import app

    def broken(self: app.ServerRun) -> None:
        raise RuntimeError("teacher checkpoint unreadable")

    monkeypatch.setattr(app.ServerRun, "build_teacher", broken)
    monkeypatch.setattr(app.ServerRun, "describe_partition", lambda self: None)  # no plots: fast
    if resume:
        folder = make_folder(tmp_path, checkpoint=1)
        cfg = RunConfig.from_mapping(json.loads((folder / "config.json").read_text()))
    else:
        folder = tmp_path / "runs" / "r"
        cfg = RunConfig.from_mapping(
            {"dataset": "synthetic", "num-clients": 2, "num-rounds": ROUNDS, "device": "cpu", "run-name": "r"}
            | {"out-dir": str(tmp_path / "runs"), "cache-dir": str(tmp_path / "cache")}
        )
    with pytest.raises(RuntimeError, match="teacher checkpoint unreadable"):
        app.ServerRun(None, cfg, log=lambda line: None, resume=resume).run()  # type: ignore[arg-type]
    capsys.readouterr()
    code, out, _ = cli(capsys, "status", str(folder))
    if resume:
        assert code == 3 and advised(one_line(out)) == ["run", "--resume", str(folder)]
    else:
        assert code == 1 and "failed after round 0 of 3: RuntimeError: teacher checkpoint unreadable" in one_line(out)
