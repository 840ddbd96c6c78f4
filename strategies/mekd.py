"""`MEKD`: mapping emulation and a blind-teacher round trip, then rounds aggregated by a Flower strategy.

Usable in any Flower project: give it an oracle (any callable `(client_key, uint8 images) -> soft
outputs`, so a remote endpoint fits) and register the client handlers of `mekd_fl.client_app` (or
your own, speaking `strategies.protocol`) on your ClientApp.

Phases, all driven by the server because clients cannot call it:
1. `train.emulator` (when the method or the query source needs an emulator): each client trains its GAN
   on its own images; the emulator stays in the client's `context.state`. With a federated emulator the
   strategy averages generators and discriminators over several such rounds, then installs the average.
2. `query.teacher`: each client replies with its query images (uint8); the strategy passes them through
   the oracle (which counts them against the client's budget) and sends the soft outputs back in a
   `query.answers` message; the client caches them.
3. Rounds (`train`, `evaluate`): each update is checked and bounded here, then aggregated by the
   wrapped Flower strategy (`strategy=`: FedAvg by default; FedTrimmedAvg, FedMedian, Krum, Bulyan or a
   DP wrapper compose the same way).

Trust, enforced here (see the README's "Trust model"):
- a client is the node Flower authenticated (`message.metadata.src_node_id`); its label (partition) is
  assigned by the server, never read from what the client says;
- every outgoing message is checked against `protocol.OUTGOING` and its config against
  `client_config_keys`: a client receives the student, averaged emulators, its own answers and the
  settings it needs, nothing else;
- every reply is parsed defensively; every failure is recorded (phase, node, partition, round,
  reason) and never stops the run, unless a phase or round falls below `min_reply_fraction`, which
  raises `RunFailed` (one line);
- updates are converted to the global dtypes, checked, norm-bounded, and weighted by at most the number
  of answers the server gave that client.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.supercore import log

from strategies import protocol as P
from strategies.updates import Arrays, bound_norms, clean_metrics, example_weight, like_reference, sanitize

Oracle = Callable[[str, torch.Tensor], "torch.Tensor | np.ndarray"]
RoundCallback = Callable[[dict, ArrayRecord], None]
NodeRecords = Callable[[int, int], Mapping[str, ArrayRecord | ConfigRecord]]

# Kept for code that imported the message types from here before `strategies.protocol` existed.
EMULATOR, QUERY, ANSWERS, SAMPLES = P.EMULATOR, P.QUERY, P.ANSWERS, P.SAMPLES


#: When a client trains its emulator and queries the teacher: all before round 1 (the paper's protocol),
#: or the first time it is sampled (large populations: a run's cost follows the clients that take part).
PHASES = ("upfront", "lazy")
PAIRINGS = ("none", "paired")
#: Phases that ask more clients than this are sent in 10 chunks, each followed by a progress line.
PROGRESS_ABOVE = 50


class RunFailed(RuntimeError):
    """A phase or round got too few usable replies (or aggregated nothing): the run cannot go on."""


class _Cohort:
    """The part of a Grid an inner strategy sees: only the nodes MEKD sampled for this round."""

    def __init__(self, nodes: list[int]) -> None:
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)


def _as_numpy(array: ArrayRecord | None, key: str) -> np.ndarray | None:
    try:
        return np.asarray(array[key].numpy()) if array is not None and key in array else None
    except Exception:  # noqa: BLE001  (a malformed Array can fail to decode in many ways)
        return None


def _short(reason: str, limit: int = 300) -> str:
    """One readable line of a failure: Flower wraps a client's exception in the whole Ray traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    if "Message: " in text:  # Flower's ClientAppException: "... Message: <the client's own words>"
        text = "client error: " + text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() not in ("'>", "'")]
    text = lines[0] if len(lines) == 1 else (lines[-1] if lines else "")
    text = text.rstrip("'>").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _digest(images: np.ndarray) -> str:
    h = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:32]


class MEKD(FedAvg):
    """Federated distillation of a student from a blind teacher through the clients' emulators.

    Parameters beyond FedAvg's
    --------------------------
    oracle : callable (client_key, uint8 images) -> soft outputs (tensor or numpy). Raising refuses the
        query; the client is told nothing but that it failed, and the failure is recorded.
    strategy : the Flower strategy that aggregates the checked updates and configures the round messages
        (FedAvg by default; FedProx, FedAdam, FedTrimmedAvg, Krum, Bulyan, a DP wrapper, ...). MEKD samples
        the cohort (`fraction_train` of the clients holding answers) and shows the wrapped strategy only
        that cohort, within which it samples with its own fraction.
    emulator_phase : "upfront" (every client trains its emulator and queries the teacher before round 1,
        the paper's protocol) or "lazy" (the first time a client is sampled; not with a federated
        emulator): the cost of a run then follows the clients that take part, not the population.
    emulator_pairing : "none" (the paper: each emulator is an unconditional GAN, trained before the
        queries) or "paired" (the queries first, then each client trains G on its own (answer, image)
        pairs, so that G(T(x)) reconstructs x: G then inverts the teacher). Queries are counted alike.
    query_budget : images each client may send to the teacher (enforced here and by the oracle).
    query_teacher : False for a reference that trains on labels: the query round trip only registers
        the clients, with a budget of 0, and the oracle is never called.
    train_emulators : run the emulator phase (False when neither the method nor the queries use G).
    federated_emulator : average generators and discriminators across clients over `emulator_rounds`
        rounds that split `emulator_steps` between them, instead of keeping each emulator local.
    emulator_reference : keys, shapes and dtypes of the emulator weights (fresh weights are fine; they are
        never sent), to check what clients return in a federated emulator.
    measure_fid : ask clients for their emulator's domain FID (computed on the client with a
        data-independent feature network; nothing is sent for it).
    client_config_keys : the only run settings a client may receive (plus `protocol.STRATEGY_KEYS`);
        None sends the config as given.
    node_records : (node id, partition label) -> extra records for every message to that node
        (the simulation's `shard`: which images of the data files are the node's own).
    max_update_norm, norm_outlier_factor : bounds on an update's distance from the global model
        (absolute; and times the round's median distance); longer updates are scaled down. 0 = off.
    min_reply_fraction : fewest usable replies a phase or round accepts, as a fraction of the clients
        asked (at least one); fewer raises RunFailed.
    seed : seeds client sampling, so the same seed gives the same rounds.
    on_round : called after each round's evaluation with one flat dict of that round's metrics and
        the global student (to save it).
    """

    def __init__(
        self,
        oracle: Oracle,
        *,
        strategy: Strategy | None = None,
        query_budget: int = 100_000,
        query_teacher: bool = True,
        train_emulators: bool = True,
        federated_emulator: bool = False,
        emulator_rounds: int = 4,
        emulator_steps: int = 200,
        emulator_reference: Mapping[str, ArrayRecord] | None = None,
        measure_fid: bool = False,
        client_config_keys: Iterable[str] | None = None,
        node_records: NodeRecords | None = None,
        max_update_norm: float = 0.0,
        norm_outlier_factor: float = 2.0,
        min_reply_fraction: float = 0.5,
        emulator_phase: str = "upfront",
        emulator_pairing: str = "none",
        seed: int = 0,
        on_round: RoundCallback | None = None,
        log_fn: Callable[[str], None] = print,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if isinstance(query_budget, bool) or not isinstance(query_budget, int) or query_budget < 0:
            raise ValueError(f"query_budget={query_budget!r}: accepted: an integer >= 0")
        for name, value in (("max_update_norm", max_update_norm), ("norm_outlier_factor", norm_outlier_factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: accepted: a finite number >= 0")
        if not (isinstance(min_reply_fraction, (int, float)) and 0 <= min_reply_fraction <= 1):
            raise ValueError(f"min_reply_fraction={min_reply_fraction!r}: accepted: a number in [0, 1]")
        self.oracle = oracle
        self.inner: Strategy = (
            strategy
            if strategy is not None
            else FedAvg(
                fraction_train=1.0,
                fraction_evaluate=1.0,
                min_train_nodes=1,
                min_evaluate_nodes=1,
                min_available_nodes=1,
                weighted_by_key=self.weighted_by_key,
            )
        )
        if emulator_pairing not in PAIRINGS:
            raise ValueError(f"emulator_pairing={emulator_pairing!r}: accepted: {', '.join(PAIRINGS)}")
        if emulator_phase not in PHASES:
            raise ValueError(f"emulator_phase={emulator_phase!r}: accepted: {', '.join(PHASES)}")
        if emulator_phase == "lazy" and federated_emulator:
            raise ValueError(
                "emulator_phase='lazy' with federated_emulator=True is not accepted: averaging "
                "emulators needs every client at once (use emulator_phase='upfront')"
            )
        self._check_inner()
        self.query_budget = query_budget
        self.query_teacher = query_teacher
        self.train_emulators = train_emulators
        self.federated_emulator = federated_emulator
        self.emulator_rounds = max(1, emulator_rounds)
        self.emulator_steps = emulator_steps
        self.emulator_reference = dict(emulator_reference or {})
        self.measure_fid = measure_fid
        self.client_config_keys = None if client_config_keys is None else frozenset(client_config_keys)
        self.node_records = node_records
        self.max_update_norm = float(max_update_norm)
        self.norm_outlier_factor = float(norm_outlier_factor)
        self.min_reply_fraction = float(min_reply_fraction)
        self.emulator_phase = emulator_phase
        self.emulator_pairing = emulator_pairing
        self._phase_config = ConfigRecord()
        self._lenient = False
        self.seed = seed
        self.on_round = on_round
        self.say = log_fn
        self.timeout = 3600.0
        # Everything below is keyed by the authenticated node id; the partition label is the server's own.
        self.partition_of: dict[int, int] = {}  # node id -> partition label (assigned here)
        self.teacher_node: int | None = None  # the teacher's own node (TeacherNode oracle), never a client
        self.answered: set[int] = set()  # nodes holding teacher answers
        self.example_cap: dict[int, int] = {}  # node id -> answers it holds (weight cap)
        self.queries_used: dict[str, int] = {}  # client key -> images charged
        self.query_digests: dict[str, str] = {}  # client key -> digest of the images it paid for
        # query-selection=uncertainty: the round whose global student scored a client's queries, and those
        # students (a resumed run sends a client the same student again, so it re-sends what it paid for)
        self.query_rounds: dict[str, int] = {}
        self.query_scorers: dict[int, ArrayRecord] = {}
        self._phase_round = 0  # the round whose lazy phases are running (0: the upfront phases)
        self.query_log: list[dict] = []
        self.emulator_metrics: dict[int, dict] = {}
        self.rejected: list[dict] = []  # updates refused (kept for reports)
        self.clipped: list[dict] = []  # updates scaled down to the norm bound
        self.failures: list[dict] = []  # every failure of every phase
        self.last_round = 0
        self._global: ArrayRecord | None = None
        self._last_train: MetricRecord | None = None
        self._last_eval: MetricRecord | None = None
        self._round_rejections: list[dict] = []
        self._round_failures: list[dict] = []
        self._usable = 0

    def _layers(self) -> list[Strategy]:
        """The wrapped strategy and those it wraps in turn (a DP wrapper keeps its own in `.strategy`)."""
        layer, layers = self.inner, []
        while isinstance(layer, Strategy) and len(layers) < 8:
            layers.append(layer)
            layer = getattr(layer, "strategy", None)
        return layers

    def _check_inner(self) -> None:
        """Refuse, before any phase runs, a wrapped strategy whose record names or weight key differ from
        MEKD's: its messages could not be checked, and a weight key of its own would escape the cap
        on what a client may claim (MEKD caps `weighted_by_key` by the answers the client received)."""
        for layer in self._layers():
            for name, own in (
                ("weighted_by_key", self.weighted_by_key),
                ("arrayrecord_key", P.ARRAYS),
                ("configrecord_key", P.CONFIG),
            ):
                value = getattr(layer, name, own)
                if value != own:
                    raise ValueError(
                        f"strategy={type(layer).__name__}({name}={value!r}) is not accepted; "
                        f"accepted: {name}={own!r} (MEKD checks and caps what it names)"
                    )

    # ------------------------------------------------------------------ identity, failures, state
    def summary(self) -> None:
        log(
            INFO,
            "\t└──> MEKD: emulators=%s, query budget=%d per client%s, aggregation by %s",
            self.train_emulators,
            self.query_budget,
            "" if self.query_teacher else " (teacher not queried)",
            type(self.inner).__name__,
        )

    @staticmethod
    def client_key(partition: int) -> str:
        """The oracle's account of a client: from the server's own label of an authenticated node."""
        return f"client-{partition}"

    def key_of(self, node: int) -> str:
        return self.client_key(self.partition_of[node])

    def fail(self, phase: str, node: int | None, reason: str, server_round: int = 0) -> dict:
        """Record a failure (it never stops the run by itself) and say it."""
        entry = {
            "phase": phase,
            "round": server_round,
            "node": node,
            "partition": self.partition_of.get(node) if node is not None else None,
            "reason": _short(reason),
        }
        self.failures.append(entry)
        self._round_failures.append(entry)
        where = f"client {entry['partition']}" if entry["partition"] is not None else f"node {node}"
        self.say(f"[{phase}{f' {server_round}' if server_round else ''}] {where}: {reason}")
        return entry

    def need(self, asked: int) -> int:
        """Fewest usable replies out of `asked` that a phase or round accepts."""
        return max(1, math.ceil(self.min_reply_fraction * asked)) if asked else 0

    def _require(self, phase: str, usable: int, asked: int, server_round: int = 0) -> None:
        if self._lenient:  # lazy phases: judged once on the whole sampled cohort (see `prepare`)
            return
        if asked and usable < self.need(asked):
            where = f"{phase} round {server_round}" if server_round else f"{phase} phase"
            raise RunFailed(
                f"{where}: {usable} of {asked} clients gave a usable reply, fewer than "
                f"min-reply-fraction={self.min_reply_fraction:g} allows ({self.need(asked)}); "
                f"the failures are listed in summary.json"
            )

    def state(self) -> dict:
        """What a resumed run needs from this strategy (JSON-able; saved beside the student)."""
        return {
            "round": self.last_round,
            "queries-used": dict(self.queries_used),
            "query-digests": dict(self.query_digests),
            "query-rounds": dict(self.query_rounds),
            "query-scorers": {str(r): a.to_torch_state_dict() for r, a in self.query_scorers.items()},
            "rejected": list(self.rejected),
            "clipped": list(self.clipped),
            "failures": list(self.failures),
        }

    def load_state(self, state: Mapping) -> None:
        self.last_round = int(state.get("round", 0))
        self.queries_used = {str(k): int(v) for k, v in dict(state.get("queries-used", {})).items()}
        self.query_digests = {str(k): str(v) for k, v in dict(state.get("query-digests", {})).items()}
        self.query_rounds = {str(k): int(v) for k, v in dict(state.get("query-rounds", {})).items()}
        self.query_scorers = {int(r): ArrayRecord(dict(sd)) for r, sd in dict(state.get("query-scorers", {})).items()}
        self.rejected = list(state.get("rejected", []))
        self.clipped = list(state.get("clipped", []))
        self.failures = list(state.get("failures", []))

    # ------------------------------------------------------------------ messages out
    def _config_for_client(self, config: ConfigRecord | Mapping, **extra: object) -> ConfigRecord:
        """The config a client may see: allowed run settings plus the strategy's own keys."""
        items = dict(config)
        if self.client_config_keys is not None:
            allowed = self.client_config_keys | set(P.STRATEGY_KEYS)
            items = {k: v for k, v in items.items() if k in allowed}
        items.update(extra)
        return ConfigRecord(items)

    def _message(self, node: int, message_type: str, records: Mapping) -> Message:
        """One message to one node, checked against the protocol's allow-list."""
        if node == self.teacher_node:
            raise RuntimeError(f"refusing to send {message_type} to the teacher node {node}")
        content = dict(records)
        if self.node_records is not None and node in self.partition_of:
            content.update(self.node_records(node, self.partition_of[node]))
        return P.checked_message(message_type, content, node)

    def _exchange(self, grid: Grid, messages: list[Message], phase: str, server_round: int = 0) -> list[Message]:
        """Send, wait at most `timeout`, and return the replies without error; failures are recorded."""
        if not messages:
            return []
        asked = {m.metadata.dst_node_id for m in messages}
        try:
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        except Exception as exc:  # noqa: BLE001  (a transport failure loses the whole batch, not the run)
            for node in sorted(asked):
                self.fail(phase, node, f"message not delivered: {type(exc).__name__}: {exc}", server_round)
            return []
        good, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked or node in seen:
                self.fail(phase, node, "unexpected or duplicate reply ignored", server_round)
                continue
            seen.add(node)
            if reply.has_error():
                self.fail(phase, node, f"client error: {reply.error.reason}", server_round)
            elif not reply.has_content():
                self.fail(phase, node, "empty reply", server_round)
            else:
                good.append(reply)
        for node in sorted(asked - seen):
            self.fail(phase, node, f"no reply within reply-timeout={self.timeout:g}s", server_round)
        return sorted(good, key=lambda r: self.partition_of.get(r.metadata.src_node_id, r.metadata.src_node_id))

    def _exchange_with_progress(self, grid: Grid, messages: list[Message], phase: str) -> list[Message]:
        """`_exchange`, in 10 chunks with a progress line (done, elapsed, ETA) after each when the phase asks
        more than PROGRESS_ABOVE clients: a 1,000-client phase otherwise says nothing for minutes."""
        if len(messages) <= PROGRESS_ABOVE:
            return self._exchange(grid, messages, phase)
        size, t0, replies = math.ceil(len(messages) / 10), time.time(), []
        for start in range(0, len(messages), size):
            replies += self._exchange(grid, messages[start : start + size], phase)
            done, elapsed = min(start + size, len(messages)), time.time() - t0
            eta = elapsed / done * (len(messages) - done)
            self.say(
                f"[{phase}] {done}/{len(messages)} clients asked, {len(replies)} replied, "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}"
            )
        return replies

    def _metrics(self, reply: Message) -> dict:
        records = list(reply.content.metric_records.values())
        return clean_metrics(dict(records[0]), P.MAX_METRICS) if len(records) == 1 else {}

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, grid: Grid, minimum: int, timeout: float = 120.0, exact: bool = True) -> list[int]:
        """Wait for `minimum` connected nodes; take the first `minimum` (by id) when `exact`, else all that
        are connected then. Each gets a partition label 0, 1, ... in node-id order."""
        nodes = self._wait(grid, minimum, timeout)
        nodes = nodes[:minimum] if exact else nodes
        self.partition_of = {node: i for i, node in enumerate(nodes)}
        return nodes

    def _wait(self, grid: Grid, minimum: int, timeout: float = 120.0) -> list[int]:
        """The connected nodes, other than a teacher node, once there are `minimum` of them."""
        deadline = time.time() + timeout
        while len(nodes := sorted(n for n in grid.get_node_ids() if n != self.teacher_node)) < minimum:
            if time.time() > deadline:
                extra = " (plus the teacher's)" if self.teacher_node is not None else ""
                raise RunFailed(
                    f"only {len(nodes)} of the {minimum} SuperNodes{extra} connected; with `flwr run`, "
                    f"set the federation's num-supernodes to num-clients={minimum}"
                )
            time.sleep(0.5)
        return nodes

    # ------------------------------------------------------------------ phase 1: emulation
    def run_emulation(self, grid: Grid, node_ids: list[int], config: ConfigRecord) -> list[int]:
        """Local emulators (one message), or a federated emulator (checked averaging rounds, then
        installation). Returns the nodes whose emulator is ready."""
        t0 = time.time()
        kind = "federated" if self.federated_emulator else "local"
        self.say(f"[emulator] training {kind} emulators on {len(node_ids)} clients")
        asked = list(node_ids)
        if not self.federated_emulator:
            replies = self._emulator_round(
                grid,
                node_ids,
                config,
                {P.PHASE_STEPS: self.emulator_steps, P.MEASURE_FID: self.measure_fid, **self._pairing},
                {},
            )
        else:
            weights: dict[str, ArrayRecord] = {}
            splits = [len(part) for part in np.array_split(np.arange(self.emulator_steps), self.emulator_rounds)]
            for r, steps in enumerate(splits):
                replies = self._emulator_round(
                    grid, node_ids, config, {P.PHASE_STEPS: steps, P.RETURN_WEIGHTS: True, **self._pairing}, weights
                )
                weights, contributors = self._average_emulators(replies, weights)
                self._require("emulator", len(contributors), len(node_ids))
                self.say(f"[emulator] federated round {r + 1}/{len(splits)}: averaged {len(contributors)} emulators")
                node_ids = contributors
            replies = self._emulator_round(
                grid, node_ids, config, {P.PHASE_STEPS: 0, P.MEASURE_FID: self.measure_fid}, weights
            )
        self._require("emulator", len(replies), len(asked))
        for reply in replies:
            pid = self.partition_of[reply.metadata.src_node_id]
            self.emulator_metrics[pid] = {**self.emulator_metrics.get(pid, {}), **self._metrics(reply)}
            self.emulator_metrics[pid].pop(P.PARTITION_ID, None)
            self.say(
                f"[emulator] client {pid}: "
                + ", ".join(
                    f"{k} {self.emulator_metrics[pid][k]:.3f}"
                    for k in ("d-loss", "g-loss", "fid")
                    if k in self.emulator_metrics[pid]
                )
            )
        fids = [m["fid"] for m in self.emulator_metrics.values() if "fid" in m]
        self.say(
            f"[emulator] {len(replies)}/{len(asked)} clients done in {time.time() - t0:.0f}s"
            + (f", mean domain FID {np.mean(fids):.2f}" if fids else "")
        )
        return [r.metadata.src_node_id for r in replies]

    def _emulator_round(
        self, grid: Grid, node_ids: list[int], config: ConfigRecord, extra_config: dict, weights: dict[str, ArrayRecord]
    ) -> list[Message]:
        messages = [
            self._message(n, P.EMULATOR, {P.CONFIG: self._config_for_client(config, **extra_config), **weights})
            for n in node_ids
        ]
        return self._exchange_with_progress(grid, messages, "emulator")

    def _average_emulators(
        self,
        replies: list[Message],
        previous: dict[str, ArrayRecord],
    ) -> tuple[dict[str, ArrayRecord], list[int]]:
        """Uniform average of the checked emulator weights (clients' own sizes are not trusted here)."""
        keys = (P.GENERATOR, P.DISCRIMINATOR)
        cleaned: dict[int, dict[str, Arrays]] = {}
        for reply in replies:
            node, parts, reason = reply.metadata.src_node_id, {}, None
            for key in keys:
                record = reply.content.array_records.get(key)
                if record is None:
                    reason = f"no '{key}' weights"
                    break
                try:
                    arrays = {k: record[k].numpy() for k in record.keys()}
                except Exception as exc:  # noqa: BLE001
                    reason = f"'{key}' unreadable: {type(exc).__name__}"
                    break
                reference = self._emulator_reference(key, previous, replies)
                parts[key], reason = sanitize(arrays, reference)
                if reason:
                    reason = f"{key}: {reason}"
                    break
            if reason:
                self.fail("emulator", node, f"emulator weights refused: {reason}")
            else:
                cleaned[node] = parts
        averaged: dict[str, ArrayRecord] = {}
        nodes = sorted(cleaned, key=lambda n: self.partition_of.get(n, n))
        if not nodes:
            return previous, []
        for key in keys:
            center = {k: v.numpy() for k, v in previous[key].items()} if key in previous else None
            updates, scaled = bound_norms(
                [cleaned[n][key] for n in nodes], center, outlier_factor=self.norm_outlier_factor
            )
            for i, norm, bound in scaled:
                self.clipped.append(
                    {
                        "phase": "emulator",
                        "round": 0,
                        "node": nodes[i],
                        "partition": self.partition_of.get(nodes[i]),
                        "norm": norm,
                        "bound": bound,
                    }
                )
            mean = {k: np.mean(np.stack([u[k].astype(np.float64) for u in updates]), axis=0) for k in updates[0]}
            averaged[key] = ArrayRecord(
                {
                    k: Array(np.asarray(v))
                    for k, v in like_reference({k: np.asarray(v) for k, v in mean.items()}, updates[0]).items()
                }
            )
            for k, v in updates[0].items():  # floats back to their own width (like_reference rounds integers)
                if v.dtype.kind == "f":
                    averaged[key][k] = Array(np.asarray(mean[k], dtype=v.dtype))
        return averaged, nodes

    def _emulator_reference(
        self, key: str, previous: dict[str, ArrayRecord], replies: list[Message]
    ) -> dict[str, np.ndarray]:
        source = self.emulator_reference.get(key) or previous.get(key)
        if source is None:  # no reference given: the structure most replies share
            shapes: dict[str, int] = {}
            for reply in replies:
                record = reply.content.array_records.get(key)
                if record is not None:
                    sig = repr(sorted((k, tuple(record[k].shape), record[k].dtype) for k in record.keys()))
                    shapes[sig] = shapes.get(sig, 0) + 1
                    if shapes[sig] * 2 > len(replies):
                        source = record
                        break
        return {k: source[k].numpy() for k in source.keys()} if source is not None else {}

    # ------------------------------------------------------------------ phase 2: teacher queries
    def run_queries(self, grid: Grid, node_ids: list[int], config: ConfigRecord) -> None:
        """Ask every client for its query images, answer them through the oracle, send the answers back.

        With `query_teacher=False` (a reference that trains on labels, which never reads the teacher) the
        same round trip runs with a budget of 0: clients still register, and no query reaches the oracle.
        """
        t0 = time.time()
        ask = []
        scorer_round = self._phase_round - 1  # the global student after this round scores new queries
        for n in node_ids:
            key = self.key_of(n)
            left = max(0, self.query_budget - self.queries_used.get(key, 0))
            budget = left if self.query_teacher else 0
            records: dict = {}
            if self.query_digests.get(key):  # a resumed run re-delivers what was paid for
                budget = self.queries_used.get(key, 0)
                if key in self.query_rounds and self.query_rounds[key] in self.query_scorers:
                    records[P.ARRAYS] = self.query_scorers[self.query_rounds[key]]  # the student that chose them
            elif self._scores_queries(config) and scorer_round >= 1 and self._global is not None:
                records[P.ARRAYS] = self._global
            records[P.CONFIG] = self._config_for_client(config, **{P.BUDGET: budget})
            ask.append(self._message(n, P.QUERY, records))
        budgets = {m.metadata.dst_node_id: int(m.content[P.CONFIG][P.BUDGET]) for m in ask}
        scored = {m.metadata.dst_node_id for m in ask if P.ARRAYS in m.content.array_records}
        replies = self._exchange_with_progress(grid, ask, "query")
        answers: dict[int, ArrayRecord] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            entry = self._answer(node, reply, budgets[node])
            if node in scored:
                key = self.key_of(node)
                if entry["charged"]:  # newly chosen by the student of `scorer_round`: keep it for a resume
                    self.query_rounds[key] = scorer_round
                    self.query_scorers[scorer_round] = self._global
                entry["scored-by-round"] = self.query_rounds.get(key, scorer_round)
            self.query_log.append(entry)
            if entry.get("responses") is not None:
                answers[node] = entry.pop("responses")
            else:
                entry.pop("responses", None)
        self._require("query", len(answers), len(node_ids))
        messages = [
            self._message(n, P.ANSWERS, {P.ANSWERS_RECORD: rec, P.CONFIG: self._config_for_client(config)})
            for n, rec in answers.items()
        ]
        stored = 0
        for reply in self._exchange(grid, messages, "answers"):
            node = reply.metadata.src_node_id
            self.answered.add(node)
            stored += 1
        self._require("answers", stored, len(messages))
        total = sum(self.queries_used.values())
        if not self.query_teacher:
            self.say(f"[teacher] not queried (query_teacher=False): {len(self.answered)} clients registered")
        else:
            self.say(f"[teacher] answered {total} queries for {len(self.answered)} clients in {time.time() - t0:.0f}s")

    @staticmethod
    def _scores_queries(config: ConfigRecord | Mapping) -> bool:
        """Whether clients choose their queries by the global student's uncertainty (`query-selection`)."""
        return str(dict(config).get("query-selection", "random")) in P.SCORED_SELECTIONS

    def _answer(self, node: int, reply: Message, budget: int) -> dict:
        """Check one client's query reply, ask the oracle, and return a query-log entry (with the answers
        under "responses" when they may be sent)."""
        key = self.key_of(node)
        entry: dict = {
            "phase": "query",
            "node": node,
            "partition": self.partition_of[node],
            "asked": budget,
            "sent": 0,
            "answered": 0,
            "charged": 0,
            "redelivered": False,
            "responses": None,
        }
        images = _as_numpy(reply.content.array_records.get(P.QUERIES), P.IMAGES)
        if images is None:
            entry["reason"] = f"no '{P.QUERIES}/{P.IMAGES}' array in the reply"
            self.fail("query", node, entry["reason"])
            return entry
        entry["sent"] = int(images.shape[0]) if images.ndim else 0
        if images.ndim == 0 or entry["sent"] > budget:
            entry["reason"] = f"sent {entry['sent']} images, more than its budget of {budget}"
            self.fail("query", node, entry["reason"])
            return entry
        if not self.query_teacher:
            entry["responses"] = ArrayRecord({P.RESPONSES: Array(np.zeros((0, 0), dtype=np.float32))})
            self.example_cap[node] = max(1, entry["sent"])
            return entry
        digest = _digest(images)
        redelivery = self.query_digests.get(key) == digest
        left = self.query_budget - self.queries_used.get(key, 0)
        if not redelivery and entry["sent"] > left:
            entry["reason"] = (
                f"query refused: {entry['sent']} images but {max(left, 0)} of query-budget={self.query_budget} left"
            )
            self.fail("query", node, entry["reason"])
            return entry
        try:
            responses = self.oracle(key, torch.from_numpy(np.ascontiguousarray(images)))
            responses = np.asarray(
                responses.detach().cpu().numpy() if isinstance(responses, torch.Tensor) else responses, dtype=np.float32
            )
            if responses.ndim != 2 or responses.shape[0] != images.shape[0] or not np.isfinite(responses).all():
                raise ValueError(
                    f"oracle answered shape {responses.shape} for {images.shape[0]} images (or non-finite values)"
                )
        except Exception as exc:  # noqa: BLE001  (any oracle failure refuses this query, not the run)
            entry["reason"] = f"teacher refused the query: {type(exc).__name__}: {exc}"
            self.fail("query", node, entry["reason"])
            return entry
        entry["answered"] = int(len(responses))
        if redelivery:
            entry["redelivered"] = True
        else:
            entry["charged"] = entry["answered"]
            self.queries_used[key] = self.queries_used.get(key, 0) + entry["answered"]
            self.query_digests[key] = digest
        self.example_cap[node] = entry["answered"]
        entry["responses"] = ArrayRecord({P.RESPONSES: Array(responses)})
        return entry

    # ------------------------------------------------------------------ the run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        num_nodes: int | None = None,
        start_round: int = 1,
    ) -> Result:
        """Run the emulator and query phases, then rounds `start_round`..`num_rounds`.

        Parameters
        ----------
        grid : the ServerApp's Grid.
        initial_arrays : the global student to start from (a resumed run passes its last saved student).
        num_rounds : the last round to run.
        timeout : seconds to wait for the replies of one phase or round (`reply-timeout`).
        train_config, evaluate_config : run settings for the clients (filtered by `client_config_keys`).
        evaluate_fn : server-side evaluation `(round, arrays) -> MetricRecord`, before round 1 and after each.
        num_nodes : the number of clients: the first `num_nodes` nodes to connect (by node id) take part.
            Default: every node connected once `min_available_nodes` are.
        start_round : first round to run; > 1 resumes (after `load_state`), and round 0 is not evaluated again.

        Raises RunFailed when a phase or round falls below `min_reply_fraction`, or nothing is aggregated.
        """
        self.timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord(dict(train_config)) if evaluate_config is None else evaluate_config
        bind = getattr(self.oracle, "bind", None)
        if callable(bind):  # a teacher on its own node (strategies.teacher_node): find it, never sample it
            want = (num_nodes or self.min_available_nodes) + 1
            self._wait(grid, want)
            try:
                self.teacher_node = bind(grid, sorted(grid.get_node_ids()))
            except Exception as exc:  # noqa: BLE001  (one line, before any client is asked anything)
                raise RunFailed(f"teacher node: {exc}") from None
            self.say(f"[teacher] answering from node {self.teacher_node}")
        node_ids = (
            self.wait_for_nodes(grid, num_nodes)
            if num_nodes
            else self.wait_for_nodes(grid, self.min_available_nodes, exact=False)
        )
        self._phase_config = ConfigRecord(dict(train_config))
        if self.emulator_phase == "upfront" and self._scores_queries(train_config):
            self.say(
                f"[queries] query-selection={dict(train_config)['query-selection']} with upfront phases: no round "
                "has trained the student yet, so the clients choose at random (use emulator-phase=lazy with a "
                "sampled cohort)"
            )
        if self.emulator_phase == "upfront":
            self._prepare_clients(grid, node_ids, train_config)
        else:
            self.say(
                f"[lazy] {len(node_ids)} clients: each trains its emulator and queries the teacher the first "
                "time it is sampled"
            )
        t_start = time.time()
        result = Result()
        arrays = initial_arrays
        self._global = arrays

        def report(server_round: int, arrays: ArrayRecord) -> None:
            res = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if res is not None:
                result.evaluate_metrics_serverapp[server_round] = res
            record: dict = {"round": server_round, "elapsed-s": round(time.time() - t_start, 2)}
            if server_round > 0:
                record.update({f"train/{k}": v for k, v in (self._last_train or {}).items()})
                record.update({f"fed/{k}": v for k, v in (self._last_eval or {}).items()})
                record["rejected"] = len(self._round_rejections)
                record["failures"] = list(self._round_failures)
            record.update({f"server/{k}": v for k, v in (res or {}).items()})
            record["queries-used"] = sum(self.queries_used.values())
            self.last_round = server_round
            if self.on_round is not None:
                self.on_round(record, arrays)
            self._last_train = self._last_eval = None
            self._round_rejections, self._round_failures = [], []

        if start_round <= 1:
            self._round_failures = []
            report(0, arrays)
        for server_round in range(max(1, start_round), num_rounds + 1):
            self._round_failures = [f for f in self._round_failures if f["round"] == server_round]
            messages = list(self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid))
            replies = self._exchange(grid, messages, "train", server_round)
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            self._require("train", self._usable, len(messages), server_round)
            if new_arrays is None:
                raise RunFailed(f"train round {server_round}: nothing was aggregated (see the failures)")
            arrays = new_arrays
            result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid))
            replies = self._exchange(grid, messages, "evaluate", server_round)
            evaluated = self.aggregate_evaluate(server_round, replies)
            if evaluated is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluated
            report(server_round, arrays)
        result.arrays = arrays
        return result

    # ------------------------------------------------------------------ round hooks
    def _sample(
        self, server_round: int, fraction: float, minimum: int, salt: int, pool: Iterable[int] | None = None
    ) -> list[int]:
        """Seeded sampling over `pool` (default: the clients that hold answers), ordered by partition label."""
        eligible = sorted(self.answered if pool is None else pool, key=lambda n: self.partition_of.get(n, n))
        size = min(len(eligible), max(int(len(eligible) * fraction), minimum, 1))
        rng = random.Random(self.seed * 7_919 + server_round * 104_729 + salt)
        chosen = rng.sample(eligible, size)
        return sorted(chosen, key=lambda n: self.partition_of.get(n, n))

    def _configure(
        self,
        hook: Callable,
        message_type: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
    ) -> list[Message]:
        """Let the inner strategy build the round's messages for the sampled cohort, then make each one a
        checked message of our own (allowed config only, the node's own records)."""
        if not nodes:
            return []
        self._check_cohort(message_type, len(nodes))
        # The wrapped strategy sees only the settings a client may receive, so whatever it adds or
        # overwrites (FedProx's proximal-mu) is its own protocol with its clients and passes as it is.
        config = self._config_for_client(config, **{P.SERVER_ROUND: server_round})
        # Flower's strategies sample with the global `random`: seed it for this call only, so the same seed
        # gives the same rounds whatever the wrapped strategy is, and restore the caller's state after.
        saved = random.getstate()
        random.seed(self.seed * 7_919 + server_round * 104_729 + len(message_type))
        try:
            built = list(hook(server_round, arrays, config, _Cohort(nodes)))
        finally:
            random.setstate(saved)
        out = []
        for msg in built:
            node = msg.metadata.dst_node_id
            if node not in nodes:
                raise RuntimeError(f"{type(self.inner).__name__} addressed node {node}, outside the cohort")
            content = msg.content
            records = {name: content[name] for name in content.keys()}
            out.append(self._message(node, message_type, records))
        return out

    def _check_cohort(self, message_type: str, size: int) -> None:
        """Refuse, with one line, a cohort smaller than the wrapped strategy waits for: Flower's sampling
        would otherwise wait forever for nodes that a fixed cohort never gains."""
        train = message_type == P.TRAIN
        for layer in self._layers():
            for name in ("min_available_nodes", "min_train_nodes" if train else "min_evaluate_nodes"):
                want = getattr(layer, name, 0)
                if isinstance(want, int) and want > size:
                    raise RunFailed(
                        f"{type(layer).__name__}({name}={want}) needs more clients than the "
                        f"{size} eligible for this {'train' if train else 'evaluate'} round; "
                        f"lower it (MEKD samples the cohort itself: fraction_train, min_train_nodes)"
                    )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        if self.emulator_phase == "lazy":  # sample the whole population; newcomers get ready first
            nodes = self._sample(server_round, self.fraction_train, self.min_train_nodes, 0, self.partition_of)
            nodes = self.prepare(grid, nodes, server_round)
        else:
            nodes = self._sample(server_round, self.fraction_train, self.min_train_nodes, 0)
        return self._configure(self.inner.configure_train, P.TRAIN, server_round, arrays, config, nodes)

    def prepare(self, grid: Grid, nodes: list[int], server_round: int = 0) -> list[int]:
        """Lazy phases: the sampled clients that hold no answers yet train their emulator and query the
        teacher now. Returns the sampled clients that are ready; those whose phases failed sit this round
        out (and try again when sampled again). Fewer ready than `min_reply_fraction` of the sampled
        cohort raises RunFailed."""
        new = [n for n in nodes if n not in self.answered]
        if new:
            self._lenient, self._phase_round = True, server_round
            try:
                self._prepare_clients(grid, new, self._phase_config)
            finally:
                self._lenient, self._phase_round = False, 0
        ready = [n for n in nodes if n in self.answered]
        self._require("emulator and query phases of", len(ready), len(nodes), server_round)
        return ready

    @property
    def _pairing(self) -> dict:
        """The emulator messages' pairing key (paired emulators train on the client's answers)."""
        return {P.PAIRED: True} if self.emulator_pairing == "paired" else {}

    def _prepare_clients(self, grid: Grid, nodes: list[int], config: ConfigRecord) -> None:
        """The emulator and query phases for `nodes`, in the order the pairing needs; the clients that
        come through both are in `self.answered` (those eligible for rounds).

        Unpaired (the paper): emulators first (generated queries need G), then the queries of the clients
        whose emulator is ready. Paired: the queries first, then emulators trained on each client's own
        (answer, image) pairs; a client whose emulator fails is not eligible, though its queries stay
        counted (a later try is re-delivered the same answers without charge).
        """
        if self.emulator_pairing != "paired" or not self.train_emulators or not self.query_teacher:
            ready = self.run_emulation(grid, nodes, config) if self.train_emulators else nodes
            if ready:
                self.run_queries(grid, ready, config)
            return
        self.run_queries(grid, nodes, config)
        answered = [n for n in nodes if n in self.answered]
        if not answered:
            return
        self.answered -= set(answered) - set(self.run_emulation(grid, answered, config))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, 1)
        return self._configure(self.inner.configure_evaluate, P.EVALUATE, server_round, arrays, config, nodes)

    def check_update(self, reply: Message) -> tuple[Arrays | None, float | None, str | None]:
        """A reply's update in the global dtypes and its capped weight, or (None, None, why refused)."""
        content = reply.content
        if len(content.array_records) != 1:
            return None, None, f"expected 1 ArrayRecord, got {len(content.array_records)}"
        if len(content.metric_records) != 1:
            return None, None, f"expected 1 MetricRecord, got {len(content.metric_records)}"
        metrics = next(iter(content.metric_records.values()))
        weight, why = example_weight(
            metrics.get(self.weighted_by_key), self.example_cap.get(reply.metadata.src_node_id)
        )
        if why:
            return None, None, f"'{self.weighted_by_key}' {why}"
        record = next(iter(content.array_records.values()))
        try:
            arrays = {k: record[k].numpy() for k in record.keys()}
        except Exception as exc:  # noqa: BLE001
            return None, None, f"arrays unreadable: {type(exc).__name__}"
        if self._global is None:
            return arrays, weight, None
        clean, why = sanitize(arrays, {k: v.numpy() for k, v in self._global.items()})
        return clean, weight, why

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        entry = {
            "round": server_round,
            "node": node,
            "partition": self.partition_of.get(node),
            "reason": _short(reason),
        }
        self.rejected.append(entry)
        self._round_rejections.append(entry)
        self.fail("train", node, f"update rejected: {reason}", server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, bound and weigh each update, then let the inner strategy aggregate the survivors."""
        accepted: list[tuple[Message, Arrays, float]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._reject(server_round, node, f"client error: {msg.error.reason}")
                continue
            arrays, weight, reason = self.check_update(msg)
            if reason is not None:
                self._reject(server_round, node, reason)
            else:
                accepted.append((msg, arrays, weight))
        self._usable = len(accepted)
        if not accepted:
            return None, None
        accepted.sort(
            key=lambda item: self.partition_of.get(item[0].metadata.src_node_id, item[0].metadata.src_node_id)
        )
        center = {k: v.numpy() for k, v in self._global.items()} if self._global is not None else None
        bounded, scaled = bound_norms(
            [a for _, a, _ in accepted], center, max_norm=self.max_update_norm, outlier_factor=self.norm_outlier_factor
        )
        for i, norm, bound in scaled:
            node = accepted[i][0].metadata.src_node_id
            self.clipped.append(
                {
                    "phase": "train",
                    "round": server_round,
                    "node": node,
                    "partition": self.partition_of.get(node),
                    "norm": norm,
                    "bound": bound,
                }
            )
            self.say(
                f"[train {server_round}] client {self.partition_of.get(node)}: update of length {norm:.3g} "
                f"scaled down to {bound:.3g}"
            )
        metric_sets = [self._metrics(m) for m, _, _ in accepted]
        shared = set.intersection(*(set(m) for m in metric_sets)) - {P.PARTITION_ID}
        for (msg, _, weight), arrays, metrics in zip(accepted, bounded, metric_sets):
            kept = {k: metrics[k] for k in sorted(shared)}
            kept[self.weighted_by_key] = weight
            msg.content = RecordDict(
                {
                    self.arrayrecord_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord(kept),
                }
            )
        aggregated, metrics = self.inner.aggregate_train(server_round, [m for m, _, _ in accepted])
        if aggregated is None:
            return None, None
        reference = self._global if self._global is not None else accepted[0][0].content[self.arrayrecord_key]
        ref = {k: v.numpy() for k, v in reference.items()}
        arrays, why = sanitize(like_reference({k: aggregated[k].numpy() for k in aggregated.keys()}, ref), ref)
        if why:
            raise RunFailed(f"train round {server_round}: the aggregate is unusable ({why})")
        self._last_train = metrics
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client evaluation metrics, cleaned and weighted by at most the answers each client holds."""
        usable = []
        metric_sets = []
        for msg in replies:
            node = msg.metadata.src_node_id
            metrics = self._metrics(msg)
            weight, why = example_weight(metrics.get(self.weighted_by_key), self.example_cap.get(node))
            if why:
                self.fail("evaluate", node, f"metrics refused: '{self.weighted_by_key}' {why}", server_round)
                continue
            metrics[self.weighted_by_key] = weight
            usable.append(msg)
            metric_sets.append(metrics)
        if not usable:
            return None
        shared = set.intersection(*(set(m) for m in metric_sets)) - {P.PARTITION_ID}
        for msg, metrics in zip(usable, metric_sets):
            msg.content = RecordDict({"metrics": MetricRecord({k: metrics[k] for k in sorted(shared)})})
        metrics = self.inner.aggregate_evaluate(server_round, usable)
        self._last_eval = metrics
        return metrics

    # ------------------------------------------------------------------ after the run
    def request_samples(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, count: int, timeout: float = 600
    ) -> dict[str, np.ndarray] | None:
        """Ask the first client with answers for x, G(T(x)), G(S(x)) on `count` of its images."""
        if not self.answered or not self.train_emulators or not self.query_teacher or count <= 0:
            return None  # no emulator, or no teacher answers to show G(T(x)) for
        node = min(self.answered, key=lambda n: self.partition_of.get(n, n))
        message = self._message(
            node, P.SAMPLES, {P.ARRAYS: arrays, P.CONFIG: self._config_for_client(config, **{P.NUM_SAMPLES: count})}
        )
        saved, self.timeout = self.timeout, min(self.timeout, timeout)
        try:
            replies = self._exchange(grid, [message], "samples")
        finally:
            self.timeout = saved
        if not replies:
            return None
        record = replies[0].content.array_records.get(P.ARRAYS)
        out = {k: _as_numpy(record, k) for k in ("images", "g-teacher", "g-student")} if record is not None else {}
        if not out or any(v is None or v.dtype != np.uint8 or v.ndim != 4 for v in out.values()):
            self.fail("samples", node, "samples reply malformed")
            return None
        return out
