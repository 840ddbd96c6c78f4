"""The teacher on a SuperNode of its own: found by proof, never sampled, budgets and validation kept.

Every node runs a real ClientApp in this process: students are a user's app with `register_mekd`, the
teacher is `make_teacher_app(TeacherOracle(...))` with a secret token; impostors claim the role.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from mekd_fl.teacher.app import make_teacher_app, register_teacher
from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD, RunFailed, TeacherNode
from strategies import protocol as P
from strategies.teacher_node import role_proof
from tests.test_client_api import CLASSES, SHAPE, Teacher, UserNet, agreement, node_images, users_app

pytestmark = pytest.mark.usefixtures("task_identity")

TOKEN = "s3cret-teacher-token"
TEACHER = 500


class Grid:
    """One ClientApp per node, run in this process; records every message."""

    def __init__(self, apps: dict[int, ClientApp], node_config: dict[int, dict] | None = None) -> None:
        self.apps = apps
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": i, "num-partitions": len(apps), **(node_config or {}).get(n, {})},
            )
            for i, n in enumerate(sorted(apps))
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            try:
                out.append(self.apps[node](m, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001
                out.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
        return out


def teacher_oracle(budget: int = 100_000) -> TeacherOracle:
    return TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE, budget=budget)


def federation(teacher_app: ClientApp | None = None, students: int = 3, **extra: ClientApp) -> Grid:
    calls = {"train": 0, "evaluate": 0}
    apps = {100 + i: users_app(calls) for i in range(students)}
    apps[TEACHER] = teacher_app or make_teacher_app(teacher_oracle(), token=TOKEN)
    apps.update({int(k): v for k, v in extra.items()})
    return Grid(apps)


def strategy(oracle, **kwargs) -> MEKD:
    inner = FedAvg(min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2)
    return MEKD(oracle, strategy=inner, emulator_steps=4, log_fn=lambda _: None, min_available_nodes=3, **kwargs)


def test_queries_are_answered_by_the_teacher_node_which_is_never_a_student() -> None:
    grid = federation()
    torch.manual_seed(0)
    start = UserNet().state_dict()
    s = strategy(TeacherNode(token=TOKEN))
    result = s.start(grid, ArrayRecord(start), num_rounds=3, train_config=ConfigRecord({"lr": 0.05}))
    assert s.failures.entries == [] and s.transport.teacher_node == TEACHER
    assert TEACHER not in s.transport.partition_of and sorted(s.transport.partition_of) == [100, 101, 102]
    to_teacher = [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == TEACHER]
    assert set(to_teacher) == {P.ROLE, P.TEACH} and to_teacher.count(P.TEACH) == 3  # one per student
    for m in grid.sent:
        if m.metadata.dst_node_id == TEACHER:
            assert set(m.content.keys()) <= P.OUTGOING[m.metadata.message_type]
    assert s.ledger.queries_used == {"client-0": 96, "client-1": 96, "client-2": 96}
    held = node_images(98, 256)
    assert agreement(result.arrays.to_torch_state_dict(), held) > 0.6


def test_the_teacher_nodes_own_budget_holds_beside_the_strategys() -> None:
    grid = federation(make_teacher_app(teacher_oracle(budget=50), token=TOKEN))
    s = strategy(TeacherNode(token=TOKEN), min_reply_fraction=0.0)
    with pytest.raises(RunFailed):  # every client asks 96 > 50: the teacher refuses each, nothing is answered
        s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1)
    assert [f["phase"] for f in s.failures.entries] == ["query"] * 3
    assert all("budget" in f["reason"] for f in s.failures.entries)
    assert s.ledger.queries_used == {}


def test_an_impostor_without_the_token_is_not_taken_for_the_teacher() -> None:
    impostor = ClientApp()

    @impostor.query("role")
    def claim(message: Message, context: Context) -> Message:
        fake = role_proof("guessed-token", str(message.content[P.CONFIG][P.NONCE]), context.node_id)
        return Message(RecordDict({P.CONFIG: ConfigRecord({P.PROOF: fake})}), reply_to=message)

    grid = federation(**{"600": impostor})
    s = strategy(TeacherNode(token=TOKEN))
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1, num_nodes=4)
    assert (
        s.transport.teacher_node == TEACHER and 600 in s.transport.partition_of
    )  # a student like any other, never the teacher


def test_a_replayed_proof_does_not_pass_for_another_node() -> None:
    """A proof is bound to the node id: relaying the real teacher's answer from another node fails."""
    nonce = "abc"
    assert role_proof(TOKEN, nonce, TEACHER) != role_proof(TOKEN, nonce, 600)


@pytest.mark.parametrize("case", ["two-teachers", "no-teacher", "wrong-token"])
def test_the_run_fails_in_one_line_unless_exactly_one_node_proves_it(case: str) -> None:
    if case == "two-teachers":
        grid = federation(**{"600": make_teacher_app(teacher_oracle(), token=TOKEN)})
    elif case == "no-teacher":
        grid = federation(users_app({"train": 0, "evaluate": 0}))
    else:
        grid = federation(make_teacher_app(teacher_oracle(), token="another"))
    s = strategy(TeacherNode(token=TOKEN))
    with pytest.raises(RunFailed) as err:
        s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1, num_nodes=3)
    assert "teacher" in str(err.value) and "\n" not in str(err.value)
    assert not any(m.metadata.message_type == P.EMULATOR for m in grid.sent)  # nothing asked of any client


def test_a_pinned_teacher_node_needs_no_token_and_a_student_app_refuses_the_role() -> None:
    both = users_app({"train": 0, "evaluate": 0})
    register_teacher(both, teacher_oracle(), token=TOKEN)  # same app on every node, teacher by node-config
    grid = federation(both)
    grid.contexts[TEACHER].node_config["mekd-role"] = "teacher"
    s = strategy(TeacherNode(node_id=TEACHER))
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1, num_nodes=3)
    assert s.transport.teacher_node == TEACHER and s.failures.entries == []
    other = Message(RecordDict({P.CONFIG: ConfigRecord({P.CLIENT: "x"})}), message_type=P.TEACH, dst_node_id=100)
    with pytest.raises(PermissionError):
        both(other, grid.contexts[100])  # a student node never answers as the teacher
    with pytest.raises(ValueError, match="node_id= or a token"):
        TeacherNode(token="")
