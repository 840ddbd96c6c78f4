"""Issue 21 item 10: a node that lost its state (a restarted SuperNode keeps its node id, not its memory)
is prepared again and trains in the next round, re-delivered the answers it paid for without a second
charge; a client that keeps claiming so is re-prepared a bounded number of times.

The fast tests drive MEKD over scripted clients; the slow one runs the project's real ClientApp in a
Flower simulation whose node for partition 1 loses its whole context state before its round-2 training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from mekd_fl.client.handlers import mekd_handlers
from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD
from strategies import protocol as P
from tests.scripted_clients import CLASSES, SHAPE, FakeGrid, Handler, Teacher, honest, student, with_emulator

pytestmark = pytest.mark.usefixtures("task_identity")

torch.set_num_threads(1)


def make(**kwargs) -> tuple[MEKD, Teacher]:
    teacher = Teacher()
    oracle = TeacherOracle(teacher, num_classes=CLASSES, image_shape=SHAPE, budget=10)
    kwargs = {
        "train_emulators": True,
        "emulator_steps": 1,
        "log_fn": lambda _: None,
        "min_available_nodes": 3,
        **kwargs,
    }
    return MEKD(oracle, query_budget=10, **kwargs), teacher


def run(s: MEKD, grid: FakeGrid, rounds: int):
    return s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.1}),
        num_nodes=len(grid.nodes),
    )


def lost_state(m: Message) -> Message:
    """The error the project's ClientApp sends when it holds no answers (Flower's format of the reason)."""
    return Message(Error(code=0, reason=f"<class 'ValueError'>:<'{P.STATE_LOST}: no answers'>"), reply_to=m)


def restarting(inner: Handler, at_round: int) -> Handler:
    """A node whose memory is wiped before its training message of `at_round`: until its answers arrive
    again it says it holds none, as the real client does."""
    node = {"holds": False, "wiped": False}

    def handle(m: Message) -> Message:
        kind = m.metadata.message_type
        if kind == P.ANSWERS:
            node["holds"] = True
        if kind == P.TRAIN and int(m.content[P.CONFIG][P.SERVER_ROUND]) == at_round and not node["wiped"]:
            node.update(holds=False, wiped=True)
        if kind == P.TRAIN and not node["holds"]:
            return lost_state(m)
        return inner(m)

    return handle


def liar(inner: Handler) -> Handler:
    """A client that says it lost its state at every training message."""

    def handle(m: Message) -> Message:
        return lost_state(m) if m.metadata.message_type == P.TRAIN else inner(m)

    return handle


def trained(grid: FakeGrid, node: int) -> list[int]:
    """The rounds whose training message reached `node`."""
    return [
        int(m.content[P.CONFIG][P.SERVER_ROUND])
        for m in grid.sent
        if m.metadata.message_type == P.TRAIN and m.metadata.dst_node_id == node
    ]


def test_a_restarted_node_is_prepared_again_and_trains_without_a_second_charge() -> None:
    s, teacher = make()
    grid = FakeGrid(
        {11: with_emulator(honest(0)), 22: restarting(with_emulator(honest(1)), 2), 33: with_emulator(honest(2))}
    )
    run(s, grid, rounds=3)
    sent = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert sent.count((P.EMULATOR, 22)) == 2 and sent.count((P.QUERY, 22)) == 2 and sent.count((P.ANSWERS, 22)) == 2
    assert trained(grid, 22) == [1, 2, 3]  # it lost round 2 only
    fails = [(f["phase"], f["round"]) for f in s.failures.entries if f["partition"] == 1]
    assert fails == [("train", 2)], s.failures.entries
    assert P.STATE_LOST in s.failures.entries[0]["reason"]
    assert s.ledger.queries_used == {"client-0": 6, "client-1": 6, "client-2": 6}  # charged once
    assert s.oracle.used("client-1") == 6
    again = [e for e in s.ledger.log if e["partition"] == 1]
    assert [e["charged"] for e in again] == [6, 0] and again[1]["redelivered"]
    assert s.ledger.answered == {11, 22, 33} and s.phases.reprepared == {22: 1}


def test_a_client_that_keeps_claiming_a_lost_state_is_prepared_again_at_most_twice() -> None:
    s, _ = make(min_reply_fraction=0.5)
    grid = FakeGrid({11: with_emulator(honest(0)), 22: liar(with_emulator(honest(1))), 33: with_emulator(honest(2))})
    run(s, grid, rounds=5)
    sent = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert sent.count((P.QUERY, 22)) == 1 + P.MAX_REPREPARE  # the first preparation, then two more
    assert s.phases.reprepared == {22: P.MAX_REPREPARE}
    assert s.ledger.queries_used["client-1"] == 6  # never charged again
    assert [f["round"] for f in s.failures.entries if f["partition"] == 1] == [1, 2, 3, 4, 5]


def test_a_node_that_never_received_answers_is_not_prepared_as_a_rejoin() -> None:
    """Only a node the server delivered answers to can have lost them: others are plain failures."""
    s, _ = make()
    s.transport.partition_of = {11: 0, 22: 1, 33: 2}
    s.transport.lost = {22}
    s.ledger.answered = {11, 33}
    grid = FakeGrid({11: honest(0), 22: honest(1), 33: honest(2)})
    s.configure_train(1, ArrayRecord({k: Array(v) for k, v in student().items()}), ConfigRecord(), grid)
    assert s.phases.reprepared == {} and s.transport.lost == set()
    assert [m.metadata.message_type for m in grid.sent] == []  # configure_train only plans the round


def test_the_client_says_so_when_its_state_is_gone() -> None:
    """The project's ClientApp handler, on a node whose state is empty: an error the server recognises."""
    handlers = mekd_handlers(lambda message, context: None)  # never reached: the answers are read first
    message = Message(
        RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in student().items()}), P.CONFIG: ConfigRecord()}),
        dst_node_id=1,
        message_type=P.TRAIN,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=P.STATE_LOST):
        handlers[P.TRAIN](message, context)


@pytest.mark.slow
def test_a_node_that_loses_its_state_in_a_simulation_rejoins(tmp_path: Path) -> None:
    cell = {
        "dataset": "synthetic",
        "num-clients": 3,
        "num-rounds": 3,
        "teacher-epochs": 2,
        "teacher-arch": "resnet8",
        "emulator-steps": 3,
        "emulator-width": 8,
        "num-samples": 0,
        "fidelity-images": 0,
        "run-name": "rejoin",
    }
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    runner = Path(__file__).with_name("combination_runner.py")
    argv = [
        sys.executable,
        str(runner),
        str(tmp_path / "runs"),
        str(tmp_path / "cache"),
        json.dumps([cell]),
        "forget=1@2",
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    outcome = json.loads((tmp_path / "runs" / "outcome.json").read_text()) if proc.returncode == 0 else {}
    assert outcome.get("rejoin") == "ok", proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "runs" / "rejoin"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds-done"] == 3
    failures = [(f["phase"], f["round"], f["partition"]) for f in summary["failures"]]
    assert failures == [("train", 2, 1)], summary["failures"]
    assert P.STATE_LOST in summary["failures"][0]["reason"]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    mine = [q for q in queries if q.get("partition") == 1]
    assert [q["charged"] for q in mine] == [mine[0]["charged"], 0] and mine[0]["charged"] > 0
    assert mine[1]["redelivered"]
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["failures"] == []  # round 3: every client trained again
