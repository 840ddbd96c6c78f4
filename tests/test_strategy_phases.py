"""`MEKD.start` against scripted clients (a fake Grid): identity, hostile query replies, failures, resume.

No Flower runtime: the fake Grid hands each message to a Python function playing that node. Honest
nodes answer as `mekd_fl.client.app` does; hostile ones lie about who they are, send malformed queries
or crash. The run must go on, record every failure, and key everything by the node id.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD, RunFailed
from strategies import protocol as P
from tests.scripted_clients import CLASSES, SHAPE, FakeGrid, Handler, Teacher, crashing, honest, student

pytestmark = pytest.mark.usefixtures("task_identity")

torch.set_num_threads(1)


def make(oracle=None, **kwargs) -> tuple[MEKD, Teacher]:
    teacher = Teacher()
    oracle = oracle or TeacherOracle(teacher, num_classes=CLASSES, image_shape=SHAPE, budget=10)
    s = MEKD(oracle, query_budget=10, train_emulators=False, log_fn=lambda _: None, min_available_nodes=3, **kwargs)
    return s, teacher


def run(s: MEKD, grid: FakeGrid, rounds: int = 2, **kwargs):
    return s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.1}),
        num_nodes=3,
        **kwargs,
    )


# ---------------------------------------------------------------------------- identity
def test_budgets_are_keyed_by_the_node_not_by_the_claimed_partition() -> None:
    s, _ = make()
    grid = FakeGrid({11: honest(0), 22: honest(1, claim=0), 33: honest(2, claim=0)})  # two liars claim 0
    run(s, grid, rounds=1)
    assert s.transport.partition_of == {11: 0, 22: 1, 33: 2}
    assert s.ledger.queries_used == {"client-0": 6, "client-1": 6, "client-2": 6}
    assert s.ledger.answered == {11, 22, 33}
    assert s.failures.entries == []


# ---------------------------------------------------------------------------- hostile query replies
def _query_reply(kind: str) -> Handler:
    base = honest(5)

    def handle(m: Message) -> Message:
        if m.metadata.message_type != P.QUERY:
            return base(m)
        good = np.zeros((4, *SHAPE), np.uint8)
        records: dict = {P.METRICS: MetricRecord({P.PARTITION_ID: 1.0})}
        if kind == "no-queries-record":
            pass
        elif kind == "no-images-array":
            records[P.QUERIES] = ArrayRecord({"pictures": Array(good)})
        elif kind == "float-images-out-of-range":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.full((4, *SHAPE), 7.0, np.float32))})
        elif kind == "nan-images":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.full((4, *SHAPE), np.nan, np.float32))})
        elif kind == "wrong-shape":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((4, 3, 4, 4), np.uint8))})
        elif kind == "three-d":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((4, 4, 4), np.uint8))})
        elif kind == "scalar":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.array(3, np.uint8))})
        elif kind == "empty":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((0, *SHAPE), np.uint8))})
        elif kind == "over-budget":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((11, *SHAPE), np.uint8))})
        elif kind == "int64-images":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((4, *SHAPE), np.int64))})
        elif kind == "bool-images":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((4, *SHAPE), bool))})
        elif kind == "nan-partition-id":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(good)})
            records[P.METRICS] = MetricRecord({P.PARTITION_ID: float("nan")})
        elif kind == "list-metric":
            records[P.QUERIES] = ArrayRecord({P.IMAGES: Array(good)})
            records[P.METRICS] = MetricRecord({P.PARTITION_ID: [1, 2], "x": [0.5]})
        elif kind == "error-reply":
            return Message(Error(code=3, reason="disk full"), reply_to=m)
        else:
            raise KeyError(kind)
        return Message(RecordDict(records), reply_to=m)

    return handle


REFUSED_QUERIES = [
    "no-queries-record",
    "no-images-array",
    "float-images-out-of-range",
    "nan-images",
    "wrong-shape",
    "three-d",
    "scalar",
    "empty",
    "over-budget",
    "int64-images",
    "bool-images",
    "error-reply",
]
HARMLESS_QUERIES = ["nan-partition-id", "list-metric"]


@pytest.mark.parametrize("kind", REFUSED_QUERIES)
def test_malformed_query_reply_is_refused_and_the_run_goes_on(kind: str) -> None:
    s, teacher = make()
    grid = FakeGrid({11: honest(0), 22: _query_reply(kind), 33: honest(2)})
    result = run(s, grid, rounds=1)
    assert result.arrays is not None
    assert s.ledger.answered == {11, 33}
    assert "client-1" not in s.ledger.queries_used or s.ledger.queries_used["client-1"] == 0
    assert [f["phase"] for f in s.failures.entries if f["node"] == 22] == ["query"]
    assert s.failures.entries[0]["partition"] == 1 and s.failures.entries[0]["reason"]
    assert not any(m.metadata.dst_node_id == 22 and m.metadata.message_type == P.TRAIN for m in grid.sent)


@pytest.mark.parametrize("kind", HARMLESS_QUERIES)
def test_odd_metrics_in_a_query_reply_do_not_matter(kind: str) -> None:
    s, _ = make()
    run(s, FakeGrid({11: honest(0), 22: _query_reply(kind), 33: honest(2)}), rounds=1)
    assert s.ledger.answered == {11, 22, 33} and s.ledger.queries_used["client-1"] == 4


def test_a_failing_teacher_charges_nothing_and_the_run_goes_on() -> None:
    calls = {"n": 0}
    real = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE, budget=10)

    def flaky(key: str, images: torch.Tensor):
        calls["n"] += 1
        if key == "client-1":
            raise RuntimeError("GPU fell off the bus")
        return real(key, images).numpy()  # an endpoint that answers numpy

    s, _ = make(oracle=flaky)
    run(s, FakeGrid({11: honest(0), 22: honest(1), 33: honest(2)}), rounds=1)
    assert "client-1" not in s.ledger.queries_used and real.used("client-1") == 0
    assert s.ledger.answered == {11, 33}
    assert "RuntimeError: GPU fell off the bus" in s.failures.entries[0]["reason"]
    log = {e["partition"]: e for e in s.ledger.log}
    assert log[1]["answered"] == 0 and log[0]["charged"] == 6
    assert all("images" not in e and "responses" not in e for e in s.ledger.log)


def test_an_oracle_answering_garbage_is_refused() -> None:
    s, _ = make(oracle=lambda key, images: np.full((len(images), CLASSES), np.nan))
    with pytest.raises(RunFailed, match="query phase: 0 of 3"):
        run(s, FakeGrid({11: honest(0), 22: honest(1), 33: honest(2)}), rounds=1)
    assert len(s.failures.entries) == 3 and all("non-finite" in f["reason"] for f in s.failures.entries)


# ---------------------------------------------------------------------------- failures and minimums
def test_crashes_in_every_phase_are_recorded_and_the_run_completes() -> None:
    s, _ = make(min_reply_fraction=0.3)
    grid = FakeGrid(
        {
            11: honest(0),
            22: crashing({P.TRAIN}, honest(1)),
            33: crashing({P.EVALUATE}, honest(2)),
            44: crashing({P.ANSWERS}, honest(3)),
        }
    )
    s.min_available_nodes = 4
    result = s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=2,
        train_config=ConfigRecord(),
        num_nodes=4,
    )
    assert result.arrays is not None
    phases = sorted((f["phase"], f["partition"], f["round"]) for f in s.failures.entries)
    # the answers are sent twice to a client that crashes on them (they are paid for): two failures
    assert phases == [
        ("answers", 3, 0),
        ("answers", 3, 0),
        ("evaluate", 2, 1),
        ("evaluate", 2, 2),
        ("train", 1, 1),
        ("train", 1, 2),
    ]


def test_a_round_with_every_update_refused_fails_loudly_in_one_line() -> None:
    s, _ = make()
    grid = FakeGrid({n: crashing({P.TRAIN}, honest(i)) for i, n in enumerate((11, 22, 33))})
    with pytest.raises(RunFailed) as info:
        run(s, grid, rounds=2)
    assert str(info.value).startswith("train round 1: 0 of 3 clients gave a usable reply")
    assert "\n" not in str(info.value)


def test_below_min_reply_fraction_fails() -> None:
    s, _ = make(min_reply_fraction=1.0)
    grid = FakeGrid({11: honest(0), 22: crashing({P.TRAIN}, honest(1)), 33: honest(2)})
    with pytest.raises(RunFailed, match=r"train round 1: 2 of 3 .* min-reply-fraction=1"):
        run(s, grid, rounds=1)


# ---------------------------------------------------------------------------- resume
def test_a_resumed_run_gets_its_paid_answers_again_without_paying_twice() -> None:
    s, _ = make()
    run(s, FakeGrid({11: honest(0), 22: honest(1), 33: honest(2)}), rounds=1)
    state = s.state()
    assert state["queries-used"] == {"client-0": 6, "client-1": 6, "client-2": 6}
    resumed, _ = make()  # a fresh process: new oracle, new node ids
    resumed.load_state(state)
    run(resumed, FakeGrid({71: honest(0), 72: honest(1), 73: honest(2)}), rounds=2, start_round=2)
    assert resumed.ledger.queries_used == state["queries-used"]
    assert all(e["redelivered"] and e["charged"] == 0 for e in resumed.ledger.log)
    assert resumed.last_round == 2


def test_a_resumed_client_sending_other_images_is_held_to_its_budget() -> None:
    s, _ = make()
    s.load_state({"queries-used": {"client-0": 10}, "query-digests": {"client-0": "not-these-images"}})
    run(s, FakeGrid({11: honest(0, images=10), 22: honest(1), 33: honest(2)}), rounds=1)
    assert s.ledger.queries_used["client-0"] == 10  # not charged again: refused, over what it paid for
    entry = next(e for e in s.ledger.log if e["partition"] == 0)
    assert entry["answered"] == 0 and "0 of query-budget=10 left" in entry["reason"]


# ---------------------------------------------------------------------------- federated emulator averages
def _emulator_reply(node: int, seed: int, poison: str = "") -> Message:
    rng = np.random.default_rng(seed)
    g = {"fc.weight": rng.normal(size=(4, 3)).astype(np.float32), "bn.num_batches_tracked": np.array(seed, np.int64)}
    d = {"conv.weight": rng.normal(size=(2, 2)).astype(np.float32)}
    if poison == "nan":
        g["fc.weight"][0, 0] = np.nan
    elif poison == "float64-1e40":
        g["fc.weight"] = g["fc.weight"].astype(np.float64) * 1e40
    elif poison == "scaled":
        d["conv.weight"] = d["conv.weight"] * 1e6
    elif poison == "missing":
        del g["fc.weight"]
    elif poison == "int":
        d["conv.weight"] = np.ones((2, 2), np.int32)
    instruction = Message(RecordDict(), dst_node_id=node, message_type=P.EMULATOR)
    return Message(
        RecordDict(
            {
                P.GENERATOR: ArrayRecord({k: Array(v) for k, v in g.items()}),
                P.DISCRIMINATOR: ArrayRecord({k: Array(v) for k, v in d.items()}),
                P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1e12}),
            }
        ),
        reply_to=instruction,
    )


def _emulator_strategy() -> MEKD:
    reference = {
        P.GENERATOR: ArrayRecord(
            {"fc.weight": Array(np.zeros((4, 3), np.float32)), "bn.num_batches_tracked": Array(np.array(0, np.int64))}
        ),
        P.DISCRIMINATOR: ArrayRecord({"conv.weight": Array(np.zeros((2, 2), np.float32))}),
    }
    s, _ = make(federated_emulator=True, emulator_reference=reference)
    s.transport.partition_of = {1: 0, 2: 1, 3: 2, 4: 3}
    return s


@pytest.mark.parametrize("poison", ["nan", "float64-1e40", "missing", "int"])
def test_a_poisoned_emulator_is_refused_from_the_average(poison: str) -> None:
    s = _emulator_strategy()
    clean, nodes = s.phases._average([_emulator_reply(n, n) for n in (1, 2, 3)], {})
    s2 = _emulator_strategy()
    averaged, nodes2 = s2.phases._average(
        [*(_emulator_reply(n, n) for n in (1, 2, 3)), _emulator_reply(4, 4, poison)], {}
    )
    assert nodes == nodes2 == [1, 2, 3]
    assert s2.failures.entries[0]["phase"] == "emulator" and s2.failures.entries[0]["partition"] == 3
    for key in (P.GENERATOR, P.DISCRIMINATOR):
        for k in clean[key].keys():
            np.testing.assert_array_equal(averaged[key][k].numpy(), clean[key][k].numpy())


def test_emulators_are_averaged_uniformly_and_a_long_one_is_refused() -> None:
    s = _emulator_strategy()
    replies = [*(_emulator_reply(n, n) for n in (1, 2, 3)), _emulator_reply(4, 4, "scaled")]
    averaged, nodes = s.phases._average(replies, {})
    assert nodes == [1, 2, 3]  # its norm is 1e6 x the others': refused (a failure), not only bounded
    assert [(e["partition"], e["phase"]) for e in s.failures.entries] == [(3, "emulator")]
    assert "discriminator norm" in s.failures.entries[0]["reason"]
    disc = averaged[P.DISCRIMINATOR]["conv.weight"].numpy()
    assert np.isfinite(disc).all() and np.abs(disc).max() < 10  # not 1e6 / 4
    honest, _ = _emulator_strategy().phases._average([_emulator_reply(n, n) for n in (1, 2, 3)], {})
    for key in (P.GENERATOR, P.DISCRIMINATOR):  # exactly the average of the others
        for k in honest[key].keys():
            np.testing.assert_array_equal(averaged[key][k].numpy(), honest[key][k].numpy())
    assert averaged[P.GENERATOR]["bn.num_batches_tracked"].numpy().dtype == np.int64
