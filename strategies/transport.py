"""MEKD's side of the wire: checked messages out, triaged replies in, nodes found and labelled.

Why a unit of its own: the trust rules about messages live here and nowhere else. Every message
to a client is built through `protocol.checked_message` (the allow-list) with only the settings a
client may receive; a teacher node is never sent a client's message; every reply is triaged the same
way (from a node that was asked, once, without error, with content), and what is missing becomes a
recorded failure. A client is the node Flower authenticated; its label (partition) is assigned
here, in node-id order, never read from what the client says.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import protocol as P
from strategies.failures import Failures, RunFailed
from strategies.updates import clean_metrics

NodeRecords = Callable[[int, int], Mapping[str, ArrayRecord | ConfigRecord]]

#: Phases that ask more clients than this are sent in 10 chunks, each followed by a progress line.
PROGRESS_ABOVE = 50


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Transport:
    """Sends MEKD's messages and collects the replies, recording every failure in `failures`.

    client_config_keys : the only run settings a client may receive (plus `protocol.STRATEGY_KEYS`);
        None sends the config as given.
    node_records : (node id, partition label) -> extra records for every message to that node
        (the simulation's `shard`: which images of the data files are the node's own).
    """

    def __init__(
        self,
        failures: Failures,
        say: Callable[[str], None],
        client_config_keys: Iterable[str] | None = None,
        node_records: NodeRecords | None = None,
    ) -> None:
        self.failures = failures
        self.say = say
        self.client_config_keys = None if client_config_keys is None else frozenset(client_config_keys)
        self.node_records = node_records
        self.partition_of: dict[int, int] = {}  # node id -> partition label (assigned here)
        self.teacher_node: int | None = None  # the teacher's own node (TeacherNode oracle), never a client
        self.timeout = 3600.0  # seconds to wait for one batch of replies (`reply-timeout`), set by MEKD.start

    def label(self, node: int) -> int:
        """The node's partition label, or the node id itself when it has none (ordering, logs)."""
        return self.partition_of.get(node, node)

    # ------------------------------------------------------------------ out
    def client_config(self, config: ConfigRecord | Mapping, **extra: object) -> ConfigRecord:
        """The config a client may see: allowed run settings plus the strategy's own keys."""
        items = dict(config)
        if self.client_config_keys is not None:
            allowed = self.client_config_keys | set(P.STRATEGY_KEYS)
            items = {k: v for k, v in items.items() if k in allowed}
        items.update(extra)
        return ConfigRecord(items)

    def message(self, node: int, message_type: str, records: Mapping) -> Message:
        """One message to one node, checked against the protocol's allow-list."""
        if node == self.teacher_node:
            raise RuntimeError(f"refusing to send {message_type} to the teacher node {node}")
        content = dict(records)
        if self.node_records is not None and node in self.partition_of:
            content.update(self.node_records(node, self.partition_of[node]))
        return P.checked_message(message_type, content, node)

    # ------------------------------------------------------------------ in
    def triage(self, asked: Iterable[int], replies: Iterable[Message], phase: str, server_round: int = 0) -> list:
        """The replies from asked nodes, once each, without error and with content (by label); every
        other reply, and every asked node that did not reply, is a recorded failure."""
        asked = set(asked)
        good, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked or node in seen:
                self.failures.record(phase, node, "unexpected or duplicate reply ignored", server_round)
                continue
            seen.add(node)
            if reply.has_error():
                self.failures.record(phase, node, f"client error: {reply.error.reason}", server_round)
            elif not reply.has_content():
                self.failures.record(phase, node, "empty reply", server_round)
            else:
                good.append(reply)
        for node in sorted(asked - seen):
            self.failures.record(phase, node, f"no reply within reply-timeout={self.timeout:g}s", server_round)
        return sorted(good, key=lambda r: self.label(r.metadata.src_node_id))

    def exchange(self, grid: Grid, messages: list[Message], phase: str, server_round: int = 0) -> list[Message]:
        """Send, wait at most `timeout`, and return the usable replies; failures are recorded."""
        if not messages:
            return []
        asked = {m.metadata.dst_node_id for m in messages}
        try:
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        except Exception as exc:  # noqa: BLE001  (a transport failure loses the whole batch, not the run)
            for node in sorted(asked):
                reason = f"message not delivered: {type(exc).__name__}: {exc}"
                self.failures.record(phase, node, reason, server_round)
            return []
        return self.triage(asked, replies, phase, server_round)

    def exchange_with_progress(self, grid: Grid, messages: list[Message], phase: str) -> list[Message]:
        """`exchange`, in 10 chunks with a progress line (done, elapsed, ETA) after each when the phase asks
        more than PROGRESS_ABOVE clients: a 1,000-client phase otherwise says nothing for minutes."""
        if len(messages) <= PROGRESS_ABOVE:
            return self.exchange(grid, messages, phase)
        size, t0, replies = math.ceil(len(messages) / 10), time.time(), []
        for start in range(0, len(messages), size):
            replies += self.exchange(grid, messages[start : start + size], phase)
            done, elapsed = min(start + size, len(messages)), time.time() - t0
            eta = elapsed / done * (len(messages) - done)
            self.say(
                f"[{phase}] {done}/{len(messages)} clients asked, {len(replies)} replied, "
                f"{clock(elapsed)} elapsed, ETA {clock(eta)}"
            )
        return replies

    @staticmethod
    def metrics(reply: Message) -> dict:
        """The reply's one MetricRecord, finite scalars only (anything else: no metrics)."""
        records = list(reply.content.metric_records.values())
        return clean_metrics(dict(records[0]), P.MAX_METRICS) if len(records) == 1 else {}

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, grid: Grid, minimum: int, timeout: float = 120.0, exact: bool = True) -> list[int]:
        """Wait for `minimum` connected nodes; take the first `minimum` (by id) when `exact`, else all that
        are connected then. Each gets a partition label 0, 1, ... in node-id order."""
        nodes = self.wait(grid, minimum, timeout)
        nodes = nodes[:minimum] if exact else nodes
        self.partition_of = {node: i for i, node in enumerate(nodes)}
        return nodes

    def wait(self, grid: Grid, minimum: int, timeout: float = 120.0) -> list[int]:
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

    def bind_teacher(self, grid: Grid, oracle: object, minimum: int) -> None:
        """A teacher on its own node (`strategies.teacher_node`, an oracle with `bind`): once `minimum`
        nodes are connected, find it, and never send it a client's message or sample it."""
        bind = getattr(oracle, "bind", None)
        if not callable(bind):
            return
        self.wait(grid, minimum)
        try:
            self.teacher_node = bind(grid, sorted(grid.get_node_ids()))
        except Exception as exc:  # noqa: BLE001  (one line, before any client is asked anything)
            raise RunFailed(f"teacher node: {exc}") from None
        self.say(f"[teacher] answering from node {self.teacher_node}")
