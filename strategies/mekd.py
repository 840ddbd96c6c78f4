"""`MEKD`: a Flower strategy that wraps another, as Flower's DP wrappers do, and adds a blind teacher.

Usable in any Flower project: give it an oracle (any callable `(client_key, uint8 images) -> soft outputs`)
and the strategy it wraps (FedAvg by default), and register `mekd_fl.client.handlers` on your ClientApp.

`MEKD.start` runs what MEKD adds, then hands the rounds to Flower's own `Strategy.start`, so an app keeps
Flower's log lines, its `Result` and its `evaluate_fn`:
1. the emulator and query phases (`strategies.phases`): each client trains its emulator GAN and buys its
   teacher answers, before round 1 (`upfront`) or when first sampled (`lazy`, from `configure_train`);
2. Flower's rounds. MEKD overrides only the hooks it changes: it samples the cohort among the clients
   holding answers and shows the wrapped strategy only that cohort (`configure_*`); it triages every
   reply, checks, bounds and weighs each update before the wrapped strategy aggregates (`aggregate_*`).

Trust is enforced in the units this class calls (docs/trust-model.md): `transport` (authenticated nodes,
the allow-list), `failures` (recorded, the minimum-reply rule), `ledger` (budgets), `checked_updates`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.supercore import log

from strategies import protocol as P
from strategies.checked_updates import check_update, rebuild
from strategies.divergence import DivergenceWatch
from strategies.failures import Failures, short
from strategies.ledger import Oracle, QueryLedger
from strategies.phases import EmulatorPlan, Phases
from strategies.round_report import round_record, shift_rounds
from strategies.sampling import Cohort, round_seed, sample, seeded_global_random
from strategies.transport import NodeRecords, RoundGrid, Transport
from strategies.updates import Arrays, bound_norms, distance, example_weight, like_reference, sanitize
from strategies.wrapped import check_cohort, check_keys, check_names

RoundCallback = Callable[[dict, ArrayRecord], None]
EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


class MEKD(Strategy):
    """Federated distillation of a student from a blind teacher through the clients' emulators.

    Parameters
    ----------
    oracle : callable (client_key, uint8 images) -> soft outputs (tensor or numpy). Raising refuses the
        query; the client is told nothing but that it failed, and the failure is recorded.
    strategy : the Flower strategy that aggregates the checked updates and configures the round messages
        (FedAvg by default). It sees only MEKD's sampled cohort, within which it samples with its own
        fraction. A key it sends its clients that MEKD's client does not honour is refused at start.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key : as in Flower's FedAvg; MEKD samples the cohort with them, among the clients that
        hold answers, and caps `weighted_by_key` by the answers each client holds.
    emulator_phase : "upfront" (every client trains its emulator and queries the teacher before round 1,
        the paper's protocol) or "lazy" (the first time a client is sampled; not with a federated
        emulator): the cost of a run then follows the clients that take part, not the population.
    emulator_pairing : "paired" (queries first, then G learns to map each client's answers back to its
        images: G inverts the teacher), "none" (the paper: unconditional GANs, trained before the queries;
        what clients that send emulator samples as queries need) or "auto" (the default: paired, except with
        a federated emulator, whose average of paired Gs would carry other clients' answers to every
        client). Why paired: the paper's G does not emulate (a fidelity consistency near chance; issue 22).
    query_budget : images each client may send to the teacher (enforced here and by the oracle).
    query_teacher : False for a reference that trains on labels: the query round trip only registers
        the clients, with a budget of 0, and the oracle is never called.
    train_emulators : run the emulator phase (False when neither the method nor the queries use G).
    federated_emulator : average generators and discriminators across clients over `emulator_rounds`
        rounds that split `emulator_steps` between them, instead of keeping each emulator local.
    emulator_reference : keys, shapes and dtypes of the emulator weights (fresh weights are fine; they are
        never sent), to check what clients return in a federated emulator.
    measure_fid : ask clients for their emulator's domain FID (computed on the client; nothing is sent for it).
    client_config_keys : the only run settings a client may receive (plus `protocol.STRATEGY_KEYS`);
        None sends the config as given.
    node_records : (node id, partition label) -> extra records for every message to that node.
    max_update_norm, norm_outlier_factor : bounds on an update's distance from the global model
        (absolute; and times the round's median distance); longer updates are scaled down. 0 = off.
    min_reply_fraction : fewest usable replies a phase or round accepts, as a fraction of the clients
        asked (at least one); fewer raises RunFailed.
    seed : seeds client sampling, so the same seed gives the same rounds.
    on_round : called after each round's evaluation with one flat dict of that round's metrics and
        the global student (to save it).
    failures_listed_in : where a stopped run's failures can be read (named in RunFailed's message).
    """

    def __init__(
        self,
        oracle: Oracle,
        *,
        strategy: Strategy | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = P.NUM_EXAMPLES,
        query_budget: int = 100_000,
        query_teacher: bool = True,
        train_emulators: bool = True,
        federated_emulator: bool = False,
        emulator_rounds: int = 4,
        emulator_steps: int = 150,
        emulator_reference: Mapping[str, ArrayRecord] | None = None,
        measure_fid: bool = False,
        client_config_keys: Iterable[str] | None = None,
        node_records: NodeRecords | None = None,
        max_update_norm: float = 0.0,
        norm_outlier_factor: float = 2.0,
        min_reply_fraction: float = 0.5,
        emulator_phase: str = "upfront",
        emulator_pairing: str = "auto",
        seed: int = 0,
        on_round: RoundCallback | None = None,
        log_fn: Callable[[str], None] = print,
        failures_listed_in: str = "MEKD.failures.entries",
    ) -> None:
        for name, value in (("max_update_norm", max_update_norm), ("norm_outlier_factor", norm_outlier_factor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: accepted: a finite number >= 0")
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_train_nodes, self.min_evaluate_nodes = min_train_nodes, min_evaluate_nodes
        self.min_available_nodes, self.weighted_by_key = min_available_nodes, weighted_by_key
        self.strategy: Strategy = (
            strategy
            if strategy is not None
            else FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, weighted_by_key=weighted_by_key)
        )
        check_names(self.strategy, weighted_by_key)
        self.oracle = oracle
        self.max_update_norm, self.norm_outlier_factor = float(max_update_norm), float(norm_outlier_factor)
        self.seed, self.on_round, self.say = seed, on_round, log_fn
        self.ledger = QueryLedger(query_budget, query_teacher)
        self.transport = Transport(
            Failures(min_reply_fraction, log_fn, lambda n: self.transport.partition_of.get(n), failures_listed_in),
            log_fn,
            client_config_keys,
            node_records,
        )
        self.failures = self.transport.failures
        self.rejected: list[dict] = []  # updates refused (kept for reports)
        self.clipped: list[dict] = []  # updates scaled down to the norm bound
        plan = EmulatorPlan(train_emulators, federated_emulator, emulator_rounds, emulator_steps, emulator_pairing)
        plan.measure_fid, plan.reference, plan.phase = measure_fid, dict(emulator_reference or {}), emulator_phase
        plan.check()
        self.phases = Phases(
            self.transport, self.failures, self.ledger, oracle, plan, self.norm_outlier_factor, self.clipped
        )
        self.watch = DivergenceWatch()
        self.last_round = 0
        self._offset = 0  # rounds already done before this `start` (a resumed run)
        self._config = ConfigRecord()  # the run's train config: lazy phases use it
        self._global: ArrayRecord | None = None
        self._asked: dict[str, list[Message]] = {P.TRAIN: [], P.EVALUATE: []}  # the round's messages sent
        self._last: dict[str, MetricRecord | None] = {"train": None, "fed": None}
        self._t0 = time.time()

    # ------------------------------------------------------------------ what Flower's loop calls
    def summary(self) -> None:
        teacher = "" if self.ledger.query_teacher else " (teacher not queried)"
        log(INFO, "\t├──> MEKD: emulators=%s, phases %s, query budget=%d per client%s", self.phases.plan.train,
            self.phases.plan.phase, self.ledger.query_budget, teacher)  # fmt: skip
        log(INFO, "\t└──> wrapping %s:", type(self.strategy).__name__)
        self.strategy.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        num_nodes: int | None = None,
        start_round: int = 1,
    ) -> Result:
        """Find the clients, run the upfront phases, then Flower's `Strategy.start` for the rounds.

        Beyond Flower's parameters: `num_nodes`, the number of clients (the first `num_nodes` nodes to
        connect, by node id, take part; default: every node connected once `min_available_nodes` are);
        `start_round` > 1 resumes after `load_state` (Flower's loop then counts its rounds from 1, and
        MEKD's hooks, `Result` and `on_round` use the run's own round numbers). Raises RunFailed when a
        phase or round falls below `min_reply_fraction`.
        """
        self.transport.timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord(dict(train_config)) if evaluate_config is None else evaluate_config
        self.transport.bind_teacher(grid, self.oracle, (num_nodes or self.min_available_nodes) + 1)
        wanted = num_nodes or self.min_available_nodes
        nodes = self.transport.wait_for_nodes(grid, wanted, exact=bool(num_nodes))
        check_keys(self.strategy, initial_arrays, self.transport.client_config(train_config, **{P.SERVER_ROUND: 1}))
        self._config, self._global = ConfigRecord(dict(train_config)), initial_arrays
        if self.phases.plan.phase == "upfront":
            self.phases.prepare_upfront(grid, nodes, self._config)
        else:
            self.say(
                f"[lazy] {len(nodes)} clients: each trains its emulator and queries the teacher when first sampled"
            )
        self._offset, self._t0 = max(0, start_round - 1), time.time()
        self.failures.current = []
        report = self._reporter(evaluate_fn) if (evaluate_fn or self.on_round) else None
        rounds = max(0, num_rounds - self._offset)
        rounds_grid = RoundGrid(grid, self.transport)  # Flower's loop, waiting only for replies still due
        result = super().start(rounds_grid, initial_arrays, rounds, timeout, train_config, evaluate_config, report)
        shift_rounds(result, self._offset)
        if result.arrays is None or not list(result.arrays.keys()):  # no round aggregated anything usable
            result.arrays = initial_arrays
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        server_round += self._offset
        self._global = arrays
        lost, self.transport.lost = sorted(self.transport.lost & self.ledger.answered, key=self.transport.label), set()
        if lost:  # restarted nodes (or liars, bounded): ready again before this round samples its cohort
            self.phases.reprepare(grid, lost, self._config, arrays, server_round)
        pool = self.transport.partition_of if self.phases.plan.phase == "lazy" else self.ledger.answered
        nodes = self._sample(server_round, self.fraction_train, self.min_train_nodes, 0, pool)
        if self.phases.plan.phase == "lazy":  # newcomers get ready first
            nodes = self.prepare(grid, nodes, server_round)
        return self._configure(self.strategy.configure_train, P.TRAIN, server_round, arrays, config, nodes)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        server_round += self._offset
        nodes = self._sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, 1, self.ledger.answered)
        return self._configure(self.strategy.configure_evaluate, P.EVALUATE, server_round, arrays, config, nodes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Triage, check, bound and weigh each update, then let the wrapped strategy aggregate the survivors.

        An unusable aggregate (non-finite, impossible BatchNorm statistics) is recorded as a failure and
        the round keeps the previous global model; too few usable updates raise RunFailed."""
        server_round += self._offset
        asked, self._asked[P.TRAIN] = self._asked[P.TRAIN], []
        replies = self.transport.triage(asked, replies, "train", server_round) if asked else list(replies)
        center = {k: v.numpy() for k, v in self._global.items()} if self._global is not None else None
        accepted: list[tuple[Message, Arrays, float]] = []
        for msg in replies:  # the global model is decoded once per round, not once per reply
            cap = self.ledger.example_cap.get(msg.metadata.src_node_id)
            arrays, weight, reason = check_update(msg, center, cap, self.weighted_by_key)
            if reason is not None:
                self._reject(server_round, msg.metadata.src_node_id, reason)
            else:
                accepted.append((msg, arrays, weight))
        if asked:  # inside Flower's loop; a direct call (tests, a user's own loop) judges nothing
            self.failures.require("train", len(accepted), len(asked), server_round)
        if not accepted:
            return None, None
        accepted.sort(key=lambda item: self.transport.label(item[0].metadata.src_node_id))
        norms = [distance(a, center) for _, a, _ in accepted] if center is not None else None
        bounded, scaled = bound_norms(
            [a for _, a, _ in accepted],
            center,
            max_norm=self.max_update_norm,
            outlier_factor=self.norm_outlier_factor,
            norms=norms,
        )
        for i, norm, bound in scaled:
            node = accepted[i][0].metadata.src_node_id
            label = self.transport.partition_of.get(node)
            self.clipped.append(
                {
                    "phase": "train",
                    "round": server_round,
                    "node": node,
                    "partition": label,
                    "norm": norm,
                    "bound": bound,
                }
            )
            self.say(f"[train {server_round}] client {label}: update of length {norm:.3g} scaled down to {bound:.3g}")
        replies = [m for m, _, _ in accepted]
        metric_sets = [self.transport.metrics(m) for m in replies]
        rebuild(replies, bounded, [w for _, _, w in accepted], metric_sets, self.weighted_by_key)
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        for line in self.watch.observe_round(server_round, norms or [], center, len(scaled), metrics):
            self.say(line)
        if aggregated is None:
            return None, None
        ref = center if center is not None else accepted[0][1]
        arrays, why = sanitize(like_reference({k: aggregated[k].numpy() for k in aggregated.keys()}, ref), ref)
        if why:
            self.failures.record(
                "train", None, f"aggregate refused, the round keeps the previous model: {why}", server_round
            )
            return None, metrics
        self._last["train"] = metrics
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client evaluation metrics, checked (finite numbers, in range where the range is known) and weighted
        by at most the answers each client holds; a client whose metrics are refused is a recorded failure."""
        server_round += self._offset
        asked, self._asked[P.EVALUATE] = self._asked[P.EVALUATE], []
        replies = self.transport.triage(asked, replies, "evaluate", server_round) if asked else list(replies)
        usable, metric_sets = [], []
        for msg in replies:
            metrics, why = self.transport.checked_metrics(msg)
            cap = self.ledger.example_cap.get(msg.metadata.src_node_id)
            weight, bad = (None, None) if why else example_weight(metrics.get(self.weighted_by_key), cap)
            why = why or (f"'{self.weighted_by_key}' {bad}" if bad else None)
            if why is not None or weight is None:
                self.failures.record("evaluate", msg.metadata.src_node_id, f"metrics refused: {why}", server_round)
                continue
            metrics[self.weighted_by_key] = weight
            usable.append(msg)
            metric_sets.append(metrics)
        self.last_round = server_round
        if not usable:
            return None
        shared = set.intersection(*(set(m) for m in metric_sets)) - {P.PARTITION_ID}
        for msg, metrics in zip(usable, metric_sets):
            msg.content = RecordDict({P.METRICS: MetricRecord({k: metrics[k] for k in sorted(shared)})})
        self._last["fed"] = self.strategy.aggregate_evaluate(server_round, usable)
        return self._last["fed"]

    # ------------------------------------------------------------------ the hooks' parts
    def prepare(self, grid: Grid, nodes: list[int], server_round: int = 0) -> list[int]:
        """Lazy phases for a sampled cohort; the clients that are ready (see `Phases.prepare_cohort`)."""
        return self.phases.prepare_cohort(grid, nodes, self._config, self._global, server_round)

    def _sample(
        self, server_round: int, fraction: float, minimum: int, salt: int, pool: Iterable[int] | None = None
    ) -> list[int]:
        """Seeded sampling over `pool` (default: the clients that hold answers), ordered by partition label."""
        pool = self.ledger.answered if pool is None else pool
        return sample(pool, fraction, minimum, round_seed(self.seed, server_round, salt), self.transport.label)

    def _configure(
        self,
        hook: Callable,
        message_type: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list,
    ) -> list[Message]:
        """Let the wrapped strategy build the round's messages for the sampled cohort, then make each one a
        checked message of our own (allowed config only, the node's own records)."""
        if not nodes:
            return []
        check_cohort(self.strategy, message_type == P.TRAIN, len(nodes))
        # The wrapped strategy sees only the settings a client may receive, so whatever it adds or
        # overwrites (FedProx's proximal-mu, checked at start) passes as it is.
        config = self.transport.client_config(config, **{P.SERVER_ROUND: server_round})
        with seeded_global_random(round_seed(self.seed, server_round, len(message_type))):
            built = list(hook(server_round, arrays, config, Cohort(nodes)))
        out = []
        for msg in built:
            node = msg.metadata.dst_node_id
            if node not in nodes:
                raise RuntimeError(f"{type(self.strategy).__name__} addressed node {node}, outside the cohort")
            out.append(
                self.transport.message(node, message_type, {name: msg.content[name] for name in msg.content.keys()})
            )
        self._asked[message_type] = out  # Flower sets their ids as it sends them: replies are matched by id
        return out

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        label = self.transport.partition_of.get(node)
        self.rejected.append({"round": server_round, "node": node, "partition": label, "reason": short(reason)})
        self.failures.record("train", node, f"update rejected: {reason}", server_round)

    def _reporter(self, evaluate_fn: EvaluateFn | None) -> EvaluateFn:
        """Flower's `evaluate_fn`, wrapped: after it, one flat record of the round for `on_round`."""

        def report(relative_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            server_round = relative_round + self._offset if relative_round else 0
            if relative_round == 0 and self._offset:
                return None  # a resumed run: round 0 was evaluated before the kill
            res = evaluate_fn(server_round, arrays) if evaluate_fn else None
            rejected = sum(1 for r in self.rejected if r["round"] == server_round)
            elapsed, failures = time.time() - self._t0, self.failures.current
            record = round_record(server_round, elapsed, self._last, rejected, failures, res, self.ledger.total)
            self.last_round = server_round
            if self.on_round is not None:
                self.on_round(record, arrays)
            self._last = {"train": None, "fed": None}
            self.failures.current = []
            return res

        return report

    # ------------------------------------------------------------------ resume and samples
    def state(self) -> dict:
        """What a resumed run needs from this strategy (saved beside the student)."""
        return {"round": self.last_round, **self.ledger.state(), "rejected": list(self.rejected),
                "clipped": list(self.clipped), "failures": list(self.failures.entries)}  # fmt: skip

    def load_state(self, state: Mapping) -> None:
        self.last_round = int(state.get("round", 0))
        self.ledger.load_state(state)
        self.rejected[:] = list(state.get("rejected", []))
        self.clipped[:] = list(state.get("clipped", []))
        self.failures.entries = list(state.get("failures", []))

    def request_samples(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, count: int, timeout: float = 600
    ) -> dict[str, np.ndarray] | None:
        """x, G(T(x)), G(S(x)) on `count` images of the client holding the most answers (see `Phases.samples`)."""
        return self.phases.samples(grid, arrays, config, count, timeout)
