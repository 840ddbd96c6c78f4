"""The processes `mekd-fl deploy-local` starts, and how it supervises them.

Why a module of its own: starting, watching and stopping processes is one concern (process groups,
logs, exit statuses), the deployment's steps another (`local`). Supervision follows what the app
tolerates: a SuperNode that exits is a lost client, whose failures the ServerApp records in the run's
summary, so the run goes on; a SuperLink that exits takes the run with it, so that ends the command.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: Terminal colour and cursor codes (Flower's console handler colours its level names).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LINK = "superlink"  # the SuperLink's name among the processes started


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log: Path
    started_at: float = field(default_factory=time.time)
    reported: bool = False  # its exit was reported once


@dataclass
class Processes:
    """Every long-lived process this command starts, each the leader of a session of its own."""

    env: dict[str, str]
    logs: Path
    started: list[Started] = field(default_factory=list)
    _files: list[IO] = field(default_factory=list)

    def start(self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Started:
        """Start `argv` in a session of its own, its output in `<logs>/<name>.log`; `env` adds to or
        overrides this deployment's environment for that process (and what it starts)."""
        log = self.logs / f"{name}.log"
        fh = open(log, "w")  # noqa: SIM115  (closed in stop_all)
        self._files.append(fh)
        own_env = {**self.env, **(env or {})}
        proc = subprocess.Popen(
            argv, cwd=cwd, env=own_env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.started]

    def dead(self) -> Started | None:
        return next((s for s in self.started if s.proc.poll() is not None), None)

    def newly_dead(self) -> list[Started]:
        """The processes that exited since the last call (each returned once); what a dead SuperNode
        started (its SuperExec and ClientApp, in its session) is killed at once, so it holds no port."""
        gone = [s for s in self.started if not s.reported and s.proc.poll() is not None]
        for s in gone:
            s.reported = True
            signal_group(s.proc.pid, signal.SIGKILL)
        return gone

    def alive(self, prefix: str) -> list[Started]:
        return [s for s in self.started if s.name.startswith(prefix) and s.proc.poll() is None]

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM to each process group (SuperNodes first, the SuperLink last), SIGKILL after `grace`."""
        for s in reversed(self.started):
            signal_group(s.proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for s in reversed(self.started):
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for s in reversed(self.started):
            signal_group(s.proc.pid, signal.SIGKILL)  # stragglers in the group, and a leader that ignored TERM
            try:
                s.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for fh in self._files:
            fh.close()
        self._files.clear()


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(code: int | None) -> str:
    """'status 1', or 'signal SIGKILL' for a process a signal ended (Popen's negative return code)."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def tail(path: Path, lines: int = 8) -> str:
    """The log's last `lines` lines, colour codes removed (they garble a terminal and every file)."""
    try:
        text = ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def last_line(path: Path) -> str:
    """The log's last non-empty line, without colour codes and runs of spaces: for one-line reports."""
    lines = tail(path, 1).splitlines()
    return " ".join(lines[-1].split())[:300] if lines else "(empty log)"


def exit_line(s: Started, t0: float) -> str:
    """What one exited process says, in one line: its name, PID, how it ended and its log's last line."""
    return (
        f"{s.name} (PID {s.proc.pid}) exited with {exit_status(s.proc.returncode)} at {time.time() - t0:.0f}s "
        f"(its log {s.log}: {last_line(s.log)})"
    )
