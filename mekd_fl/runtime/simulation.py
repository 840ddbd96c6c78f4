"""Flower simulation wiring shared by `mekd-fl run` and multi-run simulations (`mekd_fl.bench.multirun`).

Why a module of its own: the command line (`cli`) and the benchmark tooling both start Flower's
simulation runtime with the same Ray resources and the same quiet logging; keeping that here lets
`cli` stay argument parsing only, importing the rest and never imported by it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any

from mekd_fl.runtime.reaper import reap_descendants_on_exit


def backend_config(
    client_cpus: float, client_gpus: float | None, ray_address: str = "", reap: bool = True
) -> dict[str, Any]:
    """Ray resources per simulated client; GPUs are shared fractionally when CUDA is present.

    `ray_address` ("HOST:PORT" of a running `ray start --head`) attaches the simulation to that cluster
    instead of starting a private one; empty leaves it to Ray, which honours `RAY_ADDRESS`. When the
    simulation is going to start a private cluster (neither given) and `reap`, this process's watchdog
    is armed (`reaper`): the cluster's processes end with this process, a SIGKILL of it included.
    """
    import torch

    gpus = client_gpus if client_gpus is not None else (0.25 if torch.cuda.is_available() else 0.0)
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    elif reap and not os.environ.get("RAY_ADDRESS"):
        reap_descendants_on_exit()
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus}, "init_args": init_args}


#: Where Flower's simulation logs an exception a ClientApp raised (file, function): twice at ERROR, with
#: Ray's and Flower's tracebacks, about 28 lines each, while the strategy records the same failure with
#: its client and reason in the run's summary and prints one line for it.
CLIENT_ERROR_SOURCES = (("vce_api.py", "worker"), ("raybackend.py", "process_message"))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ClientErrorsToFile(logging.Filter):
    """Sends Flower's per-message ClientApp tracebacks to a file instead of the console (other records
    pass), and says once on stderr where they are."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fh: IO[str] | None = None
        self._format = logging.Formatter("%(asctime)s %(levelname)s %(module)s: %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if (Path(record.pathname).name, record.funcName) not in CLIENT_ERROR_SOURCES:
            return True
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a")  # noqa: SIM115  (kept open for the process's life)
                print(f"[flower] a ClientApp raised: Flower's and Ray's tracebacks are in {self.path} "
                      "(--verbose prints them here)", file=sys.stderr, flush=True)  # fmt: skip
            self._fh.write(ANSI.sub("", self._format.format(record)) + "\n")
            self._fh.flush()
        except OSError:
            return True  # no file: better noisy than lost
        return False


def quiet_flower(verbose: bool, log_file: str | Path | None = None) -> None:
    """Unless `verbose`, hide Flower's INFO and deprecation logs (our own progress lines say what happens)
    and send the tracebacks Flower logs for each crashing client to `log_file` (default: a file in the
    temporary folder named after this process), keeping the console to the run's own failure lines."""
    flwr_logger = logging.getLogger("flwr")
    for old in [f for f in flwr_logger.filters if isinstance(f, ClientErrorsToFile)]:
        flwr_logger.removeFilter(old)
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        path = Path(log_file) if log_file else Path(tempfile.gettempdir()) / f"mekd-fl-{os.getpid()}-clients.log"
        flwr_logger.addFilter(ClientErrorsToFile(path))


def fast_message_polling() -> bool:
    """Make Flower's simulation hand out messages by asking only the nodes that have one.

    Why: Flower 1.42's simulation loop (`vce_api.add_messages_to_queue`) asks every node for a message
    every 0.1 s, and each ask scans every stored message under the state's lock: about 1 s a pass at
    10,000 nodes, one core busy while clients work, and the phases about twice as slow
    (experiments/bench_scale.py). This version collects, under the same lock, the nodes with an
    undelivered message and asks only those, through the same `get_message_ins` (which marks them
    delivered and expires stale ones), so what is delivered is unchanged. It is installed only when the
    function and the in-memory state look as expected; returns whether it was.
    """
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or getattr(original, "_mekd_fast", False):
        return original is not None

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        if not (hasattr(state, "lock") and isinstance(getattr(state, "message_ins_store", None), dict)):
            return original(state, queue, nodes_mapping, f_stop)  # another LinkState: Flower's own loop
        while not f_stop.is_set():
            with state.lock:
                pending = {
                    m.metadata.dst_node_id
                    for m in list(state.message_ins_store.values())
                    if m.metadata.delivered_at == ""
                }
            for node_id in sorted(pending.intersection(nodes_mapping.keys())):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)
        return None

    add_messages_to_queue._mekd_fast = True  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
