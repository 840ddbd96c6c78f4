"""The teacher node's own bounds hold against a hostile server: it writes the client names, the node counts.

A server (here a driver that writes its own `query.teach` messages, as a hostile SuperLink operator
could) invents client names to multiply a per-client budget. The teacher node caps the distinct names
(`max_clients`) and the answers to all of them (`total_budget`), keeps its ledger where a fresh
per-message process still sees it, and does not charge a resumed run's re-delivery twice.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from mekd_fl.teacher.app import DEFAULT_MAX_CLIENTS, STATE_RECORD, make_teacher_app
from strategies import MEKD, TeacherNode
from strategies import protocol as P
from tests.test_client_api import CLASSES, SHAPE, UserNet
from tests.test_teacher_node import TEACHER, TOKEN, federation, strategy, teacher_oracle

pytestmark = pytest.mark.usefixtures("task_identity")


def context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=TEACHER, state=RecordDict(), run_config={}, node_config=node_config or {})


def ask(client: str, n: int = 10, seed: int = 0) -> Message:
    """What a server writes to the teacher node: images charged to whatever name it chooses."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    content = {P.CONFIG: ConfigRecord({P.CLIENT: client}), P.QUERIES: ArrayRecord({P.IMAGES: Array(images)})}
    return Message(RecordDict(content), message_type=P.TEACH, dst_node_id=TEACHER)


def hostile(app, ctx: Context, names: int = 100, n: int = 10) -> tuple[int, list[str]]:
    """Invent `names` client names, `n` images each; the answers obtained and the refusals' reasons."""
    answered, refused = 0, []
    for i in range(names):
        try:
            reply = app(ask(f"invented-{i}", n, seed=i), ctx)
        except Exception as exc:  # noqa: BLE001  (the runtime turns it into an error reply)
            refused.append(f"{type(exc).__name__}: {exc}")
            continue
        answered += reply.content[P.ANSWERS_RECORD][P.RESPONSES].numpy().shape[0]
    return answered, refused


def test_the_eleventh_invented_name_beyond_a_cap_of_ten_is_refused() -> None:
    app = make_teacher_app(teacher_oracle(budget=10), token=TOKEN, max_clients=10, total_budget=10_000)
    answered, refused = hostile(app, context())
    assert answered == 100 and len(refused) == 90  # 10 names x 10, then every new name refused
    assert "max_clients=10" in refused[0] and "invented-10" in refused[0] and "\n" not in refused[0]


def test_a_hostile_server_gets_at_most_the_total_budget() -> None:
    app = make_teacher_app(teacher_oracle(budget=10), token=TOKEN, max_clients=1000, total_budget=35)
    answered, refused = hostile(app, context())
    assert answered == 30  # three whole queries; the fourth (10 > 5 left) is refused whole
    assert "5 of its total_budget=35 left" in refused[0]


def test_the_defaults_bound_a_hostile_server_at_ten_clients_budgets() -> None:
    app = make_teacher_app(teacher_oracle(budget=10), token=TOKEN)  # before: 100 names x 10 = 1000 answers
    answered, refused = hostile(app, context())
    assert answered == DEFAULT_MAX_CLIENTS * 10 == 100 and len(refused) == 90


def test_the_owner_may_set_the_bounds_in_the_node_config() -> None:
    app = make_teacher_app(teacher_oracle(budget=10), token=TOKEN)
    ctx = context({"mekd-teacher-max-clients": 3, "mekd-teacher-total-budget": "25"})
    answered, refused = hostile(app, ctx)
    assert answered == 20 and "total_budget=25" in refused[0]


def test_a_fresh_process_per_message_still_sees_the_budget() -> None:
    """Flower's Deployment Engine runs each message in a new ClientApp process (a new oracle, zero counts):
    the ledger in the node's Context.state keeps the per-client budget and the bounds."""
    ctx = context()
    fresh = lambda: make_teacher_app(teacher_oracle(budget=10), token=TOKEN, max_clients=2)  # noqa: E731
    fresh()(ask("a", 10, seed=1), ctx)
    with pytest.raises(ValueError, match="0 of its query-budget=10 left on the teacher node"):
        fresh()(ask("a", 10, seed=2), ctx)
    fresh()(ask("b", 10, seed=3), ctx)
    with pytest.raises(ValueError, match="max_clients=2"):
        fresh()(ask("c", 1), ctx)
    assert {k: a["charged"] for k, a in json.loads(ctx.state[STATE_RECORD]["json"])["clients"].items()} == {
        "a": 10,
        "b": 10,
    }


def test_a_ledger_file_holds_across_runs_and_restarts(tmp_path) -> None:
    path = tmp_path / "teacher-ledger.json"

    def restarted():  # a restarted node: a new app and oracle, and a new run: a new Context
        app = make_teacher_app(teacher_oracle(budget=10), token=TOKEN, max_clients=1000, total_budget=25, ledger=path)
        return app, context()

    assert hostile(*restarted(), names=3)[0] == 20
    for run in (1, 2):
        app, ctx = restarted()
        with pytest.raises(ValueError, match="5 of its total_budget=25 left"):
            app(ask(f"run-{run}", 10, seed=100 + run), ctx)
        again = app(ask("invented-0", 10, seed=0), ctx)  # a re-delivery across the restart: free
        assert again.content[P.ANSWERS_RECORD][P.RESPONSES].numpy().shape == (10, CLASSES)
    assert sum(a["charged"] for a in json.loads(path.read_text())["clients"].values()) == 20
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):  # a damaged ledger is never read as empty
        make_teacher_app(teacher_oracle(budget=10), token=TOKEN, ledger=path)(ask("x"), context())


def test_a_repeat_of_paid_images_is_answered_again_without_a_second_charge() -> None:
    oracle = teacher_oracle(budget=10)
    app, ctx = make_teacher_app(oracle, token=TOKEN), context()
    first = app(ask("a", 10), ctx).content[P.ANSWERS_RECORD][P.RESPONSES].numpy()
    again = app(ask("a", 10), ctx).content[P.ANSWERS_RECORD][P.RESPONSES].numpy()
    assert np.array_equal(first, again) and oracle.used("a") == 10
    with pytest.raises(ValueError, match="0 of its query-budget=10 left"):  # other images: a new charge
        app(ask("a", 1, seed=5), ctx)


def test_a_refused_or_failing_query_costs_no_place_and_no_budget() -> None:
    app, ctx = make_teacher_app(teacher_oracle(budget=10), token=TOKEN, max_clients=1), context()
    bad = ask("a")
    bad.content[P.QUERIES] = ArrayRecord({P.IMAGES: Array(np.zeros((2, 9, 9, 9), dtype=np.uint8))})
    with pytest.raises(ValueError, match="query shape"):
        app(bad, ctx)
    app(ask("b", 4), ctx)  # the refused "a" took no place under max_clients=1
    for key in ("", "k" * 201):
        with pytest.raises(ValueError, match="client key"):
            app(ask(key), ctx)


@pytest.mark.parametrize(("setting", "value"), [("max_clients", 0), ("total_budget", -1), ("max_clients", True)])
def test_bad_bounds_are_refused_when_the_app_is_built(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{setting}="):
        make_teacher_app(teacher_oracle(), token=TOKEN, **{setting: value})


def test_a_resumed_run_gets_its_answers_from_the_teacher_node_without_paying_twice() -> None:
    grid = federation(make_teacher_app(teacher_oracle(budget=96), token=TOKEN, max_clients=3))
    s = strategy(TeacherNode(token=TOKEN))
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1)
    assert s.failures.entries == [] and s.ledger.queries_used == {f"client-{i}": 96 for i in range(3)}
    resumed: MEKD = strategy(TeacherNode(token=TOKEN))
    resumed.load_state(s.state())
    resumed.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=2, start_round=2)
    assert resumed.failures.entries == s.failures.entries == []
    assert all(e["redelivered"] and e["charged"] == 0 for e in resumed.ledger.log if e["phase"] == "query")
    assert resumed.ledger.queries_used == s.ledger.queries_used


def test_an_honest_server_over_the_cap_records_the_refusal_and_the_run_goes_on() -> None:
    grid = federation(make_teacher_app(teacher_oracle(), token=TOKEN, max_clients=2))
    s = strategy(TeacherNode(token=TOKEN))
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1)
    assert [f["phase"] for f in s.failures.entries] == ["query"]
    assert "max_clients=2" in s.failures.entries[0]["reason"] and len(s.ledger.queries_used) == 2
