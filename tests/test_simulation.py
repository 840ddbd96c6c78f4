"""The simulation wiring: Flower's message hand-out loop asking only the nodes that have a message, and the
label plot that stays small for large federations (both found by experiments/bench_scale.py).

The hand-out loop is tested against Flower's real LinkStates, set up as Flower's simulation does
(`flwr.simulation.run_simulation` and `vce_api._register_nodes`): the patch relies on private attributes of
`InMemoryLinkState` (`lock`, `message_ins_store`), so a Flower upgrade that renames them must fail here.
"""

from __future__ import annotations

import queue
import threading
import time
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import DEFAULT_TTL, Message, MessageType, Metadata, RecordDict
from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory, SqlLinkState
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from mekd_fl.runtime.simulation import fast_message_polling
from mekd_fl.server.results import MAX_BARS, RunResults


def _hand_out(num_nodes: int, pending: list[int], database: str = FLWR_IN_MEMORY_DB_NAME, extra_passes: int = 3):
    """Run the installed `vce_api.add_messages_to_queue` on a real Flower LinkState.

    `num_nodes` SuperNodes are registered as Flower's simulation registers them, one run is created, and one
    instruction message is stored for each entry of `pending` (an index into the nodes; repeats give a node
    several messages). The loop runs in a thread until every message is in the queue and then `extra_passes`
    more passes (counted through the stop event's `wait`), so a message handed out twice would show.
    Returns the state, the node ids, the stored message ids, the messages handed out and the node ids asked.
    """
    factory = LinkStateFactory(database, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    nodes_mapping = vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)
    nodes = list(nodes_mapping)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP)
    stored = []
    for i in pending:
        metadata = Metadata(
            run_id=run_id,
            message_id=str(uuid4()),  # as InMemoryGrid.push_messages does
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=nodes[i],
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=MessageType.TRAIN,
        )
        stored.append(state.store_message_ins(Message(RecordDict(), metadata=metadata)))
    assert None not in stored, "the LinkState refused a message (see Flower's ERROR log)"

    asked: list[int] = []
    get_message_ins = state.get_message_ins

    def spy(node_id: int, limit: int | None, **kwargs):
        asked.append(node_id)
        return get_message_ins(node_id=node_id, limit=limit, **kwargs)

    state.get_message_ins = spy
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    passes: list[float | None] = []
    wait = stop.wait
    stop.wait = lambda timeout=None: passes.append(timeout) or wait(timeout)
    loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, nodes_mapping, stop))
    loop.start()
    deadline, all_out_at = time.time() + 5, None
    while time.time() < deadline:
        if all_out_at is None and out.qsize() >= len(stored):
            all_out_at = len(passes)
        if all_out_at is not None and len(passes) >= all_out_at + extra_passes:
            break
        time.sleep(0.01)
    stop.set()
    loop.join(timeout=5)
    assert not loop.is_alive()
    handed_out = [out.get_nowait() for _ in range(out.qsize())]
    return state, nodes, stored, handed_out, asked


@pytest.fixture(autouse=True)
def _restore_flower_loop(monkeypatch):
    """Whatever a test installs, `vce_api.add_messages_to_queue` is as before once it ends."""
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)


def test_only_nodes_with_a_message_are_asked_and_each_message_is_handed_out_once() -> None:
    assert fast_message_polling()
    installed = vce_api.add_messages_to_queue
    assert fast_message_polling()  # installing twice is harmless: the same loop, not a wrapper of it
    assert vce_api.add_messages_to_queue is installed and installed._mekd_fast

    state, nodes, stored, handed_out, asked = _hand_out(10_000, pending=[3, 7, 7, 9_999])
    assert isinstance(state, InMemoryLinkState)  # what Flower's simulation uses, and what the patch expects
    assert isinstance(state.message_ins_store, dict) and hasattr(state, "lock")
    assert sorted(m.metadata.message_id for m in handed_out) == sorted(stored)  # each exactly once
    assert sorted(m.metadata.dst_node_id for m in handed_out) == sorted([nodes[3], nodes[7], nodes[7], nodes[-1]])
    assert all(m.metadata.delivered_at != "" for m in state.message_ins_store.values())
    assert set(asked) == {nodes[3], nodes[7], nodes[-1]}  # not the other 9,997 nodes ...
    assert len(asked) <= len(stored)  # ... and a node only when it has a message to give


def test_a_state_unlike_the_in_memory_one_gets_flowers_own_loop() -> None:
    assert fast_message_polling()
    state, nodes, stored, handed_out, asked = _hand_out(50, pending=[5], database=":memory:")
    assert isinstance(state, SqlLinkState) and not hasattr(state, "lock")  # the guard's premise
    assert [m.metadata.message_id for m in handed_out] == stored
    assert set(asked) == set(nodes)  # Flower's loop asks every node, every pass


def test_label_plot_of_a_large_federation_is_a_heatmap_of_normal_size(tmp_path) -> None:
    from PIL import Image

    counts = np.random.default_rng(0).integers(0, 5, size=(MAX_BARS * 20, 10))
    path = RunResults(tmp_path).plot_label_distribution(counts, [f"c{i}" for i in range(10)], "many clients")
    width, height = Image.open(path).size
    assert width < 2000 and height < 1000
