"""Scripted clients for strategy tests: a fake Grid that hands each message to a Python function playing
its node, honest and hostile node behaviours, and a small MEKD over them.

Why here: the strategy tests (phases, wrapping, lazy phases, pairing) all drive `MEKD.start` against the
same scripted federation; a test file never imports another test file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from torch import nn

from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD
from strategies import protocol as P

SHAPE = (1, 4, 4)


CLASSES = 3


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, CLASSES)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x.flatten(1))


def student() -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    return {k: v.numpy().copy() for k, v in nn.Linear(16, CLASSES).state_dict().items()}


Handler = Callable[[Message], "Message | None"]


class FakeGrid:
    """Delivers each message to the function playing its node; records everything sent."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            r = self.nodes[m.metadata.dst_node_id](m)
            if r is not None:
                out.append(r)
        return out


def honest(seed: int, *, images: int = 6, claim: int | None = None) -> Handler:
    """A node that behaves like the project's ClientApp (reporting `claim` as its partition-id)."""
    rng = np.random.default_rng(seed)
    own = rng.integers(0, 256, size=(images, *SHAPE), dtype=np.uint8)

    def handle(m: Message) -> Message:
        pid = float(claim if claim is not None else seed)
        kind = m.metadata.message_type
        if kind == P.QUERY:
            budget = int(m.content[P.CONFIG][P.BUDGET])
            return Message(
                RecordDict(
                    {
                        P.QUERIES: ArrayRecord({P.IMAGES: Array(own[:budget])}),
                        P.METRICS: MetricRecord({P.PARTITION_ID: pid}),
                    }
                ),
                reply_to=m,
            )
        if kind == P.ANSWERS:
            return Message(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: images})}), reply_to=m)
        if kind == P.TRAIN:
            sd = {k: m.content[P.ARRAYS][k].numpy() + 0.01 * (seed + 1) for k in m.content[P.ARRAYS].keys()}
            return Message(
                RecordDict(
                    {
                        P.ARRAYS: ArrayRecord({k: Array(v.astype(np.float32)) for k, v in sd.items()}),
                        P.METRICS: MetricRecord({P.NUM_EXAMPLES: images, "train-loss": 1.0, P.PARTITION_ID: pid}),
                    }
                ),
                reply_to=m,
            )
        if kind == P.EVALUATE:
            return Message(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 2, "accuracy": 0.5})}), reply_to=m)
        raise AssertionError(kind)

    return handle


def crashing(on: set[str], inner: Handler) -> Handler:
    def handle(m: Message) -> Message:
        if m.metadata.message_type in on:
            return Message(Error(code=0, reason="simulated crash"), reply_to=m)
        return inner(m)

    return handle


Arrays = dict[str, np.ndarray]


IMAGES = (2, 5, 9, 4, 7, 3, 6)  # each client's examples: its weight (the server caps it at the answers it holds)


def with_emulator(inner: Handler) -> Handler:
    """A client that also trains a local emulator (the first phase) and reports its losses."""

    def handle(m: Message) -> Message:
        if m.metadata.message_type == P.EMULATOR:
            return Message(RecordDict({P.METRICS: MetricRecord({"d-loss": 0.5, "g-loss": 0.7})}), reply_to=m)
        return inner(m)

    return handle


def scaled(factor: float, inner: Handler) -> Handler:
    """An attacker: its honest update's distance from the global model, times `factor`."""

    def handle(m: Message) -> Message:
        r = inner(m)
        if m.metadata.message_type != P.TRAIN:
            return r
        g = m.content[P.ARRAYS]
        sent = r.content[P.ARRAYS]
        arrays = {k: (g[k].numpy() + factor * (sent[k].numpy() - g[k].numpy())).astype(np.float32) for k in g.keys()}
        return Message(
            RecordDict(
                {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), P.METRICS: r.content[P.METRICS]}
            ),
            reply_to=m,
        )

    return handle


class RecordingGrid(FakeGrid):
    """The fake Grid, also keeping a copy of every train update as sent (MEKD rewrites replies in place)."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        super().__init__(nodes)
        self.updates: dict[int, list[tuple[int, Arrays, float]]] = {}  # round -> [(node, arrays, weight)]

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == P.TRAIN:
            rnd = int(messages[0].content[P.CONFIG][P.SERVER_ROUND])
            for r in replies:
                if not r.has_error():
                    arrays = {k: r.content[P.ARRAYS][k].numpy().copy() for k in r.content[P.ARRAYS].keys()}
                    weight = float(r.content[P.METRICS][P.NUM_EXAMPLES])
                    self.updates.setdefault(rnd, []).append((r.metadata.src_node_id, arrays, weight))
        return replies

    def sent_of(self, message_type: str) -> list[Message]:
        return [m for m in self.sent if m.metadata.message_type == message_type]


def node_id(i: int) -> int:
    return 11 * (i + 1)


def mekd(inner=None, n: int = 3, **kwargs) -> MEKD:
    oracle = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE, budget=10)
    return MEKD(
        oracle,
        strategy=inner,
        query_budget=10,
        train_emulators=True,
        emulator_steps=1,
        min_available_nodes=n,
        **{"log_fn": lambda _: None, **kwargs},
    )
