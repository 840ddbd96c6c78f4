"""MEKD's side of the wire: checked messages out, triaged replies in, nodes found and labelled.

Why a unit of its own: the trust rules about messages live here and nowhere else. Every message
to a client is built through `protocol.checked_message` (the allow-list) with only the settings a
client may receive; a teacher node is never sent a client's message; every reply is triaged the same
way (a reply to a message sent, once, from the node asked, without error, with content), and what is
missing becomes a recorded failure. A client is the node Flower authenticated; its label (partition)
is assigned here, in node-id order, never read from what the client says.

Replies are matched to the messages sent by `reply_to_message_id`, not by their source: when a node
is offline, the SuperLink itself answers for it (an error reply whose source is the SuperLink), and
that is one failure of the node asked, with Flower's reason. The wait ends once every message sent
has its reply or a failure: a node that answers with a reply to another message is not waited for
until the reply-timeout (`send_and_receive`, also used for Flower's own rounds through `RoundGrid`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import protocol as P
from strategies.failures import Failures, RunFailed
from strategies.updates import check_metrics, clean_metrics

NodeRecords = Callable[[int, int], Mapping[str, ArrayRecord | ConfigRecord]]

#: Phases that ask more clients than this are sent in 10 chunks, each followed by a progress line.
PROGRESS_ABOVE = 50
#: Seconds between looks for replies under the Deployment Engine (at most; Flower's own loop: 3).
PULL_INTERVAL = 0.5


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
        self.errored: set[int] = set()  # nodes that answered the last triaged batch with an error
        self.lost: set[int] = set()  # nodes that said they hold no state (P.STATE_LOST), not yet re-prepared
        self.unpushed: set[int] = set()  # nodes whose message the SuperLink did not accept (last exchange)

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
    def triage(self, sent: Iterable[Message], replies: Iterable[Message], phase: str, server_round: int = 0) -> list:
        """The usable replies to the messages `sent` (by label); every other reply, and every message
        without one, is one recorded failure of the node it went to.

        A reply belongs to the message whose id it names (`reply_to_message_id`); a message that has no
        id (a grid that assigns none) is answered by the first reply from its node. Usable: once, from
        the node asked, without error, with content. An error reply keeps Flower's reason."""
        by_id: dict[str, int] = {}
        by_node: set[int] = set()
        for m in sent:
            if m.metadata.message_id:
                by_id[m.metadata.message_id] = m.metadata.dst_node_id
            else:
                by_node.add(m.metadata.dst_node_id)
        good: list[Message] = []
        strays: set[int] = set()  # asked nodes whose reply named no message of theirs
        self.errored = set()
        for reply in replies:
            rid, src = reply.metadata.reply_to_message_id, reply.metadata.src_node_id
            if rid and rid in by_id:
                node = by_id.pop(rid)
            elif not rid and src in by_node:
                by_node.discard(src)
                node = src
            elif src in by_node or src in by_id.values():  # an asked node, naming another message
                strays.add(src)
                continue
            else:
                self.failures.record(phase, src, "unexpected or duplicate reply ignored", server_round)
                continue
            if reply.has_error():
                self.errored.add(node)
                if src == node and P.STATE_LOST in str(reply.error.reason):
                    self.lost.add(node)
                self.failures.record(phase, node, error_reason(reply, node), server_round)
            elif src != node:
                self.failures.record(phase, node, f"reply sent by node {src}, not by the node asked", server_round)
            elif not reply.has_content():
                self.failures.record(phase, node, "empty reply", server_round)
            else:
                good.append(reply)
        for node in sorted({*by_id.values(), *by_node}):
            reason = f"no reply within reply-timeout={self.timeout:g}s"
            if node in self.unpushed:
                reason = "message not delivered: the SuperLink refused it (too large or malformed; see Flower's log)"
            self.failures.record(
                phase, node, "reply to another message ignored" if node in strays else reason, server_round
            )
        self.unpushed = set()
        return sorted(good, key=lambda r: self.label(r.metadata.src_node_id))

    def send_and_receive(self, grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's `Grid.send_and_receive`, except that the wait ends once every message sent has a reply,
        or its node has sent a reply to something else (it will not send another): Flower's own loop
        would wait out the whole timeout for it. Only Flower's own loop is replaced: a grid that brings its
        own `send_and_receive` (a wrapper that records or filters what is sent, a test's grid without
        push/pull) is asked through it, so nothing goes around it."""
        push, pull = getattr(grid, "push_messages", None), getattr(grid, "pull_messages", None)
        own = getattr(getattr(type(grid), "send_and_receive", None), "__module__", None) or ""
        if not (callable(push) and callable(pull) and own.startswith("flwr.")):
            return list(grid.send_and_receive(messages, timeout=timeout))
        pushed = set(push(messages))  # Flower sets each message's id as it pushes it
        self.unpushed = {m.metadata.dst_node_id for m in messages if m.metadata.message_id not in pushed}
        pending = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in pushed}
        deadline = math.inf if timeout is None else time.time() + timeout
        # Flower's own loop looks every 3 s; a pull is one small request to the SuperLink, and each of a
        # round's exchanges would wait half that on average for nothing.
        interval = min(float(getattr(grid, "pull_interval", PULL_INTERVAL)), PULL_INTERVAL)
        replies: list[Message] = []
        while pending:
            for reply in pull(list(pending)):
                replies.append(reply)
                if pending.pop(reply.metadata.reply_to_message_id, None) is None:
                    for mid in [mid for mid, node in pending.items() if node == reply.metadata.src_node_id]:
                        del pending[mid]
            if not pending or time.time() >= deadline:
                break
            time.sleep(max(0.0, min(interval, deadline - time.time())))
        return replies

    def exchange(self, grid: Grid, messages: list[Message], phase: str, server_round: int = 0) -> list[Message]:
        """Send, wait at most `timeout`, and return the usable replies; failures are recorded."""
        if not messages:
            return []
        self.errored = set()
        try:
            replies = self.send_and_receive(grid, messages, self.timeout)
        except Exception as exc:  # noqa: BLE001  (a transport failure loses the whole batch, not the run)
            for node in sorted({m.metadata.dst_node_id for m in messages}):
                reason = f"message not delivered: {type(exc).__name__}: {exc}"
                self.failures.record(phase, node, reason, server_round)
            return []
        return self.triage(messages, replies, phase, server_round)

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
        """The reply's one MetricRecord, finite scalars only (anything else: no metrics). For metrics that
        are only shown; those averaged into the results are read with `checked_metrics`."""
        records = list(reply.content.metric_records.values())
        return clean_metrics(dict(records[0]), P.MAX_METRICS) if len(records) == 1 else {}

    @staticmethod
    def checked_metrics(reply: Message) -> tuple[dict, str | None]:
        """The reply's one MetricRecord checked for averaging (`updates.check_metrics`), or ({}, why refused)."""
        records = list(reply.content.metric_records.values())
        if len(records) != 1:
            return {}, f"expected 1 MetricRecord, got {len(records)}"
        return check_metrics(dict(records[0]), P.MAX_METRICS, (P.PARTITION_ID,))

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


def error_reason(reply: Message, node: int) -> str:
    """An error reply's failure reason: the client's own error, or Flower's (the SuperLink answers for a
    node it cannot reach, e.g. NODE_UNAVAILABLE), with Flower's code and reason kept."""
    error = reply.error
    if reply.metadata.src_node_id == node:
        return f"client error: {error.reason}"
    return f"Flower error {error.code}: {error.reason}"


class RoundGrid:
    """The run's Grid as Flower's own round loop sees it: everything is the grid's, but for
    `send_and_receive`, which stops waiting as `Transport.send_and_receive` does."""

    def __init__(self, grid: Grid, transport: Transport) -> None:
        self._grid, self._transport = grid, transport

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self._transport.send_and_receive(self._grid, list(messages), timeout)
