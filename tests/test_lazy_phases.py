"""`emulator_phase="lazy"`: a client trains its emulator and queries the teacher the first time it is
sampled, so a run's cost follows the clients that take part, not the population."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import MEKD, RunFailed
from strategies import protocol as P
from tests.scripted_clients import SHAPE, RecordingGrid, crashing, honest, mekd, node_id, student, with_emulator

pytestmark = pytest.mark.usefixtures("task_identity")


def population(n: int) -> RecordingGrid:
    return RecordingGrid({node_id(i): with_emulator(honest(i, images=4)) for i in range(n)})


def run(s: MEKD, grid: RecordingGrid, rounds: int) -> None:
    s.start(
        grid,
        ArrayRecord({k: Array(v) for k, v in student().items()}),
        num_rounds=rounds,
        train_config=ConfigRecord({"lr": 0.1}),
        num_nodes=len(grid.nodes),
    )


def phase_targets(grid: RecordingGrid, kind: str) -> list[int]:
    return [m.metadata.dst_node_id for m in grid.sent_of(kind)]


def test_only_sampled_clients_pay_the_phases_and_each_pays_once() -> None:
    grid = population(40)
    s = mekd(
        n=40, emulator_phase="lazy", fraction_train=0.1, fraction_evaluate=0.1, min_train_nodes=1, min_evaluate_nodes=1
    )
    run(s, grid, rounds=3)
    trained = {m.metadata.dst_node_id for m in grid.sent_of(P.TRAIN)}
    emulated = phase_targets(grid, P.EMULATOR)
    assert len(trained) <= 12 < 40  # 4 a round, some drawn twice
    assert sorted(emulated) == sorted(set(emulated)) == sorted(trained)  # each sampled client once, no other
    assert sorted(phase_targets(grid, P.QUERY)) == sorted(trained) == sorted(s.ledger.answered)
    assert set(phase_targets(grid, P.EVALUATE)) <= s.ledger.answered  # evaluation only where answers are held
    assert sum(s.ledger.queries_used.values()) == 4 * len(trained)  # budgets charged for those clients alone


def test_lazy_and_upfront_sample_the_same_cohorts() -> None:
    lazy_grid, upfront_grid = population(12), population(12)
    kwargs = dict(n=12, fraction_train=0.25, min_train_nodes=1, seed=5)
    run(mekd(emulator_phase="lazy", **kwargs), lazy_grid, rounds=3)
    run(mekd(emulator_phase="upfront", **kwargs), upfront_grid, rounds=3)
    assert phase_targets(lazy_grid, P.TRAIN) == phase_targets(upfront_grid, P.TRAIN)
    assert len(phase_targets(upfront_grid, P.EMULATOR)) == 12 > len(phase_targets(lazy_grid, P.EMULATOR))


def test_a_client_whose_phases_fail_sits_out_and_the_run_goes_on() -> None:
    grid = population(6)
    grid.nodes[node_id(2)] = crashing({P.EMULATOR}, grid.nodes[node_id(2)])
    s = mekd(n=6, emulator_phase="lazy", min_reply_fraction=0.5)
    run(s, grid, rounds=2)
    assert node_id(2) not in s.ledger.answered and node_id(2) not in phase_targets(grid, P.TRAIN)
    assert [f["phase"] for f in s.failures.entries] == ["emulator", "emulator"]  # tried again when sampled again
    assert s.ledger.answered == {node_id(i) for i in range(6)} - {node_id(2)}


def test_too_many_failed_newcomers_fail_the_run_in_one_line() -> None:
    grid = population(4)
    for i in range(3):
        grid.nodes[node_id(i)] = crashing({P.QUERY}, grid.nodes[node_id(i)])
    with pytest.raises(RunFailed, match="emulator and query phases of round 1: 1 of 4"):
        run(mekd(n=4, emulator_phase="lazy"), grid, rounds=1)


def test_bad_phase_settings_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="emulator_phase='soon'"):
        mekd(emulator_phase="soon")
    with pytest.raises(ValueError, match="federated_emulator"):
        mekd(emulator_phase="lazy", federated_emulator=True)


def test_large_phases_report_progress_with_an_eta() -> None:
    lines: list[str] = []
    grid = population(60)
    s = mekd(n=60, fraction_train=0.05, min_train_nodes=1, log_fn=lines.append)
    run(s, grid, rounds=1)
    progress = [line for line in lines if "clients asked" in line]
    assert len([line for line in progress if line.startswith("[emulator]")]) == 10
    # paired (the default): the queries come first, then the emulators
    assert any(line.startswith("[query] 60/60 clients asked, 60 replied") for line in progress)
    assert progress[-1].startswith("[emulator] 60/60 clients asked, 60 replied") and "ETA 0s" in progress[-1]


def with_samples(inner):
    """A client that also answers the `evaluate.samples` message with `num-samples` uint8 images."""

    def handle(m: Message) -> Message:
        if m.metadata.message_type != P.SAMPLES:
            return inner(m)
        count = int(m.content[P.CONFIG][P.NUM_SAMPLES])
        image = Array(np.zeros((count, *SHAPE), dtype=np.uint8))
        return Message(
            RecordDict(
                {
                    P.ARRAYS: ArrayRecord({"images": image, "g-teacher": image, "g-student": image}),
                    P.METRICS: MetricRecord({P.NUM_EXAMPLES: count}),
                }
            ),
            reply_to=m,
        )

    return handle


@pytest.mark.parametrize(("images", "chosen"), [((2, 9, 5, 9), 1), ((3, 3, 3), 0)])
def test_the_fidelity_samples_come_from_the_client_holding_the_most_answers(images: tuple, chosen: int) -> None:
    """The server measures the emulator's fidelity on these images: a client with 2 answers would make
    the diagnostic a coin toss. Ties go to the lowest partition, so a seed always picks the same client."""
    grid = RecordingGrid({node_id(i): with_samples(with_emulator(honest(i, images=k))) for i, k in enumerate(images)})
    s = mekd(n=len(images))
    run(s, grid, rounds=1)
    got = s.request_samples(grid, ArrayRecord({k: Array(v) for k, v in student().items()}), ConfigRecord({}), 8)
    assert [m.metadata.dst_node_id for m in grid.sent_of(P.SAMPLES)] == [node_id(chosen)]
    assert got is not None and got["images"].shape == (8, *SHAPE)
