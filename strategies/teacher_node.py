"""`TeacherNode`: an oracle that lives on a SuperNode of its own, run by the teacher's owner.

Why: with an in-process oracle the party that runs the federation holds the teacher. With a teacher
node it holds nothing of it: the teacher's owner runs one SuperNode with the teacher app
(`mekd_fl.teacher.app`), and `MEKD(oracle=TeacherNode(...))` routes every client's queries there, with
the same budgets and validation as an in-process oracle (the strategy's ledger on this side, the
TeacherOracle's on the teacher's side). The client key this side writes into each request is only a
label to the teacher: its node also caps the distinct keys and the answers to all of them together,
so a server that invents names gains nothing; a query over those bounds comes back as an error reply,
which `__call__` raises as `TeacherNodeError` and the strategy records as that client's refused query.
A resumed run's re-delivery (the same images under the same key) is answered without a second charge.

Which node is the teacher is never taken on a node's word:
- `node_id=`: the operator pins it (the id the SuperLink gave the teacher's authenticated SuperNode);
- otherwise `token=` (or `$MEKD_TEACHER_TOKEN`): the strategy sends every node a `query.role`
  challenge (a fresh nonce) and accepts only a node that answers HMAC-SHA256(token, nonce:node_id),
  a proof only the holder of the teacher's secret can give, bound to its own node id so it cannot be
  replayed by another node. Exactly one node must prove it; otherwise the run fails before any query.

The teacher node is never sampled as a student, and receives nothing but query images and the
client key they are charged to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from strategies import protocol as P

TOKEN_ENV = "MEKD_TEACHER_TOKEN"


def role_proof(token: str, nonce: str, node_id: int) -> str:
    """What the teacher node answers to a role challenge: HMAC-SHA256(token, "nonce:node_id")."""
    return hmac.new(token.encode(), f"{nonce}:{int(node_id)}".encode(), hashlib.sha256).hexdigest()


class TeacherNodeError(RuntimeError):
    """The teacher node could not be found, proved, or reached."""


class TeacherNode:
    """An oracle `(client_key, uint8 images) -> answers` whose teacher runs on its own SuperNode.

    Parameters
    ----------
    token : the shared secret the teacher node proves it holds (default: `$MEKD_TEACHER_TOKEN`).
    node_id : the teacher's node id, when the operator knows it (then no challenge is needed).
    timeout : seconds to wait for the teacher's answer to one client's queries.
    """

    def __init__(self, token: str | None = None, *, node_id: int | None = None, timeout: float = 600.0) -> None:
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if node_id is None and not self.token:
            raise ValueError(f"TeacherNode needs node_id= or a token (token= or ${TOKEN_ENV}) to find the teacher")
        self.pinned = node_id
        self.node_id: int | None = None
        self.timeout = float(timeout)
        self._grid: Grid | None = None

    @staticmethod
    def _message(message_type: str, records: dict, node: int) -> Message:
        return P.checked_message(message_type, records, node)

    # ------------------------------------------------------------------ finding the teacher
    def bind(self, grid: Grid, nodes: Iterable[int]) -> int:
        """Find the teacher among `nodes` (pinned, or by challenge) and keep the grid to reach it."""
        nodes = sorted(nodes)
        self._grid = grid
        if self.pinned is not None:
            if self.pinned not in nodes:
                raise TeacherNodeError(f"teacher node {self.pinned} is not connected (connected: {len(nodes)} nodes)")
            self.node_id = self.pinned
            return self.node_id
        nonce = secrets.token_hex(16)
        asks = [self._message(P.ROLE, {P.CONFIG: ConfigRecord({P.NONCE: nonce})}, n) for n in nodes]
        proved = []
        for reply in grid.send_and_receive(asks, timeout=min(self.timeout, 120.0)):
            node = reply.metadata.src_node_id
            if node not in nodes or reply.has_error() or not reply.has_content():
                continue
            record = reply.content.config_records.get(P.CONFIG)
            proof = record.get(P.PROOF) if record is not None else None
            if isinstance(proof, str) and hmac.compare_digest(proof, role_proof(self.token, nonce, node)):
                proved.append(node)
        if len(proved) != 1:
            raise TeacherNodeError(
                f"{len(proved)} nodes proved they hold the teacher's token (exactly 1 must): "
                "start the teacher's SuperNode with the teacher app and the same token"
            )
        self.node_id = proved[0]
        return self.node_id

    # ------------------------------------------------------------------ answering
    def __call__(self, client_key: str, images: object) -> np.ndarray:
        if self._grid is None or self.node_id is None:
            raise TeacherNodeError("TeacherNode used before MEKD.start bound it to the grid")
        images = np.ascontiguousarray(np.asarray(images))
        message = self._message(
            P.TEACH,
            {P.CONFIG: ConfigRecord({P.CLIENT: str(client_key)}), P.QUERIES: ArrayRecord({P.IMAGES: Array(images)})},
            self.node_id,
        )
        replies = list(self._grid.send_and_receive([message], timeout=self.timeout))
        if len(replies) != 1 or replies[0].metadata.src_node_id != self.node_id:
            raise TeacherNodeError(f"the teacher node gave no answer within {self.timeout:g}s")
        reply = replies[0]
        if reply.has_error():
            raise TeacherNodeError(f"the teacher refused: {reply.error.reason}")
        record = reply.content.array_records.get(P.ANSWERS_RECORD)
        if record is None or P.RESPONSES not in record:
            raise TeacherNodeError("the teacher node's reply holds no answers")
        return np.asarray(record[P.RESPONSES].numpy())
