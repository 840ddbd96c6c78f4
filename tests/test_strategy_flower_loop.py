"""MEKD as a Flower component: Flower's own loop drives the rounds, and what MEKD cannot honour is refused.

A user's Flower app that switches to MEKD keeps Flower's per-round log lines, its `Result` (train and
evaluate metrics of every round, the server-side `evaluate_fn`'s results), and the contract of the
strategy it wraps: FedProx's proximal term reaches the client; a key the client would ignore is refused
before any message is sent; a divergence gets a warning that names the cause.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx

from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD, RunFailed
from strategies import protocol as P
from strategies.divergence import DivergenceWatch
from tests.test_client_api import CLASSES, SHAPE, InProcessGrid, Teacher, UserNet, users_app

pytestmark = pytest.mark.usefixtures("task_identity")


def run(strategy: MEKD, rounds: int = 2, nodes: int = 3, **kwargs) -> tuple[InProcessGrid, object]:
    grid = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=nodes)
    torch.manual_seed(0)
    start = ArrayRecord(UserNet().state_dict())
    result = strategy.start(grid, start, num_rounds=rounds, train_config=ConfigRecord({"lr": 0.05}), **kwargs)
    return grid, result


def mekd(inner=None, **kwargs) -> MEKD:
    oracle = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE)
    inner = inner or FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    return MEKD(oracle, strategy=inner, emulator_steps=2, **{"log_fn": lambda _: None, **kwargs})


def test_flowers_loop_logs_its_rounds_and_returns_its_result(caplog: pytest.LogCaptureFixture) -> None:
    served: list[int] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        served.append(server_round)
        return MetricRecord({"server-score": float(server_round)})

    with caplog.at_level(logging.INFO, logger="flwr"):
        _, result = run(mekd(), rounds=2, evaluate_fn=evaluate_fn)
    text = caplog.text
    for line in ("Starting MEKD strategy", "[ROUND 1/2]", "[ROUND 2/2]", "Strategy execution finished", "MEKD:"):
        assert line in text, line
    assert "wrapping FedAvg" in text  # the wrapped strategy's own summary follows MEKD's
    assert served == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert "train-loss" in result.train_metrics_clientapp[2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert result.evaluate_metrics_clientapp[2]["eval_acc"] >= 0
    assert [result.evaluate_metrics_serverapp[r]["server-score"] for r in (0, 1, 2)] == [0.0, 1.0, 2.0]
    assert set(result.arrays.keys()) == set(UserNet().state_dict())


def test_a_resumed_run_keeps_its_own_round_numbers() -> None:
    records: list[int] = []
    strategy = mekd(on_round=lambda record, arrays: records.append(record["round"]))
    _, result = run(strategy, rounds=3, start_round=3, evaluate_fn=lambda r, a: MetricRecord({"r": float(r)}))
    assert records == [3] and strategy.last_round == 3
    assert sorted(result.train_metrics_clientapp) == [3] and sorted(result.evaluate_metrics_clientapp) == [3]
    assert sorted(result.evaluate_metrics_serverapp) == [3] and result.evaluate_metrics_serverapp[3]["r"] == 3.0


def test_fedprox_sends_proximal_mu_and_it_reaches_the_distillation() -> None:
    grid, result = run(mekd(FedProx(proximal_mu=0.5, min_train_nodes=2, min_evaluate_nodes=2)), rounds=1)
    train = [m for m in grid.sent if m.metadata.message_type == P.TRAIN]
    assert train and all(m.content[P.CONFIG][P.PROXIMAL_MU] == 0.5 for m in train)
    assert result.train_metrics_clientapp[1]["train-loss"] > 0


def test_a_key_the_client_would_ignore_is_refused_before_any_message() -> None:
    inner = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(min_train_nodes=2, min_evaluate_nodes=2), noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=3
    )
    grid = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=3)
    with pytest.raises(ValueError) as err:
        mekd(inner).start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1)
    message = str(err.value)
    assert "clipping_norm" in message and "accepted" in message and "\n" not in message
    assert grid.sent == []  # refused before the emulator phase


def test_run_failed_names_where_the_failures_are_listed() -> None:
    strategy = mekd(failures_listed_in="my-app's log")
    with pytest.raises(RunFailed, match="listed in my-app's log"):
        strategy.failures.require("train", 0, 3, server_round=2)
    with pytest.raises(RunFailed, match=r"MEKD\.failures\.entries"):
        mekd().failures.require("train", 0, 3, server_round=2)


def test_an_unusable_aggregate_keeps_the_previous_model_and_is_recorded() -> None:
    class Poisoning(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            arrays["head.bias"] = Array(np.full(CLASSES, np.nan, dtype=np.float32))
            return arrays, metrics

    said: list[str] = []
    strategy = mekd(Poisoning(min_train_nodes=2, min_evaluate_nodes=2), log_fn=said.append)
    torch.manual_seed(0)
    start = UserNet().state_dict()
    _, result = run(strategy, rounds=2)
    assert result.arrays.to_torch_state_dict().keys() == start.keys()
    assert torch.equal(result.arrays.to_torch_state_dict()["head.bias"], start["head.bias"])
    refused = [f for f in strategy.failures.entries if "aggregate refused" in f["reason"]]
    assert [f["round"] for f in refused] == [1, 2] and "NaN" in refused[0]["reason"]


def test_divergence_warnings_name_the_cause() -> None:
    watch = DivergenceWatch()
    assert watch.observe(1, [1.0, 1.1, 0.9], weight_norm=30.0, scaled=0, loss=2.0) == []
    spread = watch.observe(2, [1.0, 1.0, 12.0], weight_norm=30.0, scaled=1, loss=1.5)
    assert len(spread) == 1 and "update norms 12x the median: lower lr" in spread[0]
    most = watch.observe(3, [50.0, 60.0, 70.0], weight_norm=30.0, scaled=2, loss=1.0)
    assert any("2 of 3 updates were scaled down" in w for w in most)
    assert not any("longer than the global" in w for w in most)
    far = DivergenceWatch().observe(1, [400.0, 410.0], weight_norm=30.0, scaled=0, loss=None)
    assert len(far) == 1 and "13x longer than the global weights" in far[0]
    rising = watch.observe(4, [1.0, 1.0], weight_norm=30.0, scaled=0, loss=1.5)
    assert rising == ["[train 4] warning: distillation loss 1.5 rose from 1: " + rising[0].split(": ", 2)[2]]


def test_a_diverging_round_is_said_in_the_run() -> None:
    said: list[str] = []
    strategy = mekd(log_fn=said.append, norm_outlier_factor=0.0)
    strategy._global = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))})
    strategy.ledger.example_cap = {101: 5, 102: 5, 103: 5}

    def reply(node: int, value: float) -> Message:
        instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": 5, "train-loss": 1.0}),
            }
        )
        return Message(content=content, reply_to=instruction)

    strategy.aggregate_train(1, [reply(101, 1.1), reply(102, 1.1), reply(103, 40.0)])
    assert any("update norms" in line and "lower lr" in line for line in said), said


def test_importing_the_protocol_loads_neither_torch_nor_flowers_server() -> None:
    code = "import sys, strategies.protocol; print('torch' in sys.modules, 'flwr.serverapp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
