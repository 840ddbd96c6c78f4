"""Benchmark (not a test): what the trust checks cost per round, next to a plain Flower FedAvg.

Ten ResNet8 student updates (the default federation) are aggregated by `strategies.MEKD` (dtype
conversion, key/shape/finiteness/BatchNorm checks, norm bounds, weight caps, then Flower's FedAvg)
and by Flower's FedAvg alone, interleaved in one process; plus the per-round checkpoint
(`student.pt` + `checkpoint.pt`). Usage: `python experiments/bench_aggregation.py [--clients 10] [--repeats 20]`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from mekd_fl.models.classifier import build_model
from mekd_fl.server.results import RunResults
from strategies import MEKD


def updates(global_state: dict[str, np.ndarray], clients: int) -> list[Message]:
    rng = np.random.default_rng(0)
    out = []
    for node in range(1, clients + 1):
        sd = {
            k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in global_state.items()
        }
        sd = {k: np.abs(v) if k.endswith("running_var") else v for k, v in sd.items()}
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        out.append(
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v) for k, v in sd.items()}),
                        "metrics": MetricRecord({"num-examples": 2700, "train-loss": 1.0}),
                    }
                ),
                reply_to=instruction,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    torch.manual_seed(0)
    student = build_model("resnet8", 10, (1, 28, 28), (0.5,), (0.5,))
    global_state = {k: v.numpy().copy() for k, v in student.state_dict().items()}
    mekd = MEKD(lambda key, images: None, log_fn=lambda _: None)
    mekd.transport.partition_of = {n: n - 1 for n in range(1, args.clients + 1)}
    mekd.ledger.example_cap = {n: 2700 for n in mekd.transport.partition_of}
    plain = FedAvg()
    times: dict[str, list[float]] = {"MEKD checked aggregation": [], "Flower FedAvg alone": [], "checkpoint save": []}
    with tempfile.TemporaryDirectory() as tmp:
        results = RunResults(Path(tmp))
        for _ in range(args.repeats):
            mekd._global = ArrayRecord({k: Array(v) for k, v in global_state.items()})
            batch = updates(global_state, args.clients)
            t0 = time.perf_counter()
            mekd.aggregate_train(1, batch)
            times["MEKD checked aggregation"].append(time.perf_counter() - t0)
            batch = updates(global_state, args.clients)
            t0 = time.perf_counter()
            plain.aggregate_train(1, batch)
            times["Flower FedAvg alone"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            results.save_checkpoint(1, student.state_dict(), mekd.state())
            times["checkpoint save"].append(time.perf_counter() - t0)
    params = sum(v.size for v in global_state.values())
    print(f"{args.clients} ResNet8 updates ({params:,} numbers each), median of {args.repeats}:")
    for name, values in times.items():
        print(f"  {name:26s} {1000 * statistics.median(values):8.1f} ms")
    ratio = statistics.median(times["MEKD checked aggregation"]) / statistics.median(times["Flower FedAvg alone"])
    print(f"  checked / plain aggregation: {ratio:.2f}")


if __name__ == "__main__":
    main()
