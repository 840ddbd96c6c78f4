"""The emulator and query phases: each client trains its emulator and buys its teacher answers.

Why a unit of its own: these phases are what MEKD adds to a Flower strategy's rounds, and clients
cannot call the server, so each is a server-driven round trip. They run for every client before
round 1 (`upfront`, the paper's protocol) or for the clients of a round's cohort the first time they
are sampled (`lazy`: a run's cost follows the clients that take part). The clients that come
through both are in `ledger.answered`, the pool every round samples from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import protocol as P
from strategies.emulator_average import average_emulators
from strategies.failures import Failures
from strategies.ledger import Oracle, QueryLedger, client_key
from strategies.transport import Transport

#: When a client trains its emulator and queries the teacher: all before round 1 (the paper's protocol),
#: or the first time it is sampled (large populations: a run's cost follows the clients that take part).
PHASES = ("upfront", "lazy")
PAIRINGS = ("auto", "none", "paired")


@dataclass
class EmulatorPlan:
    """How the emulator phase runs (see `MEKD`'s parameters of the same names)."""

    train: bool = True
    federated: bool = False
    rounds: int = 4
    steps: int = 200
    pairing: str = "auto"
    measure_fid: bool = False
    reference: Mapping[str, ArrayRecord] = field(default_factory=dict)

    phase: str = "upfront"

    def check(self) -> None:
        """Refuse, in one line, a plan that cannot run."""
        if self.pairing not in PAIRINGS:
            raise ValueError(f"emulator_pairing={self.pairing!r}: accepted: {', '.join(PAIRINGS)}")
        if self.phase not in PHASES:
            raise ValueError(f"emulator_phase={self.phase!r}: accepted: {', '.join(PHASES)}")
        if self.phase == "lazy" and self.federated:
            raise ValueError(
                "emulator_phase='lazy' with federated_emulator=True is not accepted: averaging "
                "emulators needs every client at once (use emulator_phase='upfront')"
            )
        self.rounds = max(1, self.rounds)
        if self.pairing == "auto":  # a federated G trained on pairs would carry other clients' answers
            self.pairing = "none" if self.federated else "paired"

    @property
    def paired(self) -> dict:
        """The emulator messages' pairing key (paired emulators train on the client's answers)."""
        return {P.PAIRED: True} if self.pairing == "paired" else {}


def scores_queries(config: ConfigRecord | Mapping) -> bool:
    """Whether clients choose their queries by the global student's uncertainty (`query-selection`)."""
    return str(dict(config).get("query-selection", "random")) in P.SCORED_SELECTIONS


class Phases:
    """Runs the emulator and query phases over `transport`, charging `ledger`, recording `failures`."""

    def __init__(
        self,
        transport: Transport,
        failures: Failures,
        ledger: QueryLedger,
        oracle: Oracle,
        plan: EmulatorPlan,
        outlier_factor: float,
        clipped: list[dict],
    ) -> None:
        self.transport, self.failures, self.ledger, self.oracle = transport, failures, ledger, oracle
        self.plan = plan
        self.outlier_factor = outlier_factor
        self.clipped = clipped  # shared with the rounds: every update scaled down, of any phase
        self.emulator_metrics: dict[int, dict] = {}
        self.seconds = {"emulator": 0.0, "query": 0.0}  # time in each phase, over the run (summaries, benchmarks)
        self.installed: dict[str, ArrayRecord] = {}  # the federated emulator every client got (re-preparation)
        self.reprepared: dict[int, int] = {}  # node -> times it was prepared again after losing its state
        self.say = transport.say

    # ------------------------------------------------------------------ both phases
    def prepare(
        self, grid: Grid, nodes: list[int], config: ConfigRecord, scorer: ArrayRecord | None = None, at: int = 0
    ) -> None:
        """The emulator and query phases for `nodes`, in the order the pairing needs; the clients that
        come through both join `ledger.answered`. `scorer`: the global student after round `at - 1`
        (lazy phases of round `at`), sent with the queries when the clients choose by uncertainty.

        Unpaired (the paper): emulators first (generated queries need G), then the queries of the clients
        whose emulator is ready. Paired: the queries first, then emulators trained on each client's own
        (answer, image) pairs; a client whose emulator fails is not eligible, though its queries stay
        counted (a later try is re-delivered the same answers without charge).
        """
        plan = self.plan
        if plan.pairing != "paired" or not plan.train or not self.ledger.query_teacher:
            ready = self.run_emulation(grid, nodes, config) if plan.train else nodes
            if ready:
                self.run_queries(grid, ready, config, scorer, at)
            return
        self.run_queries(grid, nodes, config, scorer, at)
        answered = [n for n in nodes if n in self.ledger.answered]
        if answered:
            self.ledger.answered -= set(answered) - set(self.run_emulation(grid, answered, config))

    # ------------------------------------------------------------------ emulators
    def run_emulation(self, grid: Grid, node_ids: list[int], config: ConfigRecord) -> list[int]:
        """Local emulators (one message), or a federated emulator (checked averaging rounds, then
        installation). Returns the nodes whose emulator is ready."""
        t0, plan, asked = time.time(), self.plan, list(node_ids)
        self.say(f"[emulator] training {'federated' if plan.federated else 'local'} emulators on {len(asked)} clients")
        if not plan.federated:
            replies = self._round(grid, node_ids, config, {P.PHASE_STEPS: plan.steps, P.MEASURE_FID: plan.measure_fid})
        else:
            weights: dict[str, ArrayRecord] = {}
            splits = [len(part) for part in np.array_split(np.arange(plan.steps), plan.rounds)]
            for r, steps in enumerate(splits):
                extra = {P.PHASE_STEPS: steps, P.RETURN_WEIGHTS: True}
                weights, node_ids = self._average(self._round(grid, node_ids, config, extra, weights), weights)
                self.failures.require("emulator", len(node_ids), len(asked))
                self.say(f"[emulator] federated round {r + 1}/{len(splits)}: averaged {len(node_ids)} emulators")
            extra = {P.PHASE_STEPS: 0, P.MEASURE_FID: plan.measure_fid}
            self.installed = weights
            replies = self._round(grid, node_ids, config, extra, weights, paired=False)
        self.failures.require("emulator", len(replies), len(asked))
        for reply in replies:
            pid = self.transport.partition_of[reply.metadata.src_node_id]
            metrics = {**self.emulator_metrics.get(pid, {}), **self.transport.metrics(reply)}
            metrics.pop(P.PARTITION_ID, None)
            self.emulator_metrics[pid] = metrics
            shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("d-loss", "g-loss", "fid") if k in metrics)
            self.say(f"[emulator] client {pid}: {shown}")
        fids = [m["fid"] for m in self.emulator_metrics.values() if "fid" in m]
        self.seconds["emulator"] += time.time() - t0
        self.say(
            f"[emulator] {len(replies)}/{len(asked)} clients done in {time.time() - t0:.0f}s"
            + (f", mean domain FID {np.mean(fids):.2f}" if fids else "")
        )
        return [r.metadata.src_node_id for r in replies]

    def _round(
        self,
        grid: Grid,
        nodes: list[int],
        config: ConfigRecord,
        extra: dict,
        weights: dict[str, ArrayRecord] | None = None,
        paired: bool = True,
    ) -> list[Message]:
        extra = {**extra, **(self.plan.paired if paired else {})}
        records = {P.CONFIG: self.transport.client_config(config, **extra), **(weights or {})}
        messages = [self.transport.message(n, P.EMULATOR, records) for n in nodes]
        return self.transport.exchange_with_progress(grid, messages, "emulator")

    def _average(
        self, replies: list[Message], previous: dict[str, ArrayRecord]
    ) -> tuple[dict[str, ArrayRecord], list[int]]:
        """Uniform average of the checked emulator weights; refusals and scalings are recorded."""
        label = self.transport.label
        averaged, nodes, refused, scaled = average_emulators(
            replies, previous, self.plan.reference, self.outlier_factor, label
        )
        for node, reason in refused:
            self.failures.record("emulator", node, reason)
        for _key, node, norm, bound in scaled:
            entry = {"phase": "emulator", "round": 0, "node": node, "partition": self.transport.partition_of.get(node)}
            self.clipped.append({**entry, "norm": norm, "bound": bound})
        return averaged, nodes

    # ------------------------------------------------------------------ teacher queries
    def run_queries(
        self, grid: Grid, node_ids: list[int], config: ConfigRecord, scorer: ArrayRecord | None = None, at: int = 0
    ) -> None:
        """Ask every client for its query images, answer them through the oracle, send the answers back.

        With `query_teacher=False` (a reference that trains on labels, which never reads the teacher) the
        same round trip runs with a budget of 0: clients still register, and no query reaches the oracle.
        """
        t0, ledger, transport = time.time(), self.ledger, self.transport
        scorer_round = at - 1  # the global student after this round scores new queries
        ask, budgets, scored = [], {}, set()
        for n in node_ids:
            key = client_key(transport.partition_of[n])
            budgets[n], redelivery = ledger.budget_for(key)
            records: dict = {}
            if redelivery:  # a resumed run re-delivers what was paid for, to the student that chose it
                if key in ledger.query_rounds and ledger.query_rounds[key] in ledger.query_scorers:
                    records[P.ARRAYS] = ledger.query_scorers[ledger.query_rounds[key]]
            elif scores_queries(config) and scorer_round >= 1 and scorer is not None:
                records[P.ARRAYS] = scorer
            if P.ARRAYS in records:
                scored.add(n)
            records[P.CONFIG] = transport.client_config(config, **{P.BUDGET: budgets[n]})
            ask.append(transport.message(n, P.QUERY, records))
        answers: dict[int, ArrayRecord] = {}
        for reply in transport.exchange_with_progress(grid, ask, "query"):
            node = reply.metadata.src_node_id
            key = client_key(transport.partition_of[node])
            images = _images(reply.content.array_records.get(P.QUERIES))
            entry = ledger.answer(key, node, images, budgets[node], self.oracle)
            entry["partition"] = transport.partition_of[node]
            if "reason" in entry:
                self.failures.record("query", node, entry["reason"])
            if node in scored:
                if entry["charged"]:  # newly chosen by the student of `scorer_round`: keep it for a resume
                    ledger.query_rounds[key] = scorer_round
                    ledger.query_scorers[scorer_round] = scorer
                entry["scored-by-round"] = ledger.query_rounds.get(key, scorer_round)
            responses = entry.pop("responses")
            ledger.log.append(entry)
            if responses is not None:
                answers[node] = responses
        self.failures.require("query", len(answers), len(node_ids))

        def deliver(nodes: list[int]) -> list[Message]:
            records = {P.CONFIG: transport.client_config(config)}
            messages = [transport.message(n, P.ANSWERS, {P.ANSWERS_RECORD: answers[n], **records}) for n in nodes]
            return transport.exchange(grid, messages, "answers")

        stored = deliver(list(answers))
        # paid for but not stored (the client crashed): sent once more in fresh messages, never charged
        # twice; a node that timed out is not asked again (another reply-timeout)
        crashed = transport.errored & (set(answers) - {reply.metadata.src_node_id for reply in stored})
        if crashed:
            stored += deliver(sorted(crashed, key=transport.label))
        for reply in stored:
            ledger.delivered(client_key(transport.partition_of[reply.metadata.src_node_id]))
        ledger.answered |= {reply.metadata.src_node_id for reply in stored}
        self.failures.require("answers", len(stored), len(answers))
        self.seconds["query"] += time.time() - t0
        if not ledger.query_teacher:
            self.say(f"[teacher] not queried (query_teacher=False): {len(ledger.answered)} clients registered")
        else:
            took = time.time() - t0
            self.say(f"[teacher] answered {ledger.total} queries for {len(ledger.answered)} clients in {took:.0f}s")

    # ------------------------------------------------------------------ a node that lost its state
    def reprepare(
        self, grid: Grid, nodes: list[int], config: ConfigRecord, scorer: ArrayRecord | None = None, at: int = 0
    ) -> list[int]:
        """Prepare again the nodes that said they hold no emulator and answers although they were
        delivered (`P.STATE_LOST`: a SuperNode that restarted keeps its node id but not its memory).

        Each trains its emulator again (or, with a federated emulator, is given the run's average, not a
        new average over the few that came back) and sends its queries again: the same images it paid
        for are answered again without a second charge (`QueryLedger.budget_for`); other images are
        refused. At most `P.MAX_REPREPARE` times per node and run, so a client that keeps saying it lost
        its state only costs its own failures. Returns the nodes that are ready again."""
        nodes = [n for n in nodes if self.reprepared.get(n, 0) < P.MAX_REPREPARE]
        if not nodes:
            return []
        for n in nodes:
            self.reprepared[n] = self.reprepared.get(n, 0) + 1
        self.ledger.answered -= set(nodes)
        labels = ", ".join(str(self.transport.label(n)) for n in nodes)
        self.say(f"[rejoin] clients {labels} lost their emulator and answers (node restarted?): preparing them again")
        self.failures.lenient = True  # judged by the rounds, not here
        try:
            if self.plan.federated and self.installed and self.plan.train:
                self._reinstall(grid, nodes, config, scorer, at)
            else:
                self.prepare(grid, nodes, config, scorer, at)
        finally:
            self.failures.lenient = False
        ready = [n for n in nodes if n in self.ledger.answered]
        self.say(f"[rejoin] {len(ready)}/{len(nodes)} clients ready again")
        return ready

    def _reinstall(
        self, grid: Grid, nodes: list[int], config: ConfigRecord, scorer: ArrayRecord | None, at: int
    ) -> None:
        """A federated emulator's re-preparation: the run's averaged emulator installed (no training), and
        the queries sent again, in the order the pairing needs."""

        def install(targets: list[int]) -> list[int]:
            replies = self._round(grid, targets, config, {P.PHASE_STEPS: 0}, self.installed, paired=False)
            return [r.metadata.src_node_id for r in replies]

        if self.plan.pairing == "paired":
            self.run_queries(grid, nodes, config, scorer, at)
            answered = [n for n in nodes if n in self.ledger.answered]
            self.ledger.answered -= set(answered) - set(install(answered) if answered else [])
        elif ready := install(nodes):
            self.run_queries(grid, ready, config, scorer, at)

    # ------------------------------------------------------------------ upfront, lazy, samples
    def prepare_upfront(self, grid: Grid, nodes: list[int], config: ConfigRecord) -> None:
        """Every client's phases before round 1 (the paper's protocol)."""
        if scores_queries(config):
            self.say(
                f"[queries] query-selection={dict(config)['query-selection']} with upfront phases: no round has "
                "trained the student yet, so the clients choose at random (use emulator-phase=lazy)"
            )
        self.prepare(grid, nodes, config)

    def prepare_cohort(
        self, grid: Grid, nodes: list[int], config: ConfigRecord, scorer: ArrayRecord | None, server_round: int
    ) -> list[int]:
        """Lazy phases: the sampled clients that hold no answers yet train their emulator and query the
        teacher now. Returns the sampled clients that are ready; those whose phases failed sit this round
        out (and try again when sampled again). Fewer ready than `min_reply_fraction` of the sampled
        cohort raises RunFailed."""
        new = [n for n in nodes if n not in self.ledger.answered]
        if new:
            self.failures.lenient = True
            try:
                self.prepare(grid, new, config, scorer, server_round)
            finally:
                self.failures.lenient = False
        ready = [n for n in nodes if n in self.ledger.answered]
        self.failures.require("emulator and query phases of", len(ready), len(nodes), server_round)
        return ready

    def samples(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, count: int, timeout: float = 600
    ) -> dict[str, np.ndarray] | None:
        """Ask the client holding the most answers for x, G(T(x)), G(S(x)) on `count` of its images (uint8).

        Why the most: the server's fidelity diagnostic is measured on these images, and a skewed split at a
        small budget leaves some clients a few dozen answers (34 of the 256 asked for, on Dirichlet 0.1 at
        10 %). Ties go to the lowest partition, so a seed always picks the same client.
        """
        ledger, transport = self.ledger, self.transport
        if not ledger.answered or not self.plan.train or not ledger.query_teacher or count <= 0:
            return None  # no emulator, or no teacher answers to show G(T(x)) for
        node = max(ledger.answered, key=lambda n: (ledger.example_cap.get(n, 0), -transport.label(n)))
        records = {P.ARRAYS: arrays, P.CONFIG: transport.client_config(config, **{P.NUM_SAMPLES: count})}
        saved, transport.timeout = transport.timeout, min(transport.timeout, timeout)
        try:
            replies = transport.exchange(grid, [transport.message(node, P.SAMPLES, records)], "samples")
        finally:
            transport.timeout = saved
        record = replies[0].content.array_records.get(P.ARRAYS) if replies else None
        out = {k: _images(record, k) for k in ("images", "g-teacher", "g-student")}
        if any(v is None or v.dtype != np.uint8 or v.ndim != 4 for v in out.values()):
            if replies:
                self.failures.record("samples", node, "samples reply malformed")
            return None
        return out


def _images(record: ArrayRecord | None, key: str = P.IMAGES) -> np.ndarray | None:
    """An array of a reply's record as numpy, or None when absent or undecodable."""
    try:
        return np.asarray(record[key].numpy()) if record is not None and key in record else None
    except Exception:  # noqa: BLE001  (a malformed Array can fail to decode in many ways)
        return None
