"""`mekd-fl deploy-local` (Flower's Deployment Engine on loopback) and SuperNodes that find their own partition.

The fast tests cover the pieces that start no process; the slow one runs the whole command with two
SuperNodes and checks the run completed and that every process it started is gone.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

from mekd_fl.cli import main
from mekd_fl.client.app import node_config_data
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.run_data import run_data
from mekd_fl.runtime.deploy import local as D
from mekd_fl.runtime.simulation import backend_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = (
    "dataset='synthetic' num-rounds=1 teacher-epochs=2 teacher-arch='resnet8' emulator-steps=5 emulator-width=8 "
    "num-samples=0 fidelity-images=0"
)


def free_ports(count: int) -> list[int]:
    """`count` consecutive free ports on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        if all(D.port_free(p) for p in range(base, base + count)):
            return list(range(base, base + count))
    raise RuntimeError("no free ports")


# ---------------------------------------------------------------------------- checks before any process
def test_argument_checks_are_one_line() -> None:
    with pytest.raises(ConfigError, match="--supernodes 0"):
        D.check_args(0, 60, 8000, 9094)
    with pytest.raises(ConfigError, match="--timeout"):
        D.check_args(2, 0, 8000, 9094)
    with pytest.raises(ConfigError, match="collides"):
        D.check_args(2, 60, 9095, 9094)
    assert D.check_args(3, 60, 8000, 9094) == [8000, 9094, 9095, 9096]


def test_supernodes_share_the_cores_and_superexec_polls_often(tmp_path: Path) -> None:
    """N SuperNodes on one machine get cores / N torch threads each (at least 1): a thread per core in
    every ClientApp process made the emulator phase 4x slower; SuperExec looks for tasks 5x a second."""
    assert D.node_threads(2, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert D.node_threads(3, cpus=16)["OMP_NUM_THREADS"] == "5"
    assert D.node_threads(5, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert int(D.node_threads(1)["OMP_NUM_THREADS"]) >= 1
    assert float(D.tool_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) == D.TASK_POLL_INTERVAL < 1


def test_busy_port_is_named() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"{busy}.*already in use"):
            D.check_ports([free_ports(1)[0], busy])
    with pytest.raises(ConfigError, match="out of range"):
        D.check_ports([70000])


def test_missing_tools_are_named() -> None:
    with pytest.raises(ConfigError, match="flower-superlink.*ssh-keygen"):
        D.check_tools({"PATH": ""})


def test_cli_rejects_bad_input_before_starting_anything(capsys: pytest.CaptureFixture) -> None:
    assert main(["deploy-local", "--supernodes", "0"]) == 2
    assert "--supernodes 0" in capsys.readouterr().err
    ports = free_ports(3)
    assert main(["deploy-local", "--supernodes", "2", "--port", str(ports[0]), "--node-port", str(ports[1]),
                 "--run-config", "num-clients=3"]) == 2  # fmt: skip
    assert "num-clients=3 but --supernodes 2" in capsys.readouterr().err
    assert main(["deploy-local", "--supernodes", "2", "--port", str(ports[0]), "--node-port", str(ports[1]),
                 "--run-config", "no-such-setting=1"]) == 2  # fmt: skip
    assert "unknown setting 'no-such-setting'" in capsys.readouterr().err


def test_run_settings_fix_clients_data_name_and_paths(tmp_path: Path) -> None:
    overrides, cfg = D.run_settings("method='kd' alpha=0.1 out-dir='rel/runs' download=false", 3, cwd=tmp_path)
    assert cfg.num_clients == 3 and cfg.client_data == "node-config" and cfg.method == "kd" and cfg.alpha == 0.1
    assert cfg.run_name.endswith("-deploy") and overrides["run-name"] == cfg.run_name
    assert overrides["out-dir"] == str((tmp_path / "rel" / "runs").resolve())
    # what is submitted parses back (TOML) to the same values
    pairs = " ".join(f"{k}={D.toml_value(v)}" for k, v in overrides.items())
    assert parse_config_args([pairs]) == overrides
    assert D.run_settings("client-data='shard'", 2)[1].client_data == "shard"


def test_connection_config_and_status_parsing(tmp_path: Path) -> None:
    text = D.config_toml("127.0.0.1:8000", tmp_path / "ca.crt")
    assert 'default = "deploy-local"' in text and f'root-certificates = "{tmp_path / "ca.crt"}"' in text
    listed = {"success": True, "runs": [{"run-id": 7, "status": "finished:failed", "status-details": "boom"}]}
    assert D.find_status(listed, 7)["status-details"] == "boom"
    assert D.find_status(listed, 8) is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_cert_script_makes_a_server_certificate_for_loopback(tmp_path: Path) -> None:
    certs = D.make_certs(tmp_path / "certs")
    assert all(p.is_file() for p in certs.values())
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certs["server.pem"]), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text and "IP Address:0:0:0:0:0:0:0:1" in text
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs["ca.crt"]), str(certs["server.pem"])], capture_output=True
    )
    assert verify.returncode == 0
    assert oct(certs["server.key"].stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen missing")
def test_supernode_keys_are_ecdsa_p384(tmp_path: Path) -> None:
    key = D.make_key(tmp_path / "node0")
    D.make_key(tmp_path / "node0")  # a second call replaces the pair instead of prompting
    assert key.with_name("node0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


# ---------------------------------------------------------------------------- a SuperNode's own partition
def _context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_node_config_partition_is_the_servers_split() -> None:
    run = {"dataset": "synthetic", "num-clients": 3, "partition": "dirichlet", "alpha": 0.3, "seed": 7}
    split = run_data(RunConfig.from_mapping(run)).split
    for pid in range(3):
        partition, local = node_config_data(_context({"partition-id": pid, "num-partitions": 3}, run))
        ds = run_data(RunConfig.from_mapping(run)).dataset
        assert partition == pid
        assert np.array_equal(local.images.numpy(), ds.train_images[split.client_train[pid]].numpy())
        assert np.array_equal(local.test_labels.numpy(), ds.train_labels[split.client_test[pid]].numpy())


def test_a_node_cuts_its_partition_once_and_again_only_when_the_split_changes(monkeypatch) -> None:
    """Under the Deployment Engine every message is a fresh process; the node keeps its partition's
    indices in its own state, so later messages neither load the whole data set nor partition it."""
    import mekd_fl.run_data as R

    run = {"dataset": "synthetic", "num-clients": 3, "partition": "dirichlet", "alpha": 0.3, "seed": 7}
    context = _context({"partition-id": 1, "num-partitions": 3}, run)
    _, first = node_config_data(context)
    calls: list[int] = []
    real = R.run_data
    monkeypatch.setattr(R, "run_data", lambda cfg: calls.append(1) or real(cfg))
    _, again = node_config_data(context)  # the same state, as the next message's process gets it
    assert calls == [] and np.array_equal(first.images.numpy(), again.images.numpy())
    context.run_config["seed"] = 8  # another split: cut again, not the stale indices
    _, other = node_config_data(context)
    split = real(RunConfig.from_mapping({**run, "seed": 8})).split
    assert calls == [1] and len(other.images) == len(split.client_train[1])


def test_node_config_must_fit_the_run() -> None:
    run = {"dataset": "synthetic", "num-clients": 3}
    with pytest.raises(ValueError, match="num-partitions=2 does not fit the run's num-clients=3"):
        node_config_data(_context({"partition-id": 0, "num-partitions": 2}, run))
    with pytest.raises(ValueError, match="no 'shard' record and no partition-id"):
        node_config_data(_context({}, run))


def test_ray_address_attaches_the_backend() -> None:
    assert backend_config(1.0, 0.0, "127.0.0.1:6390")["init_args"]["address"] == "127.0.0.1:6390"
    assert "address" not in backend_config(1.0, 0.0, reap=False)["init_args"]


# ---------------------------------------------------------------------------- end to end (slow)
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ['PATH']}") is None for t in D.TOOLS),
    reason="Flower tools, openssl or ssh-keygen missing",
)
def test_deploy_local_runs_two_authenticated_supernodes_and_leaves_nothing(tmp_path: Path) -> None:
    ports = free_ports(3)
    out = tmp_path / "runs"
    settings = f"{TINY} run-name='deployed' out-dir='{out}' cache-dir='{tmp_path / 'cache'}'"
    argv = [str(BIN / "mekd-fl"), "deploy-local", "--supernodes", "2", "--workdir", str(tmp_path / "work")]
    argv += ["--port", str(ports[0]), "--node-port", str(ports[1]), "--timeout", "540", "--run-config", settings]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "finished:completed" in log and "with TLS and SuperNode authentication" in log
    summary = json.loads((out / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num-clients"] == 2 and summary["rounds-done"] == 1
    assert summary["failures"] == []
    pids = [int(p) for p in re.search(r"stopped 3 processes \(PIDs ([\d ]+)\)", log).group(1).split()]
    assert len(pids) == 3 and not any(_alive(p) for p in pids)
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left running: {left}"


def kill_mid_deploy(argv: list[str], console: Path, process: str, ready: Callable[[], bool], limit: float) -> int:
    """Run deploy-local (`argv`, output to `console`), SIGKILL the process its console names `process`
    (e.g. "SuperNode 1") once `ready()`, and wait for the command; its exit code."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=console.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline, victim = time.time() + limit, 0
        while time.time() < deadline and proc.poll() is None and not victim:
            found = re.search(rf"{process} \(PID (\d+)\)", console.read_text())
            if found and ready():
                victim = int(found.group(1))
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.2)
        assert victim, console.read_text()[-4000:]
        return proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ['PATH']}") is None for t in D.TOOLS),
    reason="Flower tools, openssl or ssh-keygen missing",
)
def test_a_supernode_killed_mid_run_is_a_recorded_failure_and_the_run_completes(tmp_path: Path) -> None:
    """SIGKILL one of two SuperNodes after round 1: deploy-local says so in one line and goes on, the
    run completes its 2 rounds with that node's failures in the summary (listed on the console too),
    and `mekd-fl status` agrees; the SuperLink kept its state in the workdir's database."""
    ports = free_ports(3)
    out, work = tmp_path / "runs", tmp_path / "work"
    tiny = TINY.replace("num-rounds=1", "num-rounds=2")
    settings = f"{tiny} reply-timeout=240 run-name='lost' out-dir='{out}' cache-dir='{tmp_path / 'c'}'"
    argv = [str(BIN / "mekd-fl"), "deploy-local", "--supernodes", "2", "--workdir", str(work)]
    argv += ["--port", str(ports[0]), "--node-port", str(ports[1]), "--timeout", "840", "--run-config", settings]
    console, metrics = tmp_path / "console.log", out / "lost" / "metrics.jsonl"
    round_1_done = lambda: metrics.is_file() and '"round": 1,' in metrics.read_text()  # noqa: E731
    code = kill_mid_deploy(argv, console, "SuperNode 1", round_1_done, 600)
    log = console.read_text()
    assert code == 0, log[-5000:]
    lost = [ln for ln in log.splitlines() if "lost supernode-1" in ln]
    assert len(lost) == 1 and "signal SIGKILL" in lost[0] and "goes on with 1 of 2 SuperNodes" in lost[0], log
    assert "finished:completed" in log and "\x1b" not in log
    summary = json.loads((out / "lost" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds-done"] == 2
    failures = summary["failures"]
    assert failures and len({f["node"] for f in failures}) == 1, failures  # only the killed node's
    assert all(f["round"] == 2 for f in failures), failures  # it answered round 1
    assert f"{len(failures)} failure" in log and log.count("[deploy]   ") == min(len(failures), 20)
    print("failures:", json.dumps(failures, indent=1))  # what they say (-s shows it)
    status = subprocess.run([str(BIN / "mekd-fl"), "status", str(out / "lost")], capture_output=True, text=True)
    assert status.returncode == 0 and "completed" in status.stdout + status.stderr
    assert (work / "superlink.db").is_file()
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ['PATH']}") is None for t in D.TOOLS),
    reason="Flower tools, openssl or ssh-keygen missing",
)
def test_a_superlink_killed_mid_run_ends_the_command_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL the real SuperLink once the run is under way: deploy-local exits 1 with one line that names
    it (and the run folder's state), stops every other process it started, and `mekd-fl status` does not
    advise a `--resume` that would fail."""
    ports = free_ports(3)
    out, work = tmp_path / "runs", tmp_path / "work"
    settings = f"{TINY} run-name='cut' out-dir='{out}' cache-dir='{tmp_path / 'c'}'"
    argv = [str(BIN / "mekd-fl"), "deploy-local", "--supernodes", "2", "--workdir", str(work)]
    argv += ["--port", str(ports[0]), "--node-port", str(ports[1]), "--timeout", "600", "--run-config", settings]
    console = tmp_path / "console.log"
    server_app_running = (out / "cut" / "config.json").is_file
    code = kill_mid_deploy(argv, console, "SuperLink", server_app_running, 300)
    log = console.read_text()
    assert code == 1, log[-4000:]
    ends = [ln for ln in log.splitlines() if ln.startswith("[deploy] error: the run ends: superlink")]
    assert len(ends) == 1 and "signal SIGKILL" in ends[0] and "run folder" in ends[0], log
    assert "Traceback" not in log and "\x1b" not in log
    status = subprocess.run([str(BIN / "mekd-fl"), "status", str(out / "cut")], capture_output=True, text=True)
    assert "continue with `mekd-fl run --resume" not in status.stdout, status.stdout
    time.sleep(2)
    left = subprocess.run(["pgrep", "-af", str(work)], capture_output=True, text=True).stdout.splitlines()
    assert left == [], f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI missing")
def test_simulation_attaches_to_a_running_ray_cluster(tmp_path: Path) -> None:
    """`ray start --head` (in a session of its own, stopped by its process group), then `mekd-fl run
    --ray-address`: the run's driver joins that cluster's session instead of starting one."""
    port = free_ports(1)[0]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp))
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        sessions = ray_tmp / "ray"
        for _ in range(120):
            if list(sessions.glob("session_*/logs/gcs_server.out")) and D.port_free(port) is False:
                break
            time.sleep(0.5)
        out = tmp_path / "runs"
        argv = [str(BIN / "mekd-fl"), "run", "--ray-address", f"127.0.0.1:{port}", *TINY.replace("'", "").split()]
        argv += ["num-clients=2", "run-name=ray", f"out-dir={out}", f"cache-dir={tmp_path / 'cache'}"]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert json.loads((out / "ray" / "summary.json").read_text())["status"] == "completed"
        assert len(list(sessions.glob("session_2*"))) == 1  # no private cluster was started beside it
        assert list(sessions.glob("session_2*/logs/python-core-driver-*")), "the run's driver did not attach"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
