"""The teacher as a Flower service of its own: a ClientApp that answers query images, run by its owner.

Why: the party that runs the federation need not hold the teacher. Its owner starts one SuperNode
with this app (`flower-supernode ... --node-config "mekd-role='teacher' mekd-teacher-token='...'"`),
and the server's `MEKD(oracle=TeacherNode(token=...))` routes every client's queries to it. The node
answers only two message types: a role challenge (it proves it holds the token, see
`strategies.teacher_node.role_proof`) and query images charged to a client key, which go through the
owner's oracle (a `TeacherOracle`, with its validation, budgets and hardening, or any callable).
Nothing of the teacher leaves the node but its answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from strategies import protocol as P
from strategies.teacher_node import TOKEN_ENV, role_proof

Oracle = Callable[[str, torch.Tensor], Any]
ROLE_KEY, TOKEN_KEY = "mekd-role", "mekd-teacher-token"


def node_is_teacher(context: Context) -> bool:
    """A node is the teacher when its own node-config says so (`mekd-role = "teacher"`)."""
    return str(context.node_config.get(ROLE_KEY, "")) == "teacher"


def register_teacher(
    app: ClientApp,
    oracle: Oracle | Callable[[Context], Oracle],
    *,
    token: str | None = None,
    is_teacher: Callable[[Context], bool] = node_is_teacher,
    factory: bool = False,
) -> ClientApp:
    """Add the teacher's handlers (`query.role`, `query.teach`) to a ClientApp; returns it.

    `oracle` answers `(client_key, uint8 images)`; with `factory=True` it is instead called once with
    the node's Context to build that oracle (load the teacher where it lives). The token comes from
    `token=`, else the node-config `mekd-teacher-token`, else `$MEKD_TEACHER_TOKEN`. A node for which
    `is_teacher(context)` is false refuses both messages, so the same app can serve student nodes too.
    """
    built: dict[str, Oracle] = {}

    def teacher_of(context: Context) -> Oracle:
        if not is_teacher(context):
            raise PermissionError("this node is not the teacher")
        if "oracle" not in built:
            built["oracle"] = oracle(context) if factory else oracle  # type: ignore[call-arg]
        return built["oracle"]

    def secret(context: Context) -> str:
        value = token or str(context.node_config.get(TOKEN_KEY, "") or os.environ.get(TOKEN_ENV, ""))
        if not value:
            raise PermissionError(f"the teacher node has no token (node-config {TOKEN_KEY} or ${TOKEN_ENV})")
        return value

    def prove(message: Message, context: Context) -> Message:
        teacher_of(context)
        nonce = str(message.content[P.CONFIG][P.NONCE])
        proof = role_proof(secret(context), nonce, context.node_id)
        return Message(RecordDict({P.CONFIG: ConfigRecord({P.PROOF: proof})}), reply_to=message)

    def answer(message: Message, context: Context) -> Message:
        ask = teacher_of(context)
        client = str(message.content[P.CONFIG][P.CLIENT])
        images = torch.from_numpy(np.ascontiguousarray(message.content[P.QUERIES][P.IMAGES].numpy()))
        answers = ask(client, images)
        answers = answers.detach().cpu().numpy() if isinstance(answers, torch.Tensor) else np.asarray(answers)
        record = ArrayRecord({P.RESPONSES: Array(np.ascontiguousarray(answers, dtype=np.float32))})
        return Message(RecordDict({P.ANSWERS_RECORD: record}), reply_to=message)

    app.query(P.ROLE.split(".", 1)[1])(prove)
    app.query(P.TEACH.split(".", 1)[1])(answer)
    return app


def make_teacher_app(oracle: Oracle | Callable[[Context], Oracle], **kwargs: Any) -> ClientApp:
    """A ClientApp that is only the teacher (for the teacher owner's SuperNode)."""
    return register_teacher(ClientApp(), oracle, is_teacher=kwargs.pop("is_teacher", lambda _: True), **kwargs)
