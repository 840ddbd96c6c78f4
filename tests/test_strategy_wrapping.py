"""`MEKD` composes with Flower's message-based strategies, driven end to end through `MEKD.start`.

Each test plays scripted clients on the fake Grid of `test_strategy_phases` through every phase (local
emulators, teacher queries and answers, then 2-3 rounds) with a wrapped strategy from
`flwr.serverapp.strategy`, and checks the global model against what that strategy computes by its own
rule from the updates the clients actually sent (recorded here, before MEKD touches them).

Honest clients (`honest(seed)`) return the global model plus 0.01 * (seed + 1) everywhere, so every
expected value is easy to recompute; weights (`num-examples`) differ per client, so a plain mean
where a weighted one is due shows.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from strategies import MEKD, RunFailed
from strategies import protocol as P
from strategies.updates import distance
from tests.scripted_clients import (
    IMAGES,
    Arrays,
    Handler,
    RecordingGrid,
    honest,
    mekd,
    node_id,
    scaled,
    student,
    with_emulator,
)

pytestmark = pytest.mark.usefixtures("task_identity")


# ---------------------------------------------------------------------------- clients and the grid


def grid_of(n: int, *, attacker: int | None = None, factor: float = 1000.0) -> RecordingGrid:
    nodes = {}
    for i in range(n):
        client = honest(i, images=IMAGES[i])
        if i == attacker:
            client = scaled(factor, client)
        nodes[node_id(i)] = with_emulator(client)
    return RecordingGrid(nodes)


# ---------------------------------------------------------------------------- the run


class Run:
    """One `MEKD.start` over the grid; keeps the global model after each round (0 = initial)."""

    def __init__(self, s: MEKD, grid: RecordingGrid, rounds: int = 2, config: dict | None = None) -> None:
        self.s, self.grid = s, grid
        self.globals: dict[int, Arrays] = {}
        s.on_round = lambda record, arrays: self.globals.__setitem__(
            record["round"], {k: arrays[k].numpy().copy() for k in arrays.keys()}
        )
        self.result = s.start(
            grid,
            ArrayRecord({k: Array(v) for k, v in student().items()}),
            num_rounds=rounds,
            train_config=ConfigRecord(config or {"lr": 0.1}),
            num_nodes=len(grid.nodes),
        )
        self.final = {k: self.result.arrays[k].numpy() for k in self.result.arrays.keys()}
        assert s.last_round == rounds and sorted(self.globals) == list(range(rounds + 1))
        assert len(grid.sent_of(P.EMULATOR)) == len(grid.nodes) == len(s.phases.emulator_metrics)  # every phase ran
        assert s.ledger.answered == set(grid.nodes) and len(grid.sent_of(P.ANSWERS)) == len(grid.nodes)
        np.testing.assert_array_equal(self.final["weight"], self.globals[rounds]["weight"])


def weighted_mean(updates: list[tuple[int, Arrays, float]]) -> Arrays:
    total = sum(w for _, _, w in updates)
    return {k: sum(a[k].astype(np.float64) * (w / total) for _, a, w in updates) for k in updates[0][1]}


def close(a: Arrays, b: Arrays, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def ungated(**kwargs) -> dict:
    """Flower settings for an inner strategy that takes the cohort MEKD gives it."""
    return dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, **kwargs)


# ---------------------------------------------------------------------------- 1. FedAvg
@pytest.mark.parametrize("inner", [lambda: None, lambda: FedAvg()], ids=["default", "explicit"])
def test_fedavg_gives_the_example_weighted_mean_of_the_updates(inner) -> None:
    run = Run(mekd(inner()), grid_of(3), rounds=3)
    assert run.s.failures.entries == [] and run.s.clipped == []
    for rnd in (1, 2, 3):
        updates = sorted(run.grid.updates[rnd], key=lambda u: u[0])  # Flower's sampling shuffles the cohort
        assert [n for n, _, _ in updates] == [node_id(i) for i in range(3)]
        assert [w for _, _, w in updates] == [2.0, 5.0, 9.0]
        close(run.globals[rnd], weighted_mean(updates))
    # each round moves the model by the weighted mean step: (2*.01 + 5*.02 + 9*.03) / 16
    step = (2 * 0.01 + 5 * 0.02 + 9 * 0.03) / 16
    close(run.final, {k: v + 3 * step for k, v in student().items()}, rtol=1e-5)
    assert run.result.train_metrics_clientapp[3]["train-loss"] == pytest.approx(1.0)
    assert run.result.evaluate_metrics_clientapp[3]["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- 2. FedProx
def test_fedprox_mu_reaches_the_clients_through_the_config_allow_list() -> None:
    s = mekd(FedProx(proximal_mu=0.1), client_config_keys={"lr"})
    run = Run(s, grid_of(3), rounds=2, config={"lr": 0.1, "teacher-arch": "resnet56", "cache-dir": "/srv/secret"})
    train = run.grid.sent_of(P.TRAIN)
    assert len(train) == 6
    for m in train:
        assert dict(m.content[P.CONFIG]) == {
            "lr": 0.1,
            "proximal-mu": 0.1,
            P.SERVER_ROUND: m.content[P.CONFIG][P.SERVER_ROUND],
        }
    for m in run.grid.sent:  # the run's server-side settings reach no client, in no phase
        if P.CONFIG in m.content:
            assert not {"teacher-arch", "cache-dir"} & set(m.content[P.CONFIG].keys()), m.metadata.message_type
    assert all("proximal-mu" not in m.content[P.CONFIG] for m in run.grid.sent_of(P.EVALUATE))
    close(run.final, weighted_mean(run.grid.updates[2]))  # FedProx aggregates as FedAvg


def test_fedprox_mu_reaches_the_clients_when_the_run_config_also_names_it() -> None:
    s = mekd(FedProx(proximal_mu=0.1), client_config_keys={"lr"})
    run = Run(s, grid_of(3), rounds=1, config={"lr": 0.1, "proximal-mu": 0.5})
    assert [m.content[P.CONFIG].get("proximal-mu") for m in run.grid.sent_of(P.TRAIN)] == [0.1] * 3


# ---------------------------------------------------------------------------- 3. FedAdam
def test_fedadam_takes_a_server_side_adam_step_on_the_averaged_pseudo_gradient() -> None:
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    run = Run(mekd(FedAdam(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)), grid_of(3), rounds=3)
    assert run.s.failures.entries == []
    m = v = None
    for rnd in (1, 2, 3):
        current = {k: x.astype(np.float64) for k, x in run.globals[rnd - 1].items()}
        mean = weighted_mean(run.grid.updates[rnd])
        delta = {k: mean[k] - current[k] for k in current}  # the pseudo-gradient
        m = {k: (beta_1 * (m[k] if m else 0) + (1 - beta_1) * delta[k]) for k in delta}
        v = {k: (beta_2 * (v[k] if v else 0) + (1 - beta_2) * delta[k] ** 2) for k in delta}
        eta_norm = eta * np.sqrt(1 - beta_2 ** (rnd + 1)) / (1 - beta_1 ** (rnd + 1))
        expected = {k: current[k] + eta_norm * m[k] / (np.sqrt(v[k]) + tau) for k in current}
        close(run.globals[rnd], expected, rtol=1e-4, atol=1e-6)
    plain = Run(mekd(), grid_of(3), rounds=3)
    assert distance(run.final, plain.final) > 0.1


# ---------------------------------------------------------------------------- 4. FedTrimmedAvg
def test_trimmed_mean_keeps_the_model_near_the_honest_mean_despite_a_1000x_update() -> None:
    n, attacker = 5, 4
    run = Run(
        mekd(FedTrimmedAvg(beta=0.2, **ungated()), n=n, norm_outlier_factor=0), grid_of(n, attacker=attacker), rounds=2
    )
    assert run.s.clipped == []  # the robust rule alone
    for rnd in (1, 2):
        updates = run.grid.updates[rnd]
        honest_mean = weighted_mean([u for u in updates if u[0] != node_id(attacker)])
        step = distance(honest_mean, run.globals[rnd - 1])
        assert distance(run.globals[rnd], honest_mean) < 0.5 * step
        # coordinate-wise: drop the lowest and the highest of 5, average the other 3
        trimmed = {
            k: np.sort(np.stack([a[k] for _, a, _ in updates]).astype(np.float64), axis=0)[1:-1].mean(axis=0)
            for k in honest_mean
        }
        close(run.globals[rnd], trimmed, rtol=1e-5)
    poisoned = Run(mekd(FedAvg(**ungated()), n=n, norm_outlier_factor=0), grid_of(n, attacker=attacker), rounds=1)
    assert distance(poisoned.final, poisoned.globals[0]) > 100 * distance(run.globals[1], run.globals[0])


# ---------------------------------------------------------------------------- 5. server-side DP clipping
def test_dp_fixed_clipping_bounds_each_update_and_so_the_global_step() -> None:
    c = 0.1  # an honest update of client i has length 0.01 * (i + 1) * sqrt(51): 0.071, 0.143, 0.214
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0, clipping_norm=c, num_sampled_clients=3
    )
    run = Run(mekd(dp, norm_outlier_factor=0), grid_of(3), rounds=2)
    assert run.s.clipped == []
    for rnd in (1, 2):
        g = run.globals[rnd - 1]
        updates = run.grid.updates[rnd]
        assert max(distance(a, g) for _, a, _ in updates) > 2 * c  # clipping has work to do
        clipped = []
        for node, a, w in updates:
            factor = min(1.0, c / distance(a, g))
            clipped.append((node, {k: g[k] + factor * (a[k].astype(np.float64) - g[k]) for k in a}, w))
        close(run.globals[rnd], weighted_mean(clipped), rtol=1e-5)
        assert distance(run.globals[rnd], g) <= c * (1 + 1e-5)
        assert distance(run.globals[rnd], g) < 0.8 * distance(weighted_mean(updates), g)


def _dp_noise_run(noise_seed: int | None, seed: int = 0) -> Arrays:
    if noise_seed is not None:
        np.random.seed(noise_seed)
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=1.0, clipping_norm=0.1, num_sampled_clients=3
    )
    return Run(mekd(dp, seed=seed), grid_of(3), rounds=2).final


def test_dp_noise_comes_from_numpys_global_generator_not_from_the_mekd_seed() -> None:
    """What is true in Flower 1.42: the noise is `np.random.normal` (numpy's global generator). MEKD's seed
    seeds sampling only, so two runs with the same seed differ; seeding numpy makes them equal."""
    state = np.random.get_state()
    try:
        a, b = _dp_noise_run(None), _dp_noise_run(None)
        assert distance(a, b) > 1e-3, "DP noise repeated without seeding numpy"
        c, d = _dp_noise_run(7, seed=0), _dp_noise_run(7, seed=5)
        close(c, d, rtol=0, atol=0)  # the MEKD seed does not enter the noise
        e = _dp_noise_run(8)
        assert distance(c, e) > 1e-3
    finally:
        np.random.set_state(state)


# ---------------------------------------------------------------------------- 6. inner sampling
def _train_cohorts(seed: int, caller_seed: int) -> tuple[list[list[int]], list[list[int]]]:
    random.seed(caller_seed)
    before = random.getstate()
    run = Run(mekd(FedAvg(fraction_train=0.5), n=6, seed=seed), grid_of(6), rounds=3)
    assert random.getstate() == before, "MEKD.start changed the caller's global `random` state"
    cohorts = [[], [], []]
    evaluated = [[], [], []]
    for m in run.grid.sent_of(P.TRAIN):
        cohorts[int(m.content[P.CONFIG][P.SERVER_ROUND]) - 1].append(
            run.s.transport.partition_of[m.metadata.dst_node_id]
        )
    for m in run.grid.sent_of(P.EVALUATE):
        evaluated[int(m.content[P.CONFIG][P.SERVER_ROUND]) - 1].append(
            run.s.transport.partition_of[m.metadata.dst_node_id]
        )
    for rnd, cohort in enumerate(cohorts, start=1):  # and the round aggregated exactly that cohort
        assert sorted(n for n, _, _ in run.grid.updates[rnd]) == sorted(node_id(p) for p in cohort)
    return [sorted(c) for c in cohorts], [sorted(c) for c in evaluated]


def test_a_wrapped_fraction_train_samples_reproducibly_and_leaves_the_callers_random_alone() -> None:
    first, evaluated = _train_cohorts(seed=3, caller_seed=1)
    again, evaluated_again = _train_cohorts(seed=3, caller_seed=2)  # whatever the caller's `random` holds
    assert first == again and evaluated == evaluated_again
    assert all(len(c) == 3 for c in first) and all(len(c) == 6 for c in evaluated)
    others = [_train_cohorts(seed=s, caller_seed=1)[0] for s in (4, 5)]
    assert len({tuple(map(tuple, c)) for c in (first, *others)}) > 1, "the MEKD seed does not change the draw"
    assert len({tuple(c) for c in first + others[0] + others[1]}) > 1, "every round trained the same clients"


# ---------------------------------------------------------------------------- 7. minimums above the cohort
def _start_in_thread(s: MEKD, grid: RecordingGrid, limit: float = 30.0) -> BaseException | None:
    outcome: dict = {}

    def target() -> None:
        try:
            Run(s, grid, rounds=2)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    t0 = time.time()
    thread.start()
    thread.join(timeout=limit)
    assert not thread.is_alive(), f"MEKD.start still waiting after {limit:.0f}s (Flower's sample_nodes?)"
    assert time.time() - t0 < 10
    return outcome.get("error")


@pytest.mark.parametrize(
    "inner, named",
    [
        (lambda: FedAvg(min_train_nodes=10), "FedAvg(min_train_nodes=10)"),
        (lambda: FedAvg(min_available_nodes=4), "FedAvg(min_available_nodes=4)"),
        (lambda: FedAvg(min_evaluate_nodes=5), "FedAvg(min_evaluate_nodes=5)"),
        (
            lambda: DifferentialPrivacyServerSideFixedClipping(
                FedAvg(min_train_nodes=10), noise_multiplier=0, clipping_norm=1.0, num_sampled_clients=3
            ),
            "FedAvg(min_train_nodes=10)",
        ),
    ],
    ids=["min-train", "min-available", "min-evaluate", "inside-dp"],
)
def test_a_wrapped_minimum_above_the_cohort_fails_promptly_in_one_line(inner, named: str) -> None:
    grid = grid_of(3)
    error = _start_in_thread(mekd(inner()), grid)
    assert isinstance(error, RunFailed), repr(error)
    assert named in str(error) and "\n" not in str(error)
    assert "the 3 eligible" in str(error)
    assert grid.sent_of(P.ANSWERS), "the check runs in the rounds, after the query phase"


class Stray(FedAvg):
    """A wrapped strategy that addresses a node MEKD did not sample."""

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return [
            *messages,
            Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=999, message_type="train"),
        ]


def test_a_wrapped_strategy_addressing_a_node_outside_the_cohort_is_refused() -> None:
    grid = grid_of(3)
    s = mekd(Stray(**ungated()), n=3)
    with pytest.raises(RuntimeError, match="addressed node 999, outside the cohort"):
        Run(s, grid, rounds=1)
    assert not grid.sent_of(P.TRAIN), "nothing of the round was sent"


# ---------------------------------------------------------------------------- 8. Krum, MultiKrum
@pytest.mark.parametrize("multi", [False, True], ids=["krum", "multikrum"])
def test_krum_picks_honest_updates_and_leaves_out_the_attacker(multi: bool) -> None:
    n, attacker = 5, 2
    inner = (
        MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **ungated())
        if multi
        else Krum(num_malicious_nodes=1, **ungated())
    )
    run = Run(mekd(inner, n=n, norm_outlier_factor=0), grid_of(n, attacker=attacker), rounds=2)
    for rnd in (1, 2):
        updates = {node: (node, a, w) for node, a, w in run.grid.updates[rnd]}
        honest_nodes = [node_id(i) for i in range(n) if i != attacker]
        if multi:  # the 3 most central of 4 honest updates around offsets .01 .02 .04 .05: all but one end
            candidates = [[updates[x] for x in honest_nodes if x != left_out] for left_out in honest_nodes]
        else:
            candidates = [[updates[x]] for x in honest_nodes]
        assert any(
            np.allclose(run.globals[rnd]["weight"], weighted_mean(c)["weight"], rtol=1e-5, atol=1e-7)
            and np.allclose(run.globals[rnd]["bias"], weighted_mean(c)["bias"], rtol=1e-5, atol=1e-7)
            for c in candidates
        ), f"round {rnd}: not an honest selection"
        assert distance(run.globals[rnd], run.globals[rnd - 1]) < 0.01 * 6 * np.sqrt(51)


@pytest.mark.parametrize(
    "inner, n",
    [
        (lambda: FedMedian(**ungated()), 5),
        (lambda: Bulyan(num_malicious_nodes=1, **ungated()), 7),  # Bulyan needs n >= 4f + 3
    ],
    ids=["median", "bulyan"],
)
def test_median_and_bulyan_stay_within_the_honest_updates(inner, n: int) -> None:
    attacker = n - 1
    run = Run(mekd(inner(), n=n, norm_outlier_factor=0), grid_of(n, attacker=attacker), rounds=2)
    for rnd in (1, 2):
        honest_updates = [a for node, a, _ in run.grid.updates[rnd] if node != node_id(attacker)]
        for k, v in run.globals[rnd].items():
            stack = np.stack([a[k] for a in honest_updates])
            assert (stack.min(axis=0) - 1e-6 <= v).all() and (v <= stack.max(axis=0) + 1e-6).all(), (rnd, k)
    if n == 5:  # the coordinate-wise median of offsets .01 .02 .03 .04 and the attacker's 50
        close(run.globals[1], {k: v + 0.03 for k, v in student().items()}, rtol=1e-5)


# ---------------------------------------------------------------------------- the weight cap and the inner key
def claiming(key: str, value: float, inner: Handler) -> Handler:
    """A client that also reports `key` = value in its train and evaluate metrics."""

    def handle(m: Message) -> Message:
        r = inner(m)
        if m.metadata.message_type not in (P.TRAIN, P.EVALUATE):
            return r
        records = {name: r.content[name] for name in r.content.keys()}
        records[P.METRICS] = MetricRecord({**dict(r.content[P.METRICS]), key: value})
        return Message(RecordDict(records), reply_to=m)

    return handle


def test_an_inner_weight_key_cannot_bypass_the_servers_weight_cap() -> None:
    grid = grid_of(3)
    for i, node in enumerate(sorted(grid.nodes)):
        grid.nodes[node] = claiming("batches", 1e6 if i == 2 else 1.0, grid.nodes[node])
    try:
        run = Run(mekd(FedAvg(weighted_by_key="batches")), grid, rounds=1)
    except (ValueError, RunFailed) as exc:  # refusing the mismatch, in one line, is a fix too
        assert "weighted_by_key" in str(exc) or "batches" in str(exc)
        return
    capped = weighted_mean(grid.updates[1])  # weights 2, 5, 9: what the server's caps allow
    assert distance(run.final, capped) < 0.1 * distance(capped, run.globals[0])
