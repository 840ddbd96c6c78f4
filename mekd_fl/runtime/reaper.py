"""A watchdog that ends every process a run started once the run's process is gone, SIGKILL included.

Why: `ray.init()` without an address starts a private cluster as children of the run's process (GCS,
raylet, log monitor, dashboard), and the raylet starts the agents and the ClientApp workers. Ray ties
the first ones to the driver (PR_SET_PDEATHSIG), but not the raylet's children: after a SIGKILL of
`mekd-fl run` its DashboardAgent and RuntimeEnvAgent were still alive 18 s later (they wait on a GCS
that is gone), and a killed `mekd-fl bench` left four processes. A killed process cannot clean up after
itself, so a second, tiny process does: it is started in a session of its own (Ctrl-C and a kill of
the run's process group leave it alone), records the run's descendants from /proc every
`INTERVAL` s while the run lives (after the run's death they are re-parented and the tree is lost), and
when the run is gone SIGKILLs those still alive (matched by PID and start time, so a reused PID is never
hit) and their own descendants. A normal exit goes through the same path: what Ray's shutdown left goes.

Standard library only, and runnable as a script (`python reaper.py PID`): the watchdog starts in a
fraction of a second and imports nothing of the project. Linux only (/proc); elsewhere nothing is armed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Seconds between two snapshots of the run's process tree (and between checks that the run lives).
INTERVAL = 0.5
#: Seconds the watchdog keeps killing after the run is gone (descendants that fork while being killed).
REAP_FOR = 5.0

_armed: subprocess.Popen | None = None


def proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time in clock ticks)} of every process, read from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != b"Z":  # a zombie is dead already
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every process below `roots` (not the roots themselves), by parent pid."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found - roots


def reap(known: dict[int, int], limit: float = REAP_FOR) -> int:
    """SIGKILL the recorded processes still alive (same PID and start time) and what they started; returns
    how many were signalled."""
    killed = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        table = proc_table()
        alive = {pid for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}
        for pid in descendants(alive, table):  # started by a recorded process since the last snapshot
            known[pid] = table[pid][1]
            alive.add(pid)
        alive.discard(os.getpid())
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.2)
    return killed


def watch(parent: int, interval: float = INTERVAL) -> int:
    """The watchdog's loop: record `parent`'s descendants while it lives (it is this process's parent),
    then reap them."""
    known: dict[int, int] = {}
    me = os.getpid()
    while os.getppid() == parent:
        table = proc_table()
        known = {pid: start for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}
        known.update({pid: table[pid][1] for pid in descendants({parent}, table) if pid != me})
        time.sleep(interval)
    return reap(known)


def reap_descendants_on_exit() -> subprocess.Popen | None:
    """Arm the watchdog for this process (once): when it ends, however, its descendants end too.

    Returns the watchdog's process, or None where /proc is missing (not Linux).
    """
    global _armed
    if _armed is not None and _armed.poll() is None:
        return _armed
    if not Path("/proc/self/stat").is_file():
        return None
    _armed = subprocess.Popen(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve()), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    return _armed


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the run must not stop the cleanup
    watch(int(sys.argv[1]))
