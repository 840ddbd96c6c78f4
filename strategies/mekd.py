"""`MEKD`: Flower's message-based FedAvg with mapping emulation and a blind-teacher round trip.

Usable in any Flower project: give it an oracle (any callable `(client_key, uint8 images) -> soft
outputs`, so a remote endpoint fits) and register the client handlers of `mekd_fl.client_app` (or
your own with the same message types) on your ClientApp.

Phases, all driven by the server because clients cannot call it:
1. `train.emulator` (when the method or the query source needs an emulator): each client trains its GAN
   on its own images; the emulator stays in the client's `context.state`. With a federated emulator the
   strategy averages generators and discriminators over several such rounds, then installs the average.
2. `query.teacher`: each client replies with its query images (uint8); the strategy passes them through
   the oracle (which counts them against the client's budget) and sends the soft outputs back in a
   `query.answers` message; the client caches them.
3. FedAvg rounds (`train`, `evaluate`), with each update validated before averaging.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

Oracle = Callable[[str, torch.Tensor], torch.Tensor]
RoundCallback = Callable[[dict], None]

EMULATOR = "train.emulator"
QUERY = "query.teacher"
ANSWERS = "query.answers"
SAMPLES = "evaluate.samples"


class MEKD(FedAvg):
    """FedAvg over students distilled from a blind teacher through the clients' emulators.

    Parameters beyond FedAvg's
    --------------------------
    oracle : callable (client_key, uint8 images) -> soft outputs; raising ValueError refuses the query.
    query_budget : images each client is asked for (the oracle enforces its own budget as well).
    query_teacher : False for a reference that trains on labels: the query round trip only registers
        the clients, with a budget of 0, and the oracle is never called.
    train_emulators : run the emulator phase (False when neither the method nor the queries use G).
    federated_emulator : average generators and discriminators across clients over `emulator_rounds`
        rounds that split `emulator_steps` between them, instead of keeping each emulator local.
    emulator_records : extra ArrayRecords sent with emulator messages (e.g. "fid-net" to measure FID).
    seed : seeds client sampling, so the same seed gives the same rounds.
    on_round : called after each round's evaluation with one flat dict of that round's metrics.
    """

    def __init__(self, oracle: Oracle, *, query_budget: int = 100_000, query_teacher: bool = True,
                 train_emulators: bool = True, federated_emulator: bool = False, emulator_rounds: int = 1,
                 emulator_steps: int = 200,
                 emulator_records: dict[str, ArrayRecord] | None = None,
                 seed: int = 0, on_round: RoundCallback | None = None, log_fn: Callable[[str], None] = print,
                 **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.oracle = oracle
        self.query_budget = query_budget
        self.query_teacher = query_teacher
        self.train_emulators = train_emulators
        self.federated_emulator = federated_emulator
        self.emulator_rounds = max(1, emulator_rounds)
        self.emulator_steps = emulator_steps
        # Sent with the emulator messages, e.g. "fid-net": the weights of the FID feature network.
        self.emulator_records = dict(emulator_records or {})
        self.seed = seed
        self.on_round = on_round
        self.say = log_fn
        self.partition_of: dict[int, int] = {}        # node id -> partition id
        self.answered: set[int] = set()                # nodes holding teacher answers
        self.queries_used: dict[str, int] = {}
        self.emulator_metrics: dict[int, dict] = {}
        self.rejected: list[dict] = []
        self._global: ArrayRecord | None = None
        self._last_train: MetricRecord | None = None
        self._last_eval: MetricRecord | None = None
        self._round_rejections: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> MEKD: emulators=%s, query budget=%d per client%s", self.train_emulators, self.query_budget,
            "" if self.query_teacher else " (teacher not queried)")

    @staticmethod
    def client_key(partition_id: int) -> str:
        return f"client-{partition_id}"

    def _wait_for_nodes(self, grid: Grid, minimum: int, timeout: float = 120.0) -> list[int]:
        deadline = time.time() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < minimum:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of the {minimum} SuperNodes connected; with `flwr run`, "
                                   f"set the federation's num-supernodes to num-clients={minimum}")
            time.sleep(0.5)
        return nodes

    def _send(self, grid: Grid, node_ids: Iterable[int], message_type: str, record: RecordDict,
              timeout: float) -> list[Message]:
        messages = [Message(content=record, message_type=message_type, dst_node_id=n) for n in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        good = []
        for reply in replies:
            if reply.has_error():
                self.say(f"[{message_type}] node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            else:
                good.append(reply)
        return sorted(good, key=lambda r: self.partition_of.get(r.metadata.src_node_id, r.metadata.src_node_id))

    def _note_partition(self, reply: Message) -> int:
        metrics = next(iter(reply.content.metric_records.values()))
        pid = int(metrics["partition-id"])
        self.partition_of[reply.metadata.src_node_id] = pid
        return pid

    # ------------------------------------------------------------------ phase 1: emulation
    def run_emulation(self, grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float) -> None:
        """Local emulators (one message), or a federated emulator (averaging rounds, then installation)."""
        t0 = time.time()
        measure = "fid-net" in self.emulator_records
        kind = "federated" if self.federated_emulator else "local"
        self.say(f"[emulator] training {kind} emulators on {len(node_ids)} clients")
        if not self.federated_emulator:
            replies = self._emulator_round(grid, node_ids, config, timeout, {"measure-fid": measure}, {})
        else:
            weights: dict[str, ArrayRecord] = {}
            splits = [len(part) for part in np.array_split(np.arange(self.emulator_steps), self.emulator_rounds)]
            for r, steps in enumerate(splits):
                replies = self._emulator_round(grid, node_ids, config, timeout,
                                               {"phase-steps": steps, "return-weights": True}, weights)
                weights = {key: self._weighted_average([rep.content for rep in replies], key)
                           for key in ("emulator-generator", "emulator-discriminator")}
                self.say(f"[emulator] federated round {r + 1}/{len(splits)}: averaged {len(replies)} emulators")
                node_ids = [rep.metadata.src_node_id for rep in replies]
            replies = self._emulator_round(grid, node_ids, config, timeout, {"phase-steps": 0, "measure-fid": measure},
                                           weights)
        for reply in replies:
            pid = self.partition_of[reply.metadata.src_node_id]
            metrics = dict(next(iter(reply.content.metric_records.values())))
            self.emulator_metrics[pid] = {**self.emulator_metrics.get(pid, {}), **metrics}
            self.say(f"[emulator] client {pid}: " + ", ".join(
                f"{k} {self.emulator_metrics[pid][k]:.3f}" for k in ("d-loss", "g-loss", "fid")
                if k in self.emulator_metrics[pid]))
        fids = [m["fid"] for m in self.emulator_metrics.values() if "fid" in m]
        self.say(f"[emulator] {len(replies)}/{len(node_ids)} clients done in {time.time() - t0:.0f}s"
                 + (f", mean domain FID {np.mean(fids):.2f}" if fids else ""))

    def _emulator_round(self, grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float,
                        extra_config: dict, weights: dict[str, ArrayRecord]) -> list[Message]:
        cfg = ConfigRecord({**dict(config), **extra_config})
        record = RecordDict({self.configrecord_key: cfg, **self.emulator_records, **weights})
        replies = self._send(grid, node_ids, EMULATOR, record, timeout)
        for reply in replies:
            self._note_partition(reply)
        if not replies:
            raise RuntimeError("no client finished its emulator (see the failures above)")
        return replies

    def _weighted_average(self, contents: list[RecordDict], key: str,
                          reference: ArrayRecord | None = None) -> ArrayRecord:
        """FedAvg of the ArrayRecord `key` across replies, keeping the reference's dtypes (BatchNorm counters)."""
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        averaged = aggregate_arrayrecords([RecordDict({"a": c[key], "m": m}) for c, m in zip(contents, metrics)],
                                          self.weighted_by_key)
        reference = reference if reference is not None else contents[0][key]
        return ArrayRecord({k: Array(np.asarray(averaged[k].numpy()).astype(reference[k].numpy().dtype))
                            for k in reference.keys()})

    # ------------------------------------------------------------------ phase 2: teacher queries
    def run_queries(self, grid: Grid, node_ids: list[int], config: ConfigRecord, timeout: float) -> None:
        """Ask every client for its query images, answer them through the oracle, send the answers back.

        With `query_teacher=False` (a reference trained on labels, which never reads the teacher) the same
        round trip runs with a budget of 0: clients still register, and no query reaches the oracle.
        """
        t0 = time.time()
        ask = ConfigRecord(dict(config))
        ask["budget"] = self.query_budget if self.query_teacher else 0
        replies = self._send(grid, node_ids, QUERY, RecordDict({self.configrecord_key: ask}), timeout)
        answers: dict[int, RecordDict] = {}
        for reply in replies:
            pid = self._note_partition(reply)
            images = next(iter(reply.content.array_records.values()))["images"].numpy()
            key = self.client_key(pid)
            if not self.query_teacher:
                responses = torch.zeros(0, 0)
            else:
                try:
                    responses = self.oracle(key, torch.from_numpy(np.ascontiguousarray(images)))
                except ValueError as exc:
                    self.say(f"[teacher] query of client {pid} refused: {exc}")
                    continue
            self.queries_used[key] = self.queries_used.get(key, 0) + len(images)
            answers[reply.metadata.src_node_id] = RecordDict({
                "answers": ArrayRecord({"responses": Array(responses.numpy())}),
                self.configrecord_key: ConfigRecord(dict(config)),
            })
        messages = [Message(content=rec, message_type=ANSWERS, dst_node_id=n) for n, rec in answers.items()]
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                self.say(f"[teacher] node {reply.metadata.src_node_id} could not store its answers: {reply.error.reason}")
            else:
                self.answered.add(reply.metadata.src_node_id)
        total = sum(self.queries_used.values())
        if not self.query_teacher:
            self.say(f"[teacher] not queried (query_teacher=False): {len(self.answered)} clients registered")
        else:
            self.say(f"[teacher] answered {total} queries for {len(self.answered)} clients in {time.time() - t0:.0f}s")

    # ------------------------------------------------------------------ the run
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              num_nodes: int | None = None) -> Result:
        train_config = ConfigRecord() if train_config is None else train_config
        node_ids = self._wait_for_nodes(grid, num_nodes or self.min_available_nodes)
        if self.train_emulators:
            self.run_emulation(grid, node_ids, train_config, timeout)
            node_ids = [n for n in node_ids if n in self.partition_of]
        self.run_queries(grid, node_ids, train_config, timeout)
        if not self.answered:
            raise RuntimeError("no client holds teacher answers; nothing to distill (see the refusals above)")
        t_start = time.time()

        def evaluate_and_report(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            res = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if self.on_round is not None:
                record: dict = {"round": server_round, "elapsed-s": round(time.time() - t_start, 2)}
                if server_round > 0:
                    record.update({f"train/{k}": v for k, v in (self._last_train or {}).items()})
                    record.update({f"fed/{k}": v for k, v in (self._last_eval or {}).items()})
                    record["rejected"] = len(self._round_rejections)
                record.update({f"server/{k}": v for k, v in (res or {}).items()})
                record["queries-used"] = sum(self.queries_used.values())
                self.on_round(record)
            self._last_train = self._last_eval = None
            self._round_rejections = []
            return res

        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                             evaluate_and_report)

    # ------------------------------------------------------------------ FedAvg hooks
    def _sample(self, server_round: int, fraction: float, minimum: int, salt: int) -> list[int]:
        """Seeded sampling over the clients that hold answers, ordered by partition id (reproducible)."""
        eligible = sorted(self.answered, key=lambda n: self.partition_of.get(n, n))
        size = min(len(eligible), max(int(len(eligible) * fraction), minimum, 1))
        rng = random.Random(self.seed * 7_919 + server_round * 104_729 + salt)
        chosen = rng.sample(eligible, size)
        return sorted(chosen, key=lambda n: self.partition_of.get(n, n))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = self._sample(server_round, self.fraction_train, self.min_train_nodes, 0)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = self._sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, 1)
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def check_update(self, content: RecordDict) -> str | None:
        """Why a client's update must not be averaged, or None when it is sound."""
        if len(content.array_records) != 1:
            return f"expected 1 ArrayRecord, got {len(content.array_records)}"
        if len(content.metric_records) != 1:
            return f"expected 1 MetricRecord, got {len(content.metric_records)}"
        weight = next(iter(content.metric_records.values())).get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            return f"'{self.weighted_by_key}' is {weight!r}, not a positive number"
        arrays = next(iter(content.array_records.values()))
        if self._global is None:
            return None
        expected, got = set(self._global.keys()), set(arrays.keys())
        if got != expected:
            missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
            return f"keys differ from the global model (missing {missing}, unexpected {extra})"
        for key, ref in self._global.items():
            arr = arrays[key]
            if tuple(arr.shape) != tuple(ref.shape):
                return f"'{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
            values = arr.numpy()
            if values.dtype.kind not in "fiub":
                return f"'{key}' has dtype {values.dtype}"
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"'{key}' contains NaN or inf"
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        for msg in replies:
            if msg.has_error():
                reason = f"client error: {msg.error.reason}"
            else:
                reason = self.check_update(msg.content)
            if reason is None:
                valid.append(msg)
                continue
            node = msg.metadata.src_node_id
            entry = {"round": server_round, "node": node, "partition": self.partition_of.get(node), "reason": reason}
            self.rejected.append(entry)
            self._round_rejections.append(entry)
            log(WARNING, "Rejected update of client %s in round %d: %s", entry["partition"], server_round, reason)
            self.say(f"[round {server_round}] rejected update of client {entry['partition']}: {reason}")
        if not valid:
            return None, None
        valid.sort(key=lambda m: self.partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id))
        contents = [m.content for m in valid]
        arrays = self._weighted_average(contents, next(iter(contents[0].array_records.keys())), self._global)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self._last_train = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        self._last_eval = metrics
        return metrics

    # ------------------------------------------------------------------ after the run
    def request_samples(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, count: int,
                        timeout: float = 600) -> dict[str, np.ndarray] | None:
        """Ask the first client with answers for x, G(T(x)), G(S(x)) on `count` of its images."""
        if not self.answered or not self.train_emulators or not self.query_teacher or count <= 0:
            return None  # no emulator, or no teacher answers to show G(T(x)) for
        node = min(self.answered, key=lambda n: self.partition_of.get(n, n))
        ask = ConfigRecord(dict(config))
        ask["num-samples"] = count
        replies = self._send(grid, [node], SAMPLES,
                             RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ask}), timeout)
        if not replies:
            return None
        record = next(iter(replies[0].content.array_records.values()))
        return {k: record[k].numpy() for k in record.keys()}
