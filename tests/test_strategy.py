"""`strategies.MEKD` without a Flower runtime: checked, bounded, weighted aggregation; seeded sampling.

Every update here is the reply of a hostile or broken client unless it is called good. The rules:
a refused update leaves exactly the average of the good ones; a neutralised one (scaled, over-weighted)
is accepted but cannot move the model further than the norm bound; no attack, alone or combined,
makes the model non-finite or gets an honest update rejected.
"""

import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from torch import nn

from strategies import MEKD, RunFailed
from strategies import protocol as P
from strategies.updates import distance

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("task_identity")


def refuse_all(key: str, images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the oracle must not be called by aggregation")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


GLOBAL = {k: v.numpy().copy() for k, v in tiny_model().state_dict().items()}


def state(seed: int, batches: int, spread: float = 0.1) -> dict[str, np.ndarray]:
    """A client's trained state dict: near the global model (an honest local update)."""
    g = np.random.default_rng(seed)
    sd = {k: v.copy() for k, v in GLOBAL.items()}
    for k, v in sd.items():
        if v.dtype.kind == "f":
            sd[k] = (v + spread * g.normal(size=v.shape)).astype(v.dtype)
    sd["1.running_var"] = np.abs(sd["1.running_var"]) + 0.1
    sd["1.num_batches_tracked"] = np.array(batches, dtype=np.int64)
    return sd


def reply(
    node: int,
    arrays: dict | None,
    metrics: dict | None,
    extra_arrays: dict | None = None,
    more_metrics: dict | None = None,
) -> Message:
    """A client's reply to a `train` instruction sent to `node`."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if extra_arrays is not None:
        content["more"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in extra_arrays.items()})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if more_metrics is not None:
        content["metrics2"] = MetricRecord(more_metrics)
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


NODES = {101: 0, 202: 1, 303: 2, 404: 3}  # node id -> partition label (the server's own)
CAP = 50  # answers each node holds: the most a reply may weigh


@pytest.fixture
def said() -> list[str]:
    return []


def make_strategy(said: list[str] | None = None, **kwargs) -> MEKD:
    s = MEKD(refuse_all, log_fn=(said.append if said is not None else lambda _: None), **kwargs)
    s._global = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    s.transport.partition_of = dict(NODES)
    s.ledger.example_cap = {n: CAP for n in NODES}
    return s


@pytest.fixture
def strategy(said: list[str]) -> MEKD:
    return make_strategy(said)


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float], key: str) -> np.ndarray:
    total = sum(weights)
    return sum(s[key].astype(np.float64) * (w / total) for s, w in zip(states, weights))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def finite(record: ArrayRecord) -> bool:
    return all(np.isfinite(v).all() for v in as_numpy(record).values() if v.dtype.kind == "f")


# ---------------------------------------------------------------------------- message plumbing
def test_reply_comes_from_the_instructed_node() -> None:
    msg = reply(303, state(0, 1), {"num-examples": 5})
    assert msg.metadata.src_node_id == 303
    assert not msg.has_error()


# ---------------------------------------------------------------------------- averaging
def test_two_good_updates_are_weighted_by_num_examples(strategy: MEKD) -> None:
    a, b = state(1, batches=3), state(2, batches=5)
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            reply(101, a, {"num-examples": 10, "train-loss": 1.0}),
            reply(202, b, {"num-examples": 30, "train-loss": 3.0}),
        ],
    )
    assert strategy.rejected == [] and strategy.clipped == []
    got = as_numpy(arrays)
    assert set(got) == set(GLOBAL)
    for key, ref in GLOBAL.items():
        assert got[key].dtype == ref.dtype, key
        assert got[key].shape == ref.shape, key
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(got[key], weighted_mean([a, b], [10, 30], key), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)
    nbt = got["1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and 3 <= int(nbt) <= 5
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


def test_average_does_not_depend_on_reply_order(strategy: MEKD) -> None:
    states = [state(s, s) for s in range(3)]
    replies = [reply(n, st, {"num-examples": w}) for n, st, w in zip((101, 202, 303), states, (7, 11, 13))]
    first, _ = strategy.aggregate_train(1, replies)
    replies = [reply(n, st, {"num-examples": w}) for n, st, w in zip((101, 202, 303), states, (7, 11, 13))]
    second, _ = strategy.aggregate_train(1, [replies[2], replies[0], replies[1]])
    for key in GLOBAL:
        assert np.array_equal(first[key].numpy(), second[key].numpy()), key


# ---------------------------------------------------------------------------- refused updates
def _refused(kind: str) -> Message:
    sd = state(9, 4)
    metrics: dict | None = {"num-examples": 20}
    extra = more = None
    arrays: dict | None = sd
    f64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in sd.items()}
    if kind == "nan":
        sd["0.weight"][0, 1] = np.nan
    elif kind == "inf":
        sd["1.running_var"][1] = np.inf
    elif kind == "minus-inf":
        sd["0.bias"][0] = -np.inf
    elif kind == "float64-1e40":  # finite in float64, inf in the global float32
        f64["0.weight"][0, 0] = 1e40
        arrays = f64
    elif kind == "float64-1e300":
        f64["1.weight"][:] = 1e300
        arrays = f64
    elif kind == "float64-nan":
        f64["1.bias"][0] = np.nan
        arrays = f64
    elif kind == "float16-inf":
        sd["0.bias"] = np.array([np.inf, 0.0], dtype=np.float16)
    elif kind == "missing-key":
        del sd["1.running_mean"]
    elif kind == "extra-key":
        sd["backdoor"] = np.zeros(3, dtype=np.float32)
    elif kind == "renamed-key":
        sd["0.weights"] = sd.pop("0.weight")
    elif kind == "wrong-shape":
        sd["0.weight"] = np.zeros((3, 2), dtype=np.float32)
    elif kind == "flattened":
        sd["0.weight"] = sd["0.weight"].ravel()
    elif kind == "scalar-for-vector":
        sd["0.bias"] = np.array(0.5, dtype=np.float32)
    elif kind == "int-weights":
        sd["0.weight"] = np.ones((2, 3), dtype=np.int32)
    elif kind == "int64-weights":
        sd["0.weight"] = np.ones((2, 3), dtype=np.int64)
    elif kind == "bool-weights":
        sd["0.weight"] = np.ones((2, 3), dtype=bool)
    elif kind == "bool-bias":
        sd["0.bias"] = np.array([True, False])
    elif kind == "float-counter":
        sd["1.num_batches_tracked"] = np.array(4.5, dtype=np.float64)
    elif kind == "negative-counter":
        sd["1.num_batches_tracked"] = np.array(-3, dtype=np.int64)
    elif kind == "huge-unsigned-counter":
        sd["1.num_batches_tracked"] = np.array(2**64 - 1, dtype=np.uint64)
    elif kind == "negative-running-var":
        sd["1.running_var"] = np.array([-1.0, 0.5], dtype=np.float32)
    elif kind == "complex-weights":
        sd["0.weight"] = np.ones((2, 3), dtype=np.complex64)
    elif kind == "num-examples-0":
        metrics = {"num-examples": 0}
    elif kind == "num-examples-negative":
        metrics = {"num-examples": -5}
    elif kind == "num-examples-nan":
        metrics = {"num-examples": float("nan")}
    elif kind == "num-examples-inf":
        metrics = {"num-examples": float("inf")}
    elif kind == "num-examples-minus-inf":
        metrics = {"num-examples": float("-inf")}
    elif kind == "num-examples-missing":
        metrics = {"train-loss": 0.1}
    elif kind == "num-examples-list":
        metrics = {"num-examples": [10, 10]}
    elif kind == "num-examples-minus-zero":
        metrics = {"num-examples": -0.0}
    elif kind == "list-metric":  # refused, not dropped: dropping it would drop the round's train-loss
        metrics = {"num-examples": 20, "train-loss": [1.0, 2.0]}
    elif kind == "nan-metric":
        metrics = {"num-examples": 20, "train-loss": float("nan")}
    elif kind == "negative-loss":
        metrics = {"num-examples": 20, "train-loss": -1e9}
    elif kind == "accuracy-55":
        metrics = {"num-examples": 20, "train-accuracy": 55.0}
    elif kind == "too-many-metrics":
        metrics = {"num-examples": 20, **{f"m{i}": 1.0 for i in range(P.MAX_METRICS)}}
    elif kind == "huge-counter":  # a valid int64 that float64 averaging turns into -2**63
        sd["1.num_batches_tracked"] = np.array(2**63 - 1, dtype=np.int64)
    elif kind == "counter-jump":
        sd["1.num_batches_tracked"] = np.array(2**40, dtype=np.int64)
    elif kind == "no-metrics":
        metrics = None
    elif kind == "two-metricrecords":
        more = {"num-examples": 10}
    elif kind == "no-arrays":
        arrays = None
    elif kind == "empty-arrays":
        arrays = {}
    elif kind == "two-arrayrecords":
        extra = state(10, 1)
    else:
        raise KeyError(kind)
    return reply(303, arrays, metrics, extra, more)


REFUSED = {
    "nan": r"'0\.weight' contains NaN or inf",
    "inf": r"'1\.running_var' contains NaN or inf",
    "minus-inf": r"'0\.bias' contains NaN or inf",
    "float64-1e40": r"'0\.weight' contains NaN or inf \(in float32\)",
    "float64-1e300": r"'1\.weight' contains NaN or inf",
    "float64-nan": r"'1\.bias' contains NaN or inf",
    "float16-inf": r"'0\.bias' contains NaN or inf",
    "missing-key": r"keys differ from the global model \(missing \['1\.running_mean'\], unexpected \[\]\)",
    "extra-key": r"keys differ from the global model \(missing \[\], unexpected \['backdoor'\]\)",
    "renamed-key": r"keys differ from the global model",
    "wrong-shape": r"'0\.weight' has shape \(3, 2\), expected \(2, 3\)",
    "flattened": r"'0\.weight' has shape \(6,\), expected \(2, 3\)",
    "scalar-for-vector": r"'0\.bias' has shape \(\), expected \(2,\)",
    "int-weights": r"'0\.weight' has dtype int32, expected float32",
    "int64-weights": r"'0\.weight' has dtype int64, expected float32",
    "bool-weights": r"'0\.weight' has dtype bool, expected float32",
    "bool-bias": r"'0\.bias' has dtype bool",
    "float-counter": r"'1\.num_batches_tracked' has dtype float64, expected int64",
    "negative-counter": r"'1\.num_batches_tracked' is negative",
    "huge-unsigned-counter": r"'1\.num_batches_tracked' does not fit int64",
    "negative-running-var": r"'1\.running_var' is negative",
    "complex-weights": r"'0\.weight' has dtype complex64",
    "num-examples-0": r"'num-examples' is 0, not a positive number",
    "num-examples-negative": r"'num-examples' is -5, not a positive number",
    "num-examples-nan": r"'num-examples' is nan, not a positive number",
    "num-examples-inf": r"'num-examples' is inf, not a positive number",
    "num-examples-minus-inf": r"'num-examples' is -inf, not a positive number",
    "num-examples-missing": r"'num-examples' is None, not a positive number",
    "num-examples-list": r"'num-examples' is \[10, 10\], not a positive number",
    "num-examples-minus-zero": r"'num-examples' is -0\.0, not a positive number",
    "no-metrics": r"expected 1 MetricRecord, got 0",
    "list-metric": r"metric 'train-loss' is \[1\.0, 2\.0\], not a number",
    "nan-metric": r"metric 'train-loss' is nan, not finite",
    "negative-loss": r"metric 'train-loss'=-1000000000\.0 is outside \[0, inf\]",
    "accuracy-55": r"metric 'train-accuracy'=55\.0 is outside \[0, 1\]",
    "too-many-metrics": r"65 metrics, more than 64",
    "huge-counter": r"'1\.num_batches_tracked' is beyond \+-2\*\*52",
    "counter-jump": r"'1\.num_batches_tracked' moved by 1099511627776 from the global model",
    "two-metricrecords": r"expected 1 MetricRecord, got 2",
    "no-arrays": r"expected 1 ArrayRecord, got 0",
    "empty-arrays": r"keys differ from the global model",
    "two-arrayrecords": r"expected 1 ArrayRecord, got 2",
}


def good_pair() -> list[Message]:
    return [reply(101, state(1, 3), {"num-examples": 10}), reply(202, state(2, 5), {"num-examples": 30})]


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_update_leaves_exactly_the_good_average(said: list[str], kind: str) -> None:
    clean, _ = make_strategy().aggregate_train(1, good_pair())
    strategy = make_strategy(said)
    good = good_pair()
    arrays, _ = strategy.aggregate_train(2, [good[0], _refused(kind), good[1]])
    assert len(strategy.rejected) == 1
    entry = strategy.rejected[0]
    assert entry["round"] == 2 and entry["node"] == 303 and entry["partition"] == NODES[303]
    assert re.search(REFUSED[kind], entry["reason"]), entry["reason"]
    assert any("client 2" in line and entry["reason"] in line for line in said)
    assert strategy.failures.entries[-1]["phase"] == "train" and strategy.failures.entries[-1]["node"] == 303
    for key in GLOBAL:
        assert np.array_equal(arrays[key].numpy(), clean[key].numpy()), key


# ---------------------------------------------------------------------------- neutralised updates
def _scaled(factor: float) -> dict[str, np.ndarray]:
    sd = state(9, 4)
    return {
        k: (GLOBAL[k] + factor * (v - GLOBAL[k])).astype(v.dtype)
        if v.dtype.kind == "f" and "running_var" not in k
        else v
        for k, v in sd.items()
    }


NEUTRALISED = {
    "scaled-x1000": lambda: reply(303, _scaled(1000), {"num-examples": 20}),
    "scaled-x-10": lambda: reply(303, _scaled(-10), {"num-examples": 20}),
    "scaled-x1e6": lambda: reply(303, _scaled(1e6), {"num-examples": 20}),
    "float32-1e30": lambda: reply(
        303, {**state(9, 4), "0.weight": np.full((2, 3), 1e30, np.float32)}, {"num-examples": 20}
    ),
    "float64-large-but-fits": lambda: reply(
        303,
        {
            **{k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in state(9, 4).items()},
            "1.weight": np.full(2, 1e20),
        },
        {"num-examples": 20},
    ),
    "huge-running-var": lambda: reply(
        303, {**state(9, 4), "1.running_var": np.full(2, 1e35, np.float32)}, {"num-examples": 20}
    ),
    "num-examples-1e12": lambda: reply(303, _scaled(3), {"num-examples": 1e12}),
    "num-examples-1.7e308": lambda: reply(303, _scaled(3), {"num-examples": 1.7e308}),
    "num-examples-float": lambda: reply(303, state(9, 4), {"num-examples": 12.5}),
    "extra-metric": lambda: reply(303, state(9, 4), {"num-examples": 20, "surprise": 1.0}),
    "fake-partition-id": lambda: reply(303, state(9, 4), {"num-examples": 20, "partition-id": 0}),
    "nan-partition-id": lambda: reply(303, state(9, 4), {"num-examples": 20, "partition-id": float("nan")}),
    "int-counter-as-int32": lambda: reply(
        303, {**state(9, 4), "1.num_batches_tracked": np.array(7, np.int32)}, {"num-examples": 20}
    ),
}


@pytest.mark.parametrize("kind", sorted(NEUTRALISED))
def test_neutralised_update_cannot_move_the_model_far(kind: str) -> None:
    strategy = make_strategy()
    honest = [
        reply(101, state(1, 3), {"num-examples": 10, "train-loss": 1.0}),
        reply(202, state(2, 5), {"num-examples": 30, "train-loss": 2.0}),
        reply(404, state(3, 5), {"num-examples": 20, "train-loss": 3.0}),
    ]
    honest_lengths = [distance(state(s, 1), GLOBAL) for s in (1, 2, 3)]
    arrays, metrics = strategy.aggregate_train(1, [*honest, NEUTRALISED[kind]()])
    assert strategy.rejected == [], strategy.rejected  # accepted, but made harmless
    assert arrays is not None and finite(arrays)
    # No single update may count for more than the outlier factor times the honest median length.
    bound = strategy.norm_outlier_factor * sorted(honest_lengths + [0])[1] * 1.01
    moved = distance(as_numpy(arrays), GLOBAL)
    assert moved <= bound, (moved, bound)
    assert set(metrics) <= {"train-loss", "num-examples"}
    for value in metrics.values():
        assert math.isfinite(value)


def test_weights_are_capped_at_the_answers_the_server_gave() -> None:
    strategy = make_strategy()
    a, b = state(1, 3), state(2, 5)
    arrays, _ = strategy.aggregate_train(
        1, [reply(101, a, {"num-examples": CAP}), reply(202, b, {"num-examples": 1e12})]
    )
    np.testing.assert_allclose(arrays["0.weight"].numpy(), weighted_mean([a, b], [CAP, CAP], "0.weight"), rtol=1e-5)


def test_two_overflowing_weights_do_not_zero_the_average() -> None:
    strategy = make_strategy()
    a, b = state(1, 3), state(2, 5)
    arrays, _ = strategy.aggregate_train(
        1, [reply(101, a, {"num-examples": 1.7e308}), reply(202, b, {"num-examples": 1.7e308})]
    )
    np.testing.assert_allclose(arrays["0.weight"].numpy(), (a["0.weight"] + b["0.weight"]) / 2, rtol=1e-5)


def test_float64_attack_cannot_poison_the_next_round() -> None:
    """The landed bug: a float64 1e40 passed, made the average inf, and the honest were rejected next."""
    strategy = make_strategy()
    first, _ = strategy.aggregate_train(1, [*good_pair(), _refused("float64-1e40")])
    assert finite(first)
    strategy._global = first
    second, _ = strategy.aggregate_train(2, good_pair())
    assert [r["node"] for r in strategy.rejected] == [303]
    assert second is not None and finite(second)


def test_every_attack_at_once_leaves_a_finite_model_and_the_honest_accepted() -> None:
    strategy = make_strategy()
    attackers = [_refused(k) for k in sorted(REFUSED)] + [make() for make in NEUTRALISED.values()]
    for i, msg in enumerate(attackers):  # every attacker a node of its own
        node = 1000 + i
        # metadata is read-only: rebuild the reply as if it came from its own node
        attackers[i] = Message(
            content=msg.content, reply_to=Message(content=RecordDict(), dst_node_id=node, message_type="train")
        )
        strategy.transport.partition_of[node] = 10 + i
        strategy.ledger.example_cap[node] = CAP
    honest = [reply(101, state(1, 3), {"num-examples": 10}), reply(202, state(2, 5), {"num-examples": 30})]
    for rnd in (1, 2):
        arrays, _ = strategy.aggregate_train(
            rnd,
            [*attackers, *honest]
            if rnd == 1
            else list(
                reversed(
                    [
                        *attackers,
                        *[reply(101, state(1, 3), {"num-examples": 10}), reply(202, state(2, 5), {"num-examples": 30})],
                    ]
                )
            ),
        )
        assert arrays is not None and finite(arrays)
        strategy._global = arrays
        honest = [reply(101, state(1, 3), {"num-examples": 10}), reply(202, state(2, 5), {"num-examples": 30})]
    assert not any(r["node"] in (101, 202) for r in strategy.rejected)


def test_client_error_reply_is_recorded_not_averaged(strategy: MEKD) -> None:
    from flwr.app import Error

    instruction = Message(content=RecordDict(), dst_node_id=404, message_type="train")
    failed = Message(Error(code=1, reason="out of memory"), reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [reply(101, state(1, 1), {"num-examples": 4}), failed])
    assert arrays is not None
    assert strategy.rejected == [{"round": 1, "node": 404, "partition": 3, "reason": "client error: out of memory"}]


def test_all_refused_gives_nothing(strategy: MEKD) -> None:
    result = strategy.aggregate_train(3, [_refused("nan"), _refused("num-examples-0"), _refused("extra-key")])
    assert result == (None, None)
    assert len(strategy.rejected) == 3
    assert [f["reason"] for f in strategy.failures.current] == [
        f"update rejected: {r['reason']}" for r in strategy.rejected
    ]


def test_empty_round_gives_nothing(strategy: MEKD) -> None:
    assert strategy.aggregate_train(1, []) == (None, None)


def test_absolute_norm_bound_scales_long_updates() -> None:
    strategy = make_strategy(max_update_norm=0.01, norm_outlier_factor=0)
    arrays, _ = strategy.aggregate_train(1, good_pair())
    assert len(strategy.clipped) == 2
    assert distance(as_numpy(arrays), GLOBAL) <= 0.01 * 1.001


# ---------------------------------------------------------------------------- Flower's aggregators inside
def _cohort(attacker_scale: float) -> list[Message]:
    honest = [reply(n, state(i, 3), {"num-examples": 20}) for i, n in enumerate((101, 202, 303, 404, 505, 606))]
    return [*honest, reply(707, _scaled(attacker_scale), {"num-examples": 20})]


@pytest.mark.parametrize(
    "inner",
    [
        lambda: FedTrimmedAvg(beta=0.2, min_train_nodes=1, min_available_nodes=1),
        lambda: FedMedian(min_train_nodes=1, min_available_nodes=1),
        lambda: Krum(num_malicious_nodes=1, min_train_nodes=1, min_available_nodes=1),
        lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4, min_train_nodes=1, min_available_nodes=1),
        lambda: Bulyan(num_malicious_nodes=1, min_train_nodes=1, min_available_nodes=1),
    ],
    ids=["trimmed-mean", "median", "krum", "multikrum", "bulyan"],
)
def test_robust_flower_aggregators_compose_and_resist_an_attacker(inner) -> None:
    strategy = make_strategy(strategy=inner(), norm_outlier_factor=0)  # the robust rule alone
    for n in (505, 606, 707):
        strategy.transport.partition_of[n] = n // 101
        strategy.ledger.example_cap[n] = CAP
    arrays, _ = strategy.aggregate_train(1, _cohort(attacker_scale=1000))
    plain = make_strategy(norm_outlier_factor=0)
    for n in (505, 606, 707):
        plain.transport.partition_of[n] = n // 101
        plain.ledger.example_cap[n] = CAP
    poisoned, _ = plain.aggregate_train(1, _cohort(attacker_scale=1000))
    assert finite(arrays)
    assert as_numpy(arrays)["1.num_batches_tracked"].dtype == np.int64
    assert distance(as_numpy(arrays), GLOBAL) < 0.1 * distance(as_numpy(poisoned), GLOBAL)


def test_dp_wrapper_composes_and_keeps_dtypes() -> None:
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_train_nodes=1, min_available_nodes=1),
        noise_multiplier=0.1,
        clipping_norm=0.05,
        num_sampled_clients=2,
    )
    strategy = make_strategy(strategy=dp)
    strategy.ledger.answered = set(NODES)
    messages = list(strategy.configure_train(1, strategy._global, ConfigRecord(), grid=None))
    assert {m.metadata.dst_node_id for m in messages} == set(NODES)
    arrays, _ = strategy.aggregate_train(1, good_pair())
    assert finite(arrays)
    assert as_numpy(arrays)["1.num_batches_tracked"].dtype == np.int64


# ---------------------------------------------------------------------------- outgoing messages
def test_round_messages_carry_only_allowed_settings_and_records() -> None:
    strategy = make_strategy(
        client_config_keys={"lr", "method"},
        node_records=lambda node, pid: {P.SHARD: ArrayRecord({P.PARTITION: Array(np.array(pid))})},
    )
    strategy.ledger.answered = set(NODES)
    config = ConfigRecord({"lr": 0.1, "method": "kd", "teacher-arch": "resnet56", "cache-dir": "/srv/secret"})
    for msg in strategy.configure_train(3, strategy._global, config, grid=None):
        assert set(msg.content.keys()) == {P.CONFIG, P.ARRAYS, P.SHARD}
        assert dict(msg.content[P.CONFIG]) == {"lr": 0.1, "method": "kd", "server-round": 3}
        assert int(msg.content[P.SHARD][P.PARTITION].numpy()) == NODES[msg.metadata.dst_node_id]


def test_a_record_outside_the_allow_list_is_never_sent() -> None:
    strategy = make_strategy()
    with pytest.raises(RuntimeError, match="refusing to send train"):
        strategy.transport.message(101, P.TRAIN, {P.ARRAYS: strategy._global, "fid-net": strategy._global})


# ---------------------------------------------------------------------------- sampling
def sampler(seed: int, n: int = 10) -> MEKD:
    s = MEKD(refuse_all, seed=seed, log_fn=lambda _: None)
    nodes = [(7919 * (i + 3)) % 10_007 for i in range(n)]  # node ids unrelated to the labels
    s.transport.partition_of = {node: n - 1 - i for i, node in enumerate(nodes)}
    s.ledger.answered = set(nodes)
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
    assert len(chosen) == 5 and len(set(chosen)) == 5
    assert set(chosen) <= s.ledger.answered
    pids = [s.transport.partition_of[n] for n in chosen]
    assert pids == sorted(pids)
    assert [s.transport.partition_of[n] for n in s._sample(2, 1.0, 2, 0)] == list(range(10))


@pytest.mark.parametrize(
    "fraction, minimum, expected", [(0.5, 2, 5), (0.3, 2, 3), (0.1, 2, 2), (0.05, 0, 1), (1.0, 2, 10), (0.5, 20, 10)]
)
def test_sample_size_respects_fraction_and_minimum(fraction: float, minimum: int, expected: int) -> None:
    assert len(sampler(seed=0)._sample(1, fraction, minimum, 0)) == expected


def test_train_sampling_uses_fraction_train() -> None:
    s = sampler(seed=3)
    s.fraction_train = 0.5
    s.min_train_nodes = 2
    model = ArrayRecord(tiny_model().state_dict())
    messages = list(s.configure_train(4, model, ConfigRecord(), grid=None))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(s._sample(4, 0.5, 2, 0))
    assert all(m.metadata.message_type == P.TRAIN == "train.distill" for m in messages)
    assert messages[0].content["config"]["server-round"] == 4
    assert s._global is model


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"query_budget": float("nan")}, "query_budget"),
        ({"query_budget": -1}, "query_budget"),
        ({"query_budget": True}, "query_budget"),
        ({"max_update_norm": float("inf")}, "max_update_norm"),
        ({"norm_outlier_factor": -1}, "norm_outlier_factor"),
        ({"min_reply_fraction": 1.5}, "min_reply_fraction"),
    ],
)
def test_bad_strategy_settings_are_refused(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        MEKD(refuse_all, **kwargs)


def test_run_failed_is_one_line() -> None:
    s = make_strategy(min_reply_fraction=0.5)
    with pytest.raises(RunFailed) as info:
        s.failures.require("train", 1, 4, server_round=2)
    assert "\n" not in str(info.value) and "min-reply-fraction=0.5" in str(info.value)
