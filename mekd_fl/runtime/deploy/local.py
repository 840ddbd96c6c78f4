"""`mekd-fl deploy-local`: the project's app under Flower's Deployment Engine, on loopback, end to end.

Why: `mekd-fl run` and `flwr run` (local simulation) never exercise what a real deployment needs: TLS,
SuperNode authentication, SuperNodes that find their own data, and a run whose outcome must be read
back from the SuperLink (`flwr run --stream` exits 0 even when the ServerApp raised). This command does
all of it on 127.0.0.1 with the same ServerApp and ClientApp:

1. certificates (`make_certs.sh`: a CA and a server certificate for 127.0.0.1, ::1 and localhost);
2. one ECDSA P-384 key per SuperNode (`ssh-keygen`);
3. `flower-superlink` with TLS, `--enable-supernode-auth`, `--disable-runtime-dependency-installation`
   and its state in `<workdir>/superlink.db` (`--database`; in memory without it);
4. each node's public key registered (`flwr supernode register`);
5. N `flower-supernode`s with the CA, their private key, `--node-config "partition-id=i num-partitions=N"`
   and a port each (their local Runtime API);
6. `flwr run` of the project folder with `num-clients=N client-data=node-config` and the given run
   config (FLWR_HOME in the workdir: nothing global changes);
7. polls `flwr list --run-id ID --format json` until the run is finished, or the timeout, supervising
   the processes as the app tolerates faults (`processes`): a SuperNode that exits is one line and a
   lost client, whose failures the run records, and the run goes on; a SuperLink that exits ends it;
8. prints the outcome (Flower's status and reason, the run folder's summary line, its failures);
9. stops every process it started, by process group (each was started in a session of its own, so the
   SuperExec, ServerApp and ClientApp processes they spawned go too), also on Ctrl-C, SIGTERM or errors.

Exit status 0 only when the run completed; 1 when it failed or timed out; 2 for bad input (one line).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mekd_fl.errors import ConfigError
from mekd_fl.runtime.deploy.processes import LINK, Processes, Started, exit_line, tail
from mekd_fl.runtime.reaper import reap_descendants_on_exit

CONNECTION = "deploy-local"  # the connection's name in $FLWR_HOME/config.toml
TOOLS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "openssl", "ssh-keygen", "bash")
CERT_SCRIPT = Path(__file__).resolve().parent / "make_certs.sh"
ROOT = Path(__file__).resolve().parents[3]  # the project folder `flwr run` submits


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------- checks (no process started)
#: Seconds between SuperExec's looks for a new task (Flower's default: 1.0).
TASK_POLL_INTERVAL = 0.2


def node_threads(supernodes: int, cpus: int | None = None) -> dict[str, str]:
    """The thread settings of each of `supernodes` SuperNodes sharing this machine's CPUs.

    Why: every SuperNode starts a ClientApp process per message, and torch gives each one a thread per
    core. N nodes on one machine then run N x cores threads that spin against each other: the tiny run's
    emulator phase took 100 s instead of 24 s. Each node gets its share of the cores instead (at least
    one); `mekd_fl.device.limit_threads` applies OMP_NUM_THREADS in the ClientApp.
    """
    if not cpus:  # the CPUs this process may use (Linux), else all of the machine's (macOS has no affinity)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = str(max(1, cpus // max(1, supernodes)))
    return {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}


def tool_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This interpreter's bin first on PATH (SuperLink and SuperNodes start `flower-superexec` by name), no
    telemetry, and FLWR_HOME in the workdir."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # SuperExec looks for a new ClientApp/ServerApp task once a second by default; every message of the
    # run waits for that poll, so look five times a second (one cheap local request each).
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(TASK_POLL_INTERVAL)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def check_tools(env: Mapping[str, str], tools: tuple[str, ...] = TOOLS) -> dict[str, str]:
    """Absolute paths of the tools, or one line naming those missing."""
    found = {name: shutil.which(name, path=env.get("PATH", "")) for name in tools}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ConfigError(
            f"deploy-local needs {', '.join(missing)} on PATH (Flower's tools come with `pip install -e .`; "
            "openssl and ssh-keygen from the system's openssl and openssh-client packages)"
        )
    return {name: str(path) for name, path in found.items()}


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(ports: list[int], host: str = "127.0.0.1") -> None:
    """One line naming every port in use (or out of range)."""
    bad = [p for p in ports if not 1 <= p <= 65535]
    if bad:
        raise ConfigError(f"port {bad[0]} is out of range; accepted: 1..65535")
    busy = [p for p in ports if not port_free(p, host)]
    if busy:
        raise ConfigError(
            f"port{'s' * (len(busy) > 1)} {', '.join(map(str, busy))} on {host} already in use; choose others "
            "with --port (SuperLink) and --node-port (first SuperNode; the others follow)"
        )


def check_args(supernodes: int, timeout: float, port: int, node_port: int) -> list[int]:
    """The ports this deployment takes, after the argument checks (one line each)."""
    if supernodes < 1:
        raise ConfigError(f"--supernodes {supernodes}: accepted: an integer >= 1")
    if not timeout > 0:
        raise ConfigError(f"--timeout {timeout}: accepted: seconds > 0")
    nodes = list(range(node_port, node_port + supernodes))
    if port in nodes:
        raise ConfigError(f"--port {port} collides with the SuperNodes' ports {nodes[0]}..{nodes[-1]} (--node-port)")
    return [port, *nodes]


def toml_value(value: Any) -> str:
    """A run-config value as `flwr run --run-config` parses it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def run_settings(run_config: str, supernodes: int, cwd: Path | None = None) -> tuple[dict[str, Any], Any]:
    """The run-config overrides to submit, and the RunConfig they make (validated).

    `num-clients` is the number of SuperNodes; `client-data` defaults to node-config (each SuperNode cuts
    its partition itself); a run name is chosen now so that the run folder is known; relative out-dir,
    cache-dir and data-dir are made absolute (the SuperLink's apps run elsewhere).
    """
    from flwr.common.config import parse_config_args

    from mekd_fl.config import RunConfig
    from mekd_fl.server.results import default_run_name

    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except Exception as exc:  # noqa: BLE001  (Flower's parser raises several kinds)
        raise ConfigError(f"--run-config {run_config!r} is not 'key=value key=value' (TOML values): {exc}") from None
    given = overrides.get("num-clients", supernodes)
    if given != supernodes:
        raise ConfigError(f"--run-config num-clients={given} but --supernodes {supernodes}: they must be equal")
    overrides["num-clients"] = supernodes
    overrides.setdefault("client-data", "node-config")
    cfg = RunConfig.from_mapping(overrides)
    base = cwd or Path.cwd()
    for key in ("out-dir", "cache-dir", "data-dir"):
        value = getattr(cfg, key.replace("-", "_"))
        if value and not Path(value).expanduser().is_absolute():
            overrides[key] = str((base / Path(value).expanduser()).resolve())
        elif value:
            overrides[key] = str(Path(value).expanduser())
    if not cfg.run_name:
        overrides["run-name"] = default_run_name(cfg) + "-deploy"
    return overrides, RunConfig.from_mapping(overrides)


def config_toml(address: str, ca: Path) -> str:
    """$FLWR_HOME/config.toml naming the SuperLink connection `deploy-local`."""
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca.resolve()}"\n'
    )


def make_certs(folder: Path, san: str = "IP:127.0.0.1,IP:::1,DNS:localhost") -> dict[str, Path]:
    """CA, server certificate and key under `folder` (by `make_certs.sh`)."""
    done = subprocess.run(["bash", str(CERT_SCRIPT), str(folder), san], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"make_certs.sh failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return {name: folder / name for name in ("ca.crt", "server.pem", "server.key")}


def make_key(path: Path) -> Path:
    """A fresh ECDSA P-384 key pair (`path`, `path.pub`) for SuperNode authentication."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", path.name, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed for {path}: {(done.stderr or done.stdout).strip()[-300:]}")
    return path


def find_status(data: Any, run_id: int) -> dict | None:
    """The run's entry in `flwr list --format json` output (searched, the layout is Flower's)."""
    if isinstance(data, dict):
        if "status" in data and str(data.get("run-id", data.get("run_id", run_id))) == str(run_id):
            return data
        items = list(data.values())
    elif isinstance(data, list):
        items = data
    else:
        return None
    for item in items:
        found = find_status(item, run_id)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------- processes
class Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------------------- the command
def deploy_local(
    supernodes: int,
    run_config: str = "",
    workdir: str | Path = "runs/deploy-local",
    timeout: float = 1800.0,
    port: int = 8000,
    node_port: int = 9094,
    log: Callable[[str], None] = say,
    on_started: Callable[[list[int]], None] | None = None,
) -> int:
    """Run the project once on a loopback deployment; 0 only when the run completed. `on_started` receives
    the PIDs of the processes started (for tests: they must all be gone on return)."""
    ports = check_args(supernodes, timeout, port, node_port)
    workdir = Path(workdir).resolve()
    env = tool_env(workdir / "flwr-home")
    tools = check_tools(env)
    check_ports(ports)
    if not (ROOT / "pyproject.toml").is_file():
        raise ConfigError(f"deploy-local submits the project folder, but {ROOT} has no pyproject.toml")
    overrides, cfg = run_settings(run_config, supernodes)
    from mekd_fl.server.app import prepare

    prepare(cfg)  # settings, data files, split, device, folders: fail before any process starts
    folder = Path(cfg.out_dir) / cfg.run_name
    if folder.exists():
        raise ConfigError(f"run folder {folder} already exists; choose another run-name")

    for sub in ("certs", "keys", "logs", "flwr-home"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # The SuperLink's SuperExec starts flwr-serverapp outside the SuperLink's process group: when the
    # SuperLink dies first, stopping its group misses the ServerApp, which then waits on a SuperLink that
    # is gone. The watchdog records this command's whole process tree and ends what is left when it exits.
    reap_descendants_on_exit()
    procs = Processes(env, workdir / "logs")
    # Ctrl-C, SIGTERM and SIGHUP all end in the cleanup below (SIGINT too when the shell started this
    # command in the background with SIGINT ignored).
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in caught}
    t0 = time.time()
    try:
        return _deploy(supernodes, overrides, cfg, folder, workdir, tools, timeout, port, node_port, procs, log, t0)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"[deploy] interrupted ({exc or 'Ctrl-C'}): stopping every process started")
        return 130
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"[deploy] error: {exc}")
        return 1
    finally:
        for sig in caught:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if on_started is not None:
            on_started(procs.pids)
        procs.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        left = [s.proc.pid for s in procs.started if s.proc.poll() is None]
        log(
            f"[deploy] stopped {len(procs.started)} processes (PIDs {' '.join(map(str, procs.pids)) or 'none'})"
            + (f"; still running: {left}" if left else "")
            + f"; logs in {workdir / 'logs'}; {time.time() - t0:.0f}s"
        )


def _deploy(
    supernodes: int,
    overrides: dict[str, Any],
    cfg: Any,
    folder: Path,
    workdir: Path,
    tools: dict[str, str],
    timeout: float,
    port: int,
    node_port: int,
    procs: Processes,
    log: Callable[[str], None],
    t0: float,
) -> int:
    env = procs.env
    address = f"127.0.0.1:{port}"
    certs = make_certs(workdir / "certs")
    log(f"[deploy] TLS certificates in {workdir / 'certs'} (SAN 127.0.0.1, ::1, localhost)")
    keys = [make_key(workdir / "keys" / f"node{i}") for i in range(supernodes)]
    log(f"[deploy] {supernodes} ECDSA P-384 SuperNode keys in {workdir / 'keys'}")
    (workdir / "flwr-home" / "config.toml").write_text(config_toml(address, certs["ca.crt"]))
    # The SuperLink's state (runs, registered keys, nodes, messages) in a file instead of memory: kept
    # for inspection after the command. Each deploy-local is a new federation with new keys, so an
    # earlier deployment's file is removed first.
    database = workdir / "superlink.db"
    for old in workdir.glob("superlink.db*"):
        old.unlink()

    link = procs.start(
        LINK,
        [
            tools["flower-superlink"],
            "--ssl-ca-certfile", str(certs["ca.crt"]),
            "--ssl-certfile", str(certs["server.pem"]),
            "--ssl-keyfile", str(certs["server.key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--database", str(database),
        ],
        workdir,
    )  # fmt: skip
    _wait_port(port, link, 60)
    log(
        f"[deploy] SuperLink (PID {link.proc.pid}) on {address} with TLS and SuperNode authentication; "
        f"state in {database}"
    )

    for key in keys:
        reg = _flwr(tools, env, ["supernode", "register", str(key.with_name(key.name + ".pub")), CONNECTION])
        if reg.returncode != 0:
            raise RuntimeError(f"flwr supernode register {key.name}.pub failed: {_last(reg)}")
    log(f"[deploy] registered {supernodes} SuperNode public keys")

    threads = node_threads(supernodes)
    for i, key in enumerate(keys):
        node = procs.start(
            f"supernode-{i}",
            [
                tools["flower-supernode"],
                "--superlink", address,
                "--root-certificates", str(certs["ca.crt"]),
                "--auth-supernode-private-key", str(key),
                "--node-config", f"partition-id={i} num-partitions={supernodes}",
                "--port", str(node_port + i),
            ],
            workdir,
            threads,
        )  # fmt: skip
        log(
            f"[deploy] SuperNode {i} (PID {node.proc.pid}): partition-id={i} num-partitions={supernodes}, "
            f"{threads['OMP_NUM_THREADS']} torch thread(s)"
        )

    pairs = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    sub = _flwr(tools, env, ["run", str(ROOT), CONNECTION, "--run-config", pairs, "--format", "json"], cwd=ROOT)
    run_id = _run_id(sub)
    log(f'[deploy] submitted run {run_id}: flwr run {ROOT} {CONNECTION} --run-config "{pairs}"')

    deadline = time.time() + timeout
    status, details = "", ""
    while True:
        if not _supervise(procs, supernodes, folder, log, t0):
            return 1
        listed = _flwr(tools, env, ["list", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        entry = find_status(_json(listed.stdout), run_id) if listed.returncode == 0 else None
        if entry is not None:
            status, details = str(entry.get("status", "")), str(entry.get("status-details", "") or "")
            details = "" if details.strip().upper() in ("N/A", "NONE") else details
            if status.startswith("finished"):
                break
        if time.time() > deadline:
            _flwr(tools, env, ["stop", str(run_id), CONNECTION])
            log(f"[deploy] run {run_id} timed out after {timeout:.0f}s (status {status or 'unknown'}); stopped it")
            _save_run_log(tools, env, run_id, workdir)
            return 1
        time.sleep(2)

    _save_run_log(tools, env, run_id, workdir)
    from mekd_fl.server import saved_run

    state, line = saved_run.status(folder) if (folder / "config.json").is_file() else ("failed", "no run folder")
    ok = status == "finished:completed" and state == "completed"
    log(
        f"[deploy] run {run_id} {status}{f' ({details})' if details else ''} after {time.time() - t0:.0f}s; "
        f"run folder {folder}: {line}"
    )
    last = [
        ln
        for ln in tail(workdir / "logs" / f"run-{run_id}.log", 40).splitlines()
        if ln.startswith(("[done]", "[failed]"))
    ]
    if last:
        log(f"[deploy] ServerApp: {last[-1]}")
    if (folder / "summary.json").is_file():
        _log_failures(folder / "summary.json", log)
        log(f"[deploy] summary: {folder / 'summary.json'}")
    return 0 if ok else 1


def _supervise(procs: Processes, supernodes: int, folder: Path, log: Callable[[str], None], t0: float) -> bool:
    """Report each process that exited, once; False when the SuperLink is gone (the run cannot go on).

    A lost SuperNode is a lost client: the ServerApp records its failures (Flower answers the messages
    sent to it with NODE_UNAVAILABLE, or the reply-timeout expires) and the run goes on with the others,
    as a deployment by hand does, so it is one line here and the outcome is the run's.
    """
    for gone in procs.newly_dead():
        if gone.name == LINK:
            from mekd_fl.server import saved_run

            state = saved_run.status(folder)[1] if (folder / "config.json").is_file() else "no run folder"
            log(f"[deploy] error: the run ends: {exit_line(gone, t0)}; run folder {folder}: {state}")
            return False
        left = len(procs.alive("supernode-"))
        log(f"[deploy] lost {exit_line(gone, t0)}; the run goes on with {left} of {supernodes} SuperNodes")
    return True


def _log_failures(summary: Path, log: Callable[[str], None], most: int = 20) -> None:
    """The run's recorded failures, one line each (phase, round, client, node, reason), from its summary."""
    try:
        failures = json.loads(summary.read_text()).get("failures", [])
    except (OSError, ValueError, AttributeError):
        return
    if failures:
        log(f"[deploy] {len(failures)} failure{'s' * (len(failures) > 1)} recorded in the run's summary:")
    for f in failures[:most]:
        where = f"{f.get('phase', '?')}" + (f" round {f.get('round')}" if f.get("round") else "")
        reason = " ".join(str(f.get("reason", "")).split())[:300]
        log(f"[deploy]   {where}: client {f.get('partition')} (node {f.get('node')}): {reason}")
    if len(failures) > most:
        log(f"[deploy]   ... and {len(failures) - most} more")


def _flwr(
    tools: dict[str, str], env: dict[str, str], args: list[str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run([tools["flwr"], *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _last(done: subprocess.CompletedProcess) -> str:
    return " ".join(((done.stdout or "") + (done.stderr or "")).split())[-500:]


def _json(text: str) -> Any:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def _run_id(done: subprocess.CompletedProcess) -> int:
    data = _json(done.stdout)
    run_id = data.get("run-id", data.get("run_id")) if isinstance(data, dict) else None
    if done.returncode != 0 or run_id is None:
        raise RuntimeError(f"flwr run did not submit the run: {_last(done)}")
    return int(run_id)


def _wait_port(port: int, started: Started, limit: float) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        if started.proc.poll() is not None:
            raise RuntimeError(exit_line(started, started.started_at) + f":\n{tail(started.log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{started.name} did not listen on port {port} within {limit:.0f}s:\n{tail(started.log)}")


def _save_run_log(tools: dict[str, str], env: dict[str, str], run_id: int, workdir: Path) -> None:
    try:
        done = _flwr(tools, env, ["log", str(run_id), CONNECTION, "--show"])
        (workdir / "logs" / f"run-{run_id}.log").write_text(done.stdout + done.stderr)
    except (subprocess.TimeoutExpired, OSError):
        pass
