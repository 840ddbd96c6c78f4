"""Flower simulation wiring shared by `mekd-fl run` and multi-run simulations (`mekd_fl.bench.multirun`).

Why a module of its own: the command line (`cli`) and the benchmark tooling both start Flower's
simulation runtime with the same Ray resources and the same quiet logging; keeping that here lets
`cli` stay argument parsing only, importing the rest and never imported by it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any


def backend_config(client_cpus: float, client_gpus: float | None, ray_address: str = "") -> dict[str, Any]:
    """Ray resources per simulated client; GPUs are shared fractionally when CUDA is present.

    `ray_address` ("HOST:PORT" of a running `ray start --head`) attaches the simulation to that cluster
    instead of starting a private one; empty leaves it to Ray, which honours `RAY_ADDRESS`.
    """
    import torch

    gpus = client_gpus if client_gpus is not None else (0.25 if torch.cuda.is_available() else 0.0)
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus}, "init_args": init_args}


def quiet_flower(verbose: bool) -> None:
    """Unless `verbose`, hide Flower's INFO and deprecation logs: our own progress lines say what happens."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)


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
