"""The simulation wiring: Flower's message hand-out loop asking only the nodes that have a message, and the
label plot that stays small for large federations (both found by experiments/bench_scale.py)."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import numpy as np

from mekd_fl.results import MAX_BARS, RunResults
from mekd_fl.simulation import fast_message_polling


class _State:
    """The parts of Flower's in-memory LinkState the loop uses, counting how often each node is asked."""

    def __init__(self, messages: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for mid, node in messages.items()
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list:
        self.asked.append(node_id)
        with self.lock:
            out = [m for m in self.message_ins_store.values() if m.metadata.dst_node_id == node_id]
            out = [m for m in out if m.metadata.delivered_at == ""][:limit]
            for m in out:
                m.metadata.delivered_at = "now"
        return out


def test_only_nodes_with_a_message_are_asked_and_each_message_is_handed_out_once() -> None:
    assert fast_message_polling()
    from flwr.server.superlink.fleet.vce import vce_api

    state = _State({"a": 3, "b": 7, "c": 7})
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    nodes = {n: n for n in range(10_000)}
    loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, nodes, stop))
    loop.start()
    deadline = time.time() + 5
    while out.qsize() < 3 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more passes: nothing is handed out twice
    stop.set()
    loop.join(timeout=5)
    got = [out.get_nowait().metadata.dst_node_id for _ in range(out.qsize())]
    assert sorted(got) == [3, 7, 7]
    assert set(state.asked) <= {3, 7}  # not the other 9,998 nodes
    assert fast_message_polling()  # installing twice is harmless


def test_label_plot_of_a_large_federation_is_a_heatmap_of_normal_size(tmp_path) -> None:
    from PIL import Image

    counts = np.random.default_rng(0).integers(0, 5, size=(MAX_BARS * 20, 10))
    path = RunResults(tmp_path).plot_label_distribution(counts, [f"c{i}" for i in range(10)], "many clients")
    width, height = Image.open(path).size
    assert width < 2000 and height < 1000
