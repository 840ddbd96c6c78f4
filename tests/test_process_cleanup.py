"""A run that starts Ray leaves nothing behind, even when it is SIGKILLed; crashing clients stay off the console.

The watchdog (`mekd_fl.runtime.reaper`) is armed by `backend_config` whenever the simulation starts a
private Ray cluster. The fast test arms it in a small parent whose child starts a grandchild in a session
of its own (like Ray's raylet and its agents); the slow one SIGKILLs `mekd-fl run` while its clients work.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mekd_fl.runtime import reaper
from mekd_fl.runtime.simulation import ClientErrorsToFile, quiet_flower

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def processes() -> dict[int, tuple[int, int, int, str]]:
    """{pid: (ppid, session id, start time, command line)} of every live (not zombie) process."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            found[int(name)] = (int(fields[1]), int(fields[3]), int(fields[19]), cmd.strip())
    return found


def family(root: int) -> dict[int, tuple[int, str]]:
    """The processes of `root`'s session and all its descendants: {pid: (start time, command line)}."""
    table = processes()
    tree = reaper.descendants({root}, {pid: (ppid, start) for pid, (ppid, _, start, _) in table.items()})
    return {pid: (v[2], v[3]) for pid, v in table.items() if pid in tree or v[1] == root}


def survivors(recorded: dict[int, tuple[int, str]], within: float) -> dict[int, str]:
    """Those of `recorded` (same PID and start time) still alive after up to `within` seconds."""
    deadline = time.time() + within
    while True:
        table = processes()
        alive = {pid: cmd for pid, (start, cmd) in recorded.items() if pid in table and table[pid][2] == start}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def kill_all(recorded: dict[int, tuple[int, str]]) -> None:
    for pid in recorded:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from mekd_fl.runtime.reaper import reap_descendants_on_exit
    if sys.argv[1] == "arm":
        reap_descendants_on_exit()
    # a child that ignores SIGTERM, and a grandchild in a session of its own (like Ray's agents)
    child = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"])
    time.sleep(1.5)  # the watchdog's snapshots see the whole tree
    print("ready", flush=True)
    time.sleep(300)
    """
)


def start_parent(arm: str) -> tuple[subprocess.Popen, dict[int, tuple[int, str]]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, arm], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
    tree = {pid: v for pid, v in family(parent.pid).items() if pid != parent.pid}
    return parent, tree


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_sigkill_of_an_armed_process_ends_its_descendants() -> None:
    parent, tree = start_parent("arm")
    try:
        assert sum("sleep 300" in cmd for _, cmd in tree.values()) == 1, tree
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        left = survivors(tree, within=10)
        assert left == {}, f"alive 10 s after SIGKILL: {left}"
    finally:
        kill_all(tree)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_without_the_watchdog_the_grandchild_survives() -> None:
    """The control: what the watchdog fixes (the orphaned grandchild in its own session outlives a SIGKILL)."""
    parent, tree = start_parent("none")
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert any("sleep 300" in cmd for cmd in survivors(tree, within=2).values())
    finally:
        kill_all(tree)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_sigkill_of_mekd_fl_run_leaves_no_process_after_10s(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    argv = [str(BIN / "mekd-fl"), "run", "dataset=synthetic", "num-clients=2", "num-rounds=2", "teacher-epochs=2",
            "teacher-arch=resnet8", "emulator-steps=400", "emulator-width=8", "num-samples=0", "fidelity-images=0",
            f"out-dir={out}", f"cache-dir={tmp_path / 'cache'}", "run-name=killed"]  # fmt: skip
    log = tmp_path / "run.log"
    run = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    recorded: dict[int, tuple[int, str]] = {}
    try:
        deadline = time.time() + 400
        while time.time() < deadline and run.poll() is None:  # until both clients' Ray workers are busy
            recorded.update(family(run.pid))
            if "[emulator]" in log.read_text() and sum("ClientAppActor" in c for _, c in recorded.values()) >= 2:
                break
            time.sleep(0.5)
        time.sleep(2)
        recorded.update(family(run.pid))
        assert run.poll() is None, log.read_text()[-3000:]
        assert any("raylet" in cmd for _, cmd in recorded.values()), recorded
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        recorded.pop(run.pid, None)
        left = survivors(recorded, within=10)
        assert left == {}, f"alive 10 s after SIGKILL of mekd-fl run: {left}"
    finally:
        if run.poll() is None:
            run.kill()
        kill_all(recorded)


def test_client_tracebacks_go_to_the_file_not_the_console(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    flwr = logging.getLogger("flwr")
    level = flwr.level
    sink = logging.StreamHandler(sys.stderr)
    flwr.addHandler(sink)
    try:
        quiet_flower(False, tmp_path / "clients.log")
        backend = "/x/flwr/server/superlink/fleet/vce/vce_api.py"
        for text in ("Traceback (most recent call last):\n  boom", "\x1b[36mray::ClientAppActor.run()\x1b[39m"):
            flwr.handle(flwr.makeRecord("flwr", logging.ERROR, backend, 143, text, (), None, func="worker"))
        flwr.handle(flwr.makeRecord("flwr", logging.ERROR, "/x/other.py", 1, "the engine failed", (), None))
        err = capfd.readouterr().err
        assert "boom" not in err and "ClientAppActor" not in err and "the engine failed" in err
        assert err.count(f"tracebacks are in {tmp_path / 'clients.log'}") == 1
        kept = (tmp_path / "clients.log").read_text()
        assert "boom" in kept and "ray::ClientAppActor.run()" in kept and "\x1b" not in kept
        quiet_flower(True)  # --verbose: everything on the console again
        assert not any(isinstance(f, ClientErrorsToFile) for f in flwr.filters)
    finally:
        flwr.removeHandler(sink)
        flwr.setLevel(level)
        for f in [f for f in flwr.filters if isinstance(f, ClientErrorsToFile)]:
            flwr.removeFilter(f)


def test_the_backend_arms_the_watchdog_only_for_a_private_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    from mekd_fl.runtime import simulation

    armed: list[bool] = []
    monkeypatch.setattr(simulation, "reap_descendants_on_exit", lambda: armed.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    simulation.backend_config(1.0, 0.0)
    assert armed == [True]
    simulation.backend_config(1.0, 0.0, "127.0.0.1:6390")  # an attached cluster is not this run's to end
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    simulation.backend_config(1.0, 0.0)
    simulation.backend_config(1.0, 0.0, reap=False)
    assert armed == [True]
