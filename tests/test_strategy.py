"""`strategies.MEKD` without a Flower runtime: update validation, weighted averaging, seeded sampling."""

import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from strategies import MEKD

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages read the run/node/task id of the current process; give them one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def refuse_all(key: str, images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the oracle must not be called by aggregation")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def state(seed: int, batches: int) -> dict[str, np.ndarray]:
    """A client's trained state dict as numpy arrays (float params and BN stats differ per seed)."""
    g = np.random.default_rng(seed)
    sd = {k: v.numpy().copy() for k, v in tiny_model().state_dict().items()}
    for k, v in sd.items():
        if v.dtype.kind == "f":
            sd[k] = g.normal(size=v.shape).astype(v.dtype)
    sd["1.running_var"] = np.abs(sd["1.running_var"]) + 0.1
    sd["1.num_batches_tracked"] = np.array(batches, dtype=np.int64)
    return sd


def reply(node: int, arrays: dict[str, np.ndarray] | None, metrics: dict | None,
          extra_arrays: dict[str, np.ndarray] | None = None) -> Message:
    """A client's reply to a `train` instruction sent to `node`."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if extra_arrays is not None:
        content["more"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in extra_arrays.items()})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


NODES = {101: 0, 202: 1, 303: 2, 404: 3}  # node id -> partition id


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def strategy(said: list[str]) -> MEKD:
    s = MEKD(refuse_all, log_fn=said.append)
    s._global = ArrayRecord(tiny_model().state_dict())
    s.partition_of = dict(NODES)
    return s


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float], key: str) -> np.ndarray:
    total = sum(weights)
    return sum(s[key].astype(np.float64) * (w / total) for s, w in zip(states, weights))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


# ---------------------------------------------------------------------------- message plumbing
def test_reply_comes_from_the_instructed_node() -> None:
    msg = reply(303, state(0, 1), {"num-examples": 5})
    assert msg.metadata.src_node_id == 303
    assert not msg.has_error()


# ---------------------------------------------------------------------------- averaging
def test_two_good_updates_are_weighted_by_num_examples(strategy: MEKD) -> None:
    a, b = state(1, batches=3), state(2, batches=5)
    arrays, metrics = strategy.aggregate_train(1, [
        reply(101, a, {"num-examples": 10, "train-loss": 1.0}),
        reply(202, b, {"num-examples": 30, "train-loss": 3.0}),
    ])
    assert strategy.rejected == []
    got = as_numpy(arrays)
    assert set(got) == set(strategy._global.keys())
    for key, ref in as_numpy(strategy._global).items():
        assert got[key].dtype == ref.dtype, key
        assert got[key].shape == ref.shape, key
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(got[key], weighted_mean([a, b], [10, 30], key), rtol=1e-6, atol=1e-7)
    # A 1:3 weighting, not 1:1: the weighted mean differs from the plain mean.
    assert not np.allclose(got["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)
    # The integer buffer stays an int64 between the clients' counts.
    nbt = got["1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and 3 <= int(nbt) <= 5
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


def test_average_does_not_depend_on_reply_order(strategy: MEKD) -> None:
    states = [state(s, s) for s in range(3)]
    replies = [reply(n, st, {"num-examples": w}) for n, st, w in zip((101, 202, 303), states, (7, 11, 13))]
    first, _ = strategy.aggregate_train(1, replies)
    second, _ = strategy.aggregate_train(1, [replies[2], replies[0], replies[1]])
    for key in strategy._global.keys():
        assert np.array_equal(first[key].numpy(), second[key].numpy()), key


# ---------------------------------------------------------------------------- poisoned updates
def _poison(kind: str) -> Message:
    sd = state(9, 4)
    metrics: dict | None = {"num-examples": 20}
    extra = None
    if kind == "nan":
        sd["0.weight"][0, 1] = np.nan
    elif kind == "inf":
        sd["1.running_var"][1] = np.inf
    elif kind == "missing-key":
        del sd["1.running_mean"]
    elif kind == "extra-key":
        sd["backdoor"] = np.zeros(3, dtype=np.float32)
    elif kind == "wrong-shape":
        sd["0.weight"] = np.zeros((3, 2), dtype=np.float32)
    elif kind == "num-examples-0":
        metrics = {"num-examples": 0}
    elif kind == "num-examples-negative":
        metrics = {"num-examples": -5}
    elif kind == "num-examples-nan":
        metrics = {"num-examples": float("nan")}
    elif kind == "num-examples-missing":
        metrics = {"train-loss": 0.1}
    elif kind == "no-metrics":
        metrics = None
    elif kind == "two-arrayrecords":
        extra = state(10, 1)
    return reply(303, sd, metrics, extra)


POISON_REASONS = {
    "nan": r"'0\.weight' contains NaN or inf",
    "inf": r"'1\.running_var' contains NaN or inf",
    "missing-key": r"keys differ from the global model \(missing \['1\.running_mean'\], unexpected \[\]\)",
    "extra-key": r"keys differ from the global model \(missing \[\], unexpected \['backdoor'\]\)",
    "wrong-shape": r"'0\.weight' has shape \(3, 2\), expected \(2, 3\)",
    "num-examples-0": r"'num-examples' is 0, not a positive number",
    "num-examples-negative": r"'num-examples' is -5, not a positive number",
    "num-examples-nan": r"'num-examples' is nan, not a positive number",
    "num-examples-missing": r"'num-examples' is None, not a positive number",
    "no-metrics": r"expected 1 MetricRecord, got 0",
    "two-arrayrecords": r"expected 1 ArrayRecord, got 2",
}


@pytest.mark.parametrize("kind", sorted(POISON_REASONS))
def test_poisoned_update_rejected_and_not_averaged(strategy: MEKD, said: list[str], kind: str) -> None:
    a, b = state(1, 3), state(2, 5)
    good = [reply(101, a, {"num-examples": 10}), reply(202, b, {"num-examples": 30})]
    clean, _ = strategy.aggregate_train(1, list(good))
    assert strategy.rejected == []

    arrays, _ = strategy.aggregate_train(2, [good[0], _poison(kind), good[1]])
    assert len(strategy.rejected) == 1
    entry = strategy.rejected[0]
    assert entry["round"] == 2 and entry["node"] == 303 and entry["partition"] == NODES[303]
    assert re.search(POISON_REASONS[kind], entry["reason"]), entry["reason"]
    assert any("rejected update of client 2" in line and entry["reason"] in line for line in said)
    # The result is exactly the average of the good clients.
    for key in strategy._global.keys():
        assert np.array_equal(arrays[key].numpy(), clean[key].numpy()), key


def test_client_error_reply_rejected(strategy: MEKD) -> None:
    instruction = Message(content=RecordDict(), dst_node_id=404, message_type="train")
    failed = Message(Error(code=1, reason="out of memory"), reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [reply(101, state(1, 1), {"num-examples": 4}), failed])
    assert arrays is not None
    assert strategy.rejected == [{"round": 1, "node": 404, "partition": 3, "reason": "client error: out of memory"}]


def test_all_poisoned_gives_nothing(strategy: MEKD) -> None:
    result = strategy.aggregate_train(3, [_poison("nan"), _poison("num-examples-0"), _poison("extra-key")])
    assert result == (None, None)
    assert len(strategy.rejected) == 3
    assert all(e["reason"] for e in strategy.rejected)
    assert strategy._round_rejections == strategy.rejected


def test_empty_round_gives_nothing(strategy: MEKD) -> None:
    assert strategy.aggregate_train(1, []) == (None, None)


# ---------------------------------------------------------------------------- sampling
def sampler(seed: int, n: int = 10) -> MEKD:
    s = MEKD(refuse_all, seed=seed, log_fn=lambda _: None)
    # Node ids in an order unrelated to the partition ids.
    nodes = [(7919 * (i + 3)) % 10_007 for i in range(n)]
    s.partition_of = {node: n - 1 - i for i, node in enumerate(nodes)}
    s.answered = set(nodes)
    return s


def test_sample_is_deterministic_for_seed_and_round() -> None:
    a, b = sampler(seed=5), sampler(seed=5)
    for rnd in range(1, 6):
        assert a._sample(rnd, 0.5, 2, 0) == b._sample(rnd, 0.5, 2, 0)
    draws = {tuple(a._sample(rnd, 0.5, 2, 0)) for rnd in range(1, 6)}
    assert len(draws) > 1, "every round drew the same clients"
    seeds = {tuple(sampler(seed)._sample(1, 0.5, 2, 0)) for seed in range(5)}
    assert len(seeds) > 1, "the seed does not change the draw"


def test_sample_ordered_by_partition_and_only_answered_nodes() -> None:
    s = sampler(seed=1)
    chosen = s._sample(2, 0.5, 2, 0)
    assert len(chosen) == 5
    assert len(set(chosen)) == 5
    assert set(chosen) <= s.answered
    pids = [s.partition_of[n] for n in chosen]
    assert pids == sorted(pids)
    everyone = s._sample(2, 1.0, 2, 0)
    assert [s.partition_of[n] for n in everyone] == list(range(10))


@pytest.mark.parametrize("fraction, minimum, expected", [(0.5, 2, 5), (0.3, 2, 3), (0.1, 2, 2), (0.05, 0, 1),
                                                         (1.0, 2, 10), (0.5, 20, 10)])
def test_sample_size_respects_fraction_and_minimum(fraction: float, minimum: int, expected: int) -> None:
    assert len(sampler(seed=0)._sample(1, fraction, minimum, 0)) == expected


def test_train_sampling_uses_fraction_train() -> None:
    s = sampler(seed=3)
    s.fraction_train = 0.5
    s.min_train_nodes = 2
    model = ArrayRecord(tiny_model().state_dict())
    messages = list(s.configure_train(4, model, ConfigRecord(), grid=None))
    assert [m.metadata.dst_node_id for m in messages] == s._sample(4, 0.5, 2, 0)
    assert all(m.metadata.message_type == "train" for m in messages)
    assert messages[0].content["config"]["server-round"] == 4
    assert s._global is model
