"""Issue 21, second pass: what one or two hostile clients could still do to a run, and what they get now.

Each test drives MEKD over scripted clients (a fake Grid hands each message to a Python function playing
its node) and asserts both halves of the rule: the attack does not reach the global model or the
results, and it is recorded as a failure of the client that made it (once, with the true reason).
"""

from __future__ import annotations

import time
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD
from strategies import protocol as P
from tests.scripted_clients import CLASSES, SHAPE, FakeGrid, Handler, Teacher, crashing, honest, student

pytestmark = pytest.mark.usefixtures("task_identity")

torch.set_num_threads(1)


def make(n: int = 3, **kwargs) -> tuple[MEKD, Teacher]:
    teacher = Teacher()
    oracle = TeacherOracle(teacher, num_classes=CLASSES, image_shape=SHAPE, budget=10)
    kwargs = {"train_emulators": False, "log_fn": lambda _: None, "min_available_nodes": n, **kwargs}
    return MEKD(oracle, query_budget=10, **kwargs), teacher


def run(s: MEKD, grid, rounds: int = 1, timeout: float = 3600):
    return s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=rounds,
        timeout=timeout,
        train_config=ConfigRecord({"lr": 0.1}),
        num_nodes=len(grid.nodes),
    )


def failures_of(s: MEKD, partition: int) -> list[tuple[str, int, str]]:
    return [(f["phase"], f["round"], f["reason"]) for f in s.failures.entries if f["partition"] == partition]


# ---------------------------------------------------------------------------- 1. integer entries
def _with_counter(s: MEKD, counter: int) -> tuple[dict[str, np.ndarray], Message]:
    """A global model with a BatchNorm counter, and node 22's update of it carrying `counter`."""
    global_model = {"w": np.zeros(3, np.float32), "bn.num_batches_tracked": np.array(40, np.int64)}
    s._global = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    s.transport.partition_of = {11: 0, 22: 1}
    s.ledger.example_cap = {11: 6, 22: 6}
    update = {"w": np.full(3, 0.1, np.float32), "bn.num_batches_tracked": np.array(counter, np.int64)}
    instruction = Message(RecordDict(), dst_node_id=22, message_type=P.TRAIN)
    content = {
        P.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}),
        P.METRICS: MetricRecord({"num-examples": 6}),
    }
    return global_model, Message(RecordDict(content), reply_to=instruction)


def test_a_lone_client_counter_of_2_63_minus_1_is_its_own_failure() -> None:
    s, _ = make()
    _, reply = _with_counter(s, 2**63 - 1)  # a valid int64; FedAvg's float64 mean casts back to -2**63
    arrays, _ = s.aggregate_train(1, [reply])
    assert arrays is None  # the round keeps the global model
    assert [(r["node"], r["partition"]) for r in s.rejected] == [(22, 1)]
    assert "beyond +-2**52" in s.rejected[0]["reason"]
    assert [(f["node"], f["phase"]) for f in s.failures.entries] == [(22, "train")]  # the client's, not "node None"


def test_a_counter_that_grows_by_a_round_of_steps_is_averaged_exactly() -> None:
    s, _ = make()
    _, reply = _with_counter(s, 40 + 500)
    arrays, _ = s.aggregate_train(1, [reply])
    assert s.failures.entries == [] and int(arrays["bn.num_batches_tracked"].numpy()) == 540


# ---------------------------------------------------------------------------- 2. federated emulator, two clients
def _emulator_client(seed: int, installed: dict[int, dict], scale: float = 1.0) -> Handler:
    """A client with a tiny emulator that trains a little each emulator round; `scale` != 1: an attacker
    that multiplies what it uploads. `installed` records the weights the final (install) message carries."""
    rng = np.random.default_rng(seed)
    own = {
        P.GENERATOR: {
            "fc.weight": rng.normal(0, 0.02, (64, 10)).astype(np.float32),
            "bn.num_batches_tracked": np.array(0),
        },
        P.DISCRIMINATOR: {"conv.weight": rng.normal(0, 0.02, (16, 32)).astype(np.float32)},
    }
    base = honest(seed)

    def handle(m: Message) -> Message:
        if m.metadata.message_type != P.EMULATOR:
            return base(m)
        config = m.content[P.CONFIG]
        start = {
            key: ({k: m.content[key][k].numpy() for k in m.content[key].keys()} if key in m.content else own[key])
            for key in (P.GENERATOR, P.DISCRIMINATOR)
        }
        if not config.get(P.RETURN_WEIGHTS, False):
            installed[m.metadata.dst_node_id] = start
            return Message(RecordDict({P.METRICS: MetricRecord({"d-loss": 0.5})}), reply_to=m)
        steps = int(config[P.PHASE_STEPS])
        records: dict = {P.METRICS: MetricRecord({"d-loss": 0.5})}
        for key, weights in start.items():
            trained = {}
            for k, v in weights.items():
                if v.dtype.kind == "f":
                    trained[k] = (scale * (v + 0.002 * rng.normal(size=v.shape))).astype(np.float32)
                else:
                    trained[k] = np.asarray(v + steps, np.int64)
            records[key] = ArrayRecord({k: Array(v) for k, v in trained.items()})
        return Message(RecordDict(records), reply_to=m)

    return handle


def test_two_honest_emulators_are_both_averaged() -> None:
    """The norm bound's control: honest emulators of one architecture have norms within a few percent."""
    installed: dict[int, dict] = {}
    grid = FakeGrid({11: _emulator_client(0, installed), 22: _emulator_client(1, installed)})
    s, _ = make(n=2, train_emulators=True, federated_emulator=True, emulator_rounds=3, emulator_steps=30)
    s.transport.partition_of = {11: 0, 22: 1}
    assert s.phases.run_emulation(grid, [11, 22], ConfigRecord()) == [11, 22] and s.failures.entries == []


def test_a_rejoined_node_is_given_the_runs_federated_emulator_not_a_new_average() -> None:
    """Item 10 with a federated emulator: the node that lost its state gets the average every client got
    (one install message, no training rounds) and its queries re-delivered without a second charge."""
    installed: dict[int, dict] = {}
    grid = FakeGrid({n: _emulator_client(i, installed) for i, n in enumerate((11, 22, 33))})
    s, _ = make(n=3, train_emulators=True, federated_emulator=True, emulator_rounds=2, emulator_steps=4)
    s.transport.partition_of = {11: 0, 22: 1, 33: 2}
    s.phases.prepare(grid, [11, 22, 33], ConfigRecord())
    first, sent_before = installed.pop(22), len(grid.sent)
    assert s.phases.reprepare(grid, [22], ConfigRecord()) == [22]
    again = [m for m in grid.sent[sent_before:] if m.metadata.message_type == P.EMULATOR]
    assert len(again) == 1 and not again[0].content[P.CONFIG].get(P.RETURN_WEIGHTS, False)
    for key, weights in first.items():
        assert all(np.array_equal(weights[k], installed[22][key][k]) for k in weights)
    assert s.ledger.queries_used["client-1"] == 6 and s.ledger.log[-1]["redelivered"]
    assert s.ledger.answered == {11, 22, 33}


def test_two_clients_one_scaling_its_emulator_x1000_cannot_poison_the_installed_emulator() -> None:
    installed: dict[int, dict] = {}
    grid = FakeGrid({11: _emulator_client(0, installed), 22: _emulator_client(1, installed, scale=1000.0)})
    s, _ = make(n=2, train_emulators=True, federated_emulator=True, emulator_rounds=3, emulator_steps=30)
    s.transport.partition_of = {11: 0, 22: 1}
    ready = s.phases.run_emulation(grid, [11, 22], ConfigRecord())
    assert ready == [11]
    assert [(phase, reason[:41]) for phase, _, reason in failures_of(s, 1)] == [
        ("emulator", "emulator weights refused: emulator-genera")
    ]
    assert failures_of(s, 0) == []
    biggest = max(np.abs(v).max() for part in installed[11].values() for v in part.values() if v.dtype.kind == "f")
    assert biggest < 0.2  # the honest weights are ~0.02 (the attack's average, unbounded: ~25)
    assert int(installed[11][P.GENERATOR]["bn.num_batches_tracked"]) == 30


def test_a_client_shrinking_its_emulator_does_not_get_the_honest_one_refused() -> None:
    """With two clients the lower median is the shrunk upload; the server's own (fresh) reference keeps the
    yardstick honest, so the honest client is not the one refused."""
    installed: dict[int, dict] = {}
    grid = FakeGrid({11: _emulator_client(0, installed), 22: _emulator_client(1, installed, scale=1e-3)})
    fresh = _emulator_client(2, {})  # the server's reference: freshly initialised weights of the same kind
    probe = fresh(
        Message(
            RecordDict({P.CONFIG: ConfigRecord({P.RETURN_WEIGHTS: True, P.PHASE_STEPS: 0})}),
            dst_node_id=5,
            message_type=P.EMULATOR,
        )
    )
    reference = {key: probe.content[key] for key in (P.GENERATOR, P.DISCRIMINATOR)}
    s, _ = make(
        n=2,
        train_emulators=True,
        federated_emulator=True,
        emulator_rounds=1,
        emulator_steps=30,
        emulator_reference=reference,
    )
    s.transport.partition_of = {11: 0, 22: 1}
    assert s.phases.run_emulation(grid, [11, 22], ConfigRecord()) == [11, 22] and s.failures.entries == []


# ---------------------------------------------------------------------------- 3. reported metrics
def _reporting(accuracy: object = 0.5, train_loss: object = 1.0, examples: float = 2, inner: Handler | None = None):
    """An honest node whose train and evaluate replies report these metrics."""
    base = inner or honest(7)

    def handle(m: Message) -> Message:
        r = base(m)
        if m.metadata.message_type == P.EVALUATE:
            return Message(
                RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: examples, "accuracy": accuracy})}), reply_to=m
            )
        if m.metadata.message_type == P.TRAIN:
            metrics = {P.NUM_EXAMPLES: 6, "train-loss": train_loss, P.PARTITION_ID: 2.0}
            return Message(RecordDict({P.ARRAYS: r.content[P.ARRAYS], P.METRICS: MetricRecord(metrics)}), reply_to=m)
        return r

    return handle


@pytest.mark.parametrize("accuracy", [55.0, -1e9, [0.5, 0.5], float("nan")])
def test_an_impossible_client_accuracy_is_refused_and_recorded(accuracy: object) -> None:
    s, _ = make()
    result = run(s, FakeGrid({11: honest(0), 22: honest(1), 33: _reporting(accuracy=accuracy)}))
    assert result.evaluate_metrics_clientapp[1]["accuracy"] == pytest.approx(0.5)  # the two honest clients'
    assert [(phase, rnd) for phase, rnd, _ in failures_of(s, 2)] == [("evaluate", 1)]
    assert failures_of(s, 2)[0][2].startswith("metrics refused: metric 'accuracy'")


@pytest.mark.parametrize("loss", [float("nan"), [1.0, 2.0], -5.0])
def test_one_clients_bad_train_loss_no_longer_removes_the_rounds_train_loss(loss: object) -> None:
    s, _ = make()
    result = run(s, FakeGrid({11: honest(0), 22: honest(1), 33: _reporting(train_loss=loss)}))
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(1.0)
    assert [(phase, rnd) for phase, rnd, _ in failures_of(s, 2)] == [("train", 1)]
    assert [r["partition"] for r in s.rejected] == [2]  # its update is not used either


def test_a_clients_metric_counts_at_most_as_much_as_its_capped_weight() -> None:
    s, _ = make()
    result = run(s, FakeGrid({11: honest(0), 22: honest(1), 33: _reporting(accuracy=1.0, examples=1e12)}))
    # honest: 2 examples at 0.5 each; the liar's 1e12 is capped at the 6 answers it holds
    assert result.evaluate_metrics_clientapp[1]["accuracy"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 6 * 1.0) / 10)


# ---------------------------------------------------------------------------- 6. charged but not delivered
def _crashing_once(on: str, inner: Handler, times: int = 1) -> Handler:
    left = [times]
    crash = crashing({on}, inner)

    def handle(m: Message) -> Message:
        if m.metadata.message_type == on and left[0] > 0:
            left[0] -= 1
            return crash(m)
        return inner(m)

    return handle


def test_answers_lost_to_a_crash_are_delivered_again_without_a_second_charge() -> None:
    s, teacher = make()
    grid = FakeGrid({11: honest(0), 22: _crashing_once(P.ANSWERS, honest(1)), 33: honest(2)})
    run(s, grid)
    assert s.ledger.answered == {11, 22, 33}  # it takes part in the rounds
    assert s.ledger.queries_used == {"client-0": 6, "client-1": 6, "client-2": 6}  # charged once
    assert teacher.calls == 3 and s.oracle.used("client-1") == 6  # the teacher answered once
    assert [phase for phase, _, _ in failures_of(s, 1)] == ["answers"]
    assert [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == P.ANSWERS].count(22) == 2
    assert s.ledger.undelivered == {}


def test_answers_still_undelivered_are_held_for_the_clients_next_query_not_asked_again() -> None:
    s, teacher = make()
    grid = FakeGrid({11: honest(0), 22: _crashing_once(P.ANSWERS, honest(1), times=2), 33: honest(2)})
    s.transport.partition_of = {11: 0, 22: 1, 33: 2}
    s.phases.run_queries(grid, [11, 22, 33], ConfigRecord())
    assert s.ledger.answered == {11, 33} and set(s.ledger.undelivered) == {"client-1"}
    s.phases.run_queries(grid, [22], ConfigRecord())  # its next participation (lazy phases: sampled again)
    assert s.ledger.answered == {11, 22, 33} and s.ledger.undelivered == {}
    assert s.ledger.queries_used["client-1"] == 6 and teacher.calls == 3  # neither charged nor asked again
    assert s.ledger.log[-1]["redelivered"] and s.ledger.log[-1]["charged"] == 0


# ---------------------------------------------------------------------------- 7 and 10b. waiting and matching
class SuperLinkGrid(FakeGrid):
    """A grid with Flower's push/pull: messages get ids, replies are matched by `reply_to_message_id`, an
    offline node is answered for by the SuperLink (NODE_UNAVAILABLE, from the SuperLink's node), and
    `send_and_receive` is Flower's own (`InMemoryGrid`'s loop: it waits for a reply to every message id)."""

    pull_interval = 0.01

    def __init__(self, nodes: dict[int, Handler], offline: set[int] | None = None) -> None:
        super().__init__(nodes)
        self.offline = offline if offline is not None else set()
        self.queue: list[Message] = []

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid4().hex
            self.sent.append(m)
            node = m.metadata.dst_node_id
            r = (
                create_message_error_unavailable_res_message(m.metadata, "node_unavail")
                if node in self.offline
                else self.nodes[node](m)
            )
            if r is not None:
                self.queue.append(r)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        out, self.queue = self.queue, []
        return out

    send_and_receive = InMemoryGrid.send_and_receive  # Flower's own loop, on this grid's push and pull


def _spoofing(inner: Handler, on: str) -> Handler:
    """A node that answers `on` messages with a reply naming another message."""

    def handle(m: Message) -> Message:
        r = inner(m)
        if m.metadata.message_type == on:
            r.metadata.__dict__["_reply_to_message_id"] = "not-a-message-that-was-sent"
        return r

    return handle


def test_a_spoofed_reply_does_not_make_the_server_wait_out_the_reply_timeout() -> None:
    s, _ = make(min_reply_fraction=0.5)
    grid = SuperLinkGrid({11: honest(0), 22: honest(1), 33: _spoofing(honest(2), P.TRAIN)})
    t0 = time.time()
    run(s, grid, rounds=1, timeout=20)
    assert time.time() - t0 < 10  # not the 20 s reply-timeout
    reasons = [(f["phase"], f["node"], f["reason"]) for f in s.failures.entries]
    assert reasons == [("train", 33, "reply to another message ignored")]  # once, and not "no reply"


def test_a_reply_to_a_sent_message_from_another_node_is_not_used_and_not_waited_for() -> None:
    s, _ = make(min_reply_fraction=0.5)
    s.transport.partition_of = {11: 0, 22: 1, 33: 2}
    s.transport.timeout = 20
    grid = SuperLinkGrid({11: honest(0), 22: honest(1), 33: honest(2)})
    messages = [s.transport.message(n, P.EVALUATE, {P.CONFIG: ConfigRecord()}) for n in (11, 22, 33)]
    real = grid.nodes[33]
    grid.nodes[33] = lambda m: (r := real(m)).metadata.__dict__.update(_src_node_id=11) or r  # 11 answers for 33
    t0 = time.time()
    good = s.transport.exchange(grid, messages, "evaluate")
    assert time.time() - t0 < 10
    assert [r.metadata.src_node_id for r in good] == [11, 22]
    assert [(f["node"], f["reason"]) for f in s.failures.entries] == [
        (33, "reply sent by node 11, not by the node asked")
    ]


def _phases_done(s: MEKD) -> None:
    """Three clients (nodes 11, 22, 33) that came through the phases: `start` runs only the rounds."""
    s.transport.partition_of = {11: 0, 22: 1, 33: 2}
    s.ledger.answered = {11, 22, 33}
    s.ledger.example_cap = {11: 6, 22: 6, 33: 6}
    s.phases.plan.phase = "lazy"  # lazy phases skip clients that already hold answers


class RefusingGrid(SuperLinkGrid):
    """A SuperLink that does not accept the messages to some nodes (Flower returns None for their ids,
    or nothing at all for a payload that is too large)."""

    refused: frozenset[int] = frozenset({33})

    def push_messages(self, messages) -> list:
        kept = [m for m in messages if m.metadata.dst_node_id not in self.refused]
        ids = iter(super().push_messages(kept))
        return [None if m.metadata.dst_node_id in self.refused else next(ids) for m in messages]


def test_a_message_the_superlink_refused_is_recorded_as_not_delivered_not_as_a_timeout() -> None:
    s, _ = make(min_reply_fraction=0.5)
    grid = RefusingGrid({11: honest(0), 22: honest(1), 33: honest(2)})
    _phases_done(s)
    t0 = time.time()
    run(s, grid, rounds=1, timeout=20)
    assert time.time() - t0 < 10
    entries = [(f["phase"], f["node"], f["reason"]) for f in s.failures.entries]
    refused = "message not delivered: the SuperLink refused it (too large or malformed; see Flower's log)"
    assert entries == [("train", 33, refused), ("evaluate", 33, refused)]


def test_an_offline_node_is_one_failure_with_flowers_reason_per_phase() -> None:
    s, _ = make(min_reply_fraction=0.5)
    grid = SuperLinkGrid({11: honest(0), 22: honest(1), 33: honest(2)})
    _phases_done(s)
    grid.offline = {33}  # gone after the phases: the SuperLink answers its round messages (source: node 1)
    t0 = time.time()
    run(s, grid, rounds=2, timeout=20)
    assert time.time() - t0 < 10
    entries = [(f["phase"], f["round"], f["node"], f["partition"]) for f in s.failures.entries]
    assert entries == [("train", 1, 33, 2), ("evaluate", 1, 33, 2), ("train", 2, 33, 2), ("evaluate", 2, 33, 2)]
    assert all(f["reason"].startswith("Flower error 5: Error: Node Unavailable") for f in s.failures.entries)
