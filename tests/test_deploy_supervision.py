"""`mekd-fl deploy-local` supervises its processes the way the app tolerates faults.

A SuperNode that exits is one line and a lost client (the run goes on and records its failures); a
SuperLink that exits ends the command with one line; log tails carry no colour codes. These tests start
stand-in processes (`sleep`); the slow test in tests/test_deploy_local.py kills a real SuperNode mid-run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from mekd_fl.runtime.deploy import local as D
from mekd_fl.runtime.deploy.processes import Processes, exit_status, last_line, tail

BIN = Path(sys.executable).parent


def stand_ins(tmp_path: Path) -> Processes:
    procs = Processes({"PATH": "/usr/bin:/bin"}, tmp_path)
    for name in ("superlink", "supernode-0", "supernode-1"):
        procs.start(name, ["sleep", "300"], tmp_path)
    return procs


def wait_dead(procs: Processes, name: str) -> None:
    s = next(s for s in procs.started if s.name == name)
    s.proc.wait(timeout=10)


def test_a_lost_supernode_is_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    procs = stand_ins(tmp_path)
    lines: list[str] = []
    try:
        (tmp_path / "supernode-1.log").write_text("\x1b[92mINFO \x1b[0m:      starting\n\n")
        procs.started[2].proc.send_signal(signal.SIGKILL)
        wait_dead(procs, "supernode-1")
        assert D._supervise(procs, 2, tmp_path / "run", lines.append, time.time())
        assert D._supervise(procs, 2, tmp_path / "run", lines.append, time.time())  # reported once
        assert len(lines) == 1 and "lost supernode-1" in lines[0] and "signal SIGKILL" in lines[0]
        assert "goes on with 1 of 2 SuperNodes" in lines[0] and "INFO : starting" in lines[0]
        assert "\x1b" not in lines[0]
    finally:
        procs.stop_all(grace=2)


def test_a_lost_superlink_ends_the_run_with_one_line(tmp_path: Path) -> None:
    procs = stand_ins(tmp_path)
    lines: list[str] = []
    try:
        procs.started[0].proc.send_signal(signal.SIGTERM)
        wait_dead(procs, "superlink")
        assert not D._supervise(procs, 2, tmp_path / "run", lines.append, time.time())
        assert len(lines) == 1 and lines[0].startswith("[deploy] error: the run ends: superlink (PID ")
        assert "signal SIGTERM" in lines[0] and "no run folder" in lines[0]
    finally:
        procs.stop_all(grace=2)
    assert all(s.proc.poll() is not None for s in procs.started)


def test_log_tails_have_no_colour_codes(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a\n\x1b[91mERROR \x1b[0m:     boom\n\n\x1b[36m(ClientAppActor)\x1b[39m  last   words\n")
    assert tail(log, 2) == "ERROR :     boom\n(ClientAppActor)  last   words"
    assert last_line(log) == "(ClientAppActor) last words"
    assert exit_status(-9) == "signal SIGKILL" and exit_status(1) == "status 1"


def test_the_runs_failures_are_listed_one_line_each(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    failures = [
        {"phase": "train", "round": 2, "node": 77, "partition": 1, "reason": "NODE_UNAVAILABLE: Node 77\n is gone"},
        {"phase": "evaluate", "round": 2, "node": 77, "partition": 1, "reason": "no reply within reply-timeout=60s"},
    ]
    summary.write_text(json.dumps({"status": "completed", "failures": failures}))
    lines: list[str] = []
    D._log_failures(summary, lines.append)
    assert lines == [
        "[deploy] 2 failures recorded in the run's summary:",
        "[deploy]   train round 2: client 1 (node 77): NODE_UNAVAILABLE: Node 77 is gone",
        "[deploy]   evaluate round 2: client 1 (node 77): no reply within reply-timeout=60s",
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ['PATH']}") is None for t in D.TOOLS),
    reason="Flower tools, openssl or ssh-keygen missing",
)
def test_a_restarted_superlink_keeps_its_registered_keys(tmp_path: Path) -> None:
    """The SuperLink as deploy-local starts it (TLS, SuperNode auth, `--database`): a key registered before a
    restart is still registered after it, so SuperNodes need not be registered again."""
    port = next(p for p in range(random.randint(20000, 40000), 45000) if D.port_free(p))
    env = D.tool_env(tmp_path / "home")
    tools = D.check_tools(env)
    (tmp_path / "home").mkdir()
    certs = D.make_certs(tmp_path / "certs")
    key = D.make_key(tmp_path / "node0")
    (tmp_path / "home" / "config.toml").write_text(D.config_toml(f"127.0.0.1:{port}", certs["ca.crt"]))
    argv = [tools["flower-superlink"], "--ssl-ca-certfile", str(certs["ca.crt"]), "--ssl-certfile",
            str(certs["server.pem"]), "--ssl-keyfile", str(certs["server.key"]), "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "superlink.db")]  # fmt: skip
    listed = []
    for life in range(2):
        procs = Processes(env, tmp_path)
        try:
            link = procs.start(f"superlink-{life}", argv, tmp_path)
            D._wait_port(port, link, 60)
            if life == 0:
                reg = D._flwr(tools, env, ["supernode", "register", str(key) + ".pub", D.CONNECTION])
                assert reg.returncode == 0, D._last(reg)
            done = D._flwr(tools, env, ["supernode", "list", D.CONNECTION, "--format", "json"])
            assert done.returncode == 0, D._last(done)
            listed.append(D._json(done.stdout))
        finally:
            procs.stop_all(grace=5)
        for _ in range(50):  # the port is free again before the restart
            if D.port_free(port):
                break
            time.sleep(0.2)
    print("before restart:", listed[0], "\nafter restart:", listed[1])
    ids = [sorted(str(n.get("node-id", n)) for n in found.get("nodes", [])) for found in listed]
    assert ids[0] and ids[0] == ids[1], listed
