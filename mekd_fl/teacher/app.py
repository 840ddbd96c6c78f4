"""The teacher as a Flower service of its own: a ClientApp that answers query images, run by its owner.

Why: the party that runs the federation need not hold the teacher. Its owner starts one SuperNode
with this app (`flower-supernode ... --node-config "mekd-role='teacher' mekd-teacher-token='...'"`),
and the server's `MEKD(oracle=TeacherNode(token=...))` routes every client's queries to it. The node
answers only two message types: a role challenge (it proves it holds the token, see
`strategies.teacher_node.role_proof`) and query images charged to a client key, which go through the
owner's oracle (a `TeacherOracle`, with its validation, budgets and hardening, or any callable).
Nothing of the teacher leaves the node but its answers.

Why the node keeps a ledger of its own (`_NodeLedger`): the client key in each request is written by
the server, so a per-client budget alone bounds nothing against a hostile server, which can invent
names. The node therefore also bounds, whatever the server writes, the number of distinct client keys
(`max_clients`) and the answers of all of them together (`total_budget`), and re-charges the oracle's
own per-client `budget` there. The ledger lives where the server cannot reach it and where Flower's
per-message ClientApp processes (the Deployment Engine's default isolation) still see it: a file of
the owner's (`ledger=`), else the node's `Context.state`. An exact repeat of images already paid for
under the same key (a resumed run re-delivering its answers) reveals nothing new and is not charged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mekd_fl.settings.run import run_setting
from mekd_fl.teacher.answer_cache import images_digest
from strategies import protocol as P
from strategies.teacher_node import TOKEN_ENV, role_proof

try:  # POSIX: a file lock makes the ledger file hold against concurrent ClientApp processes
    import fcntl
except ImportError:  # pragma: no cover  (Windows: the in-process lock only)
    fcntl = None  # type: ignore[assignment]

__all__ = ["NodeBudgetExceeded", "make_teacher_app", "node_is_teacher", "register_teacher"]

Oracle = Callable[[str, torch.Tensor], Any]
ROLE_KEY, TOKEN_KEY = "mekd-role", "mekd-teacher-token"
#: Node-config keys the teacher owner may set instead of the keyword arguments (the keywords win).
MAX_CLIENTS_KEY, TOTAL_KEY, LEDGER_KEY = "mekd-teacher-max-clients", "mekd-teacher-total-budget", "mekd-teacher-ledger"
#: Distinct client keys a teacher node serves unless its owner says otherwise: the project's default
#: federation (`num-clients = 10`). A larger honest federation is refused in one line naming the setting.
DEFAULT_MAX_CLIENTS = 10
#: The longest client key the node accepts (a key is stored in the ledger; the server's are short).
MAX_KEY_CHARS = 200
#: Where the ledger lives in the node's Context.state when there is no ledger file.
STATE_RECORD = "mekd-teacher-ledger"


class NodeBudgetExceeded(ValueError):
    """The teacher node refuses a query: over a bound of its own (`max_clients`, `total_budget`, the
    per-client budget), an unusable client key or images, or an unreadable ledger.

    Why a ValueError: the server records the refusal for that client, as any refused query, and the run
    goes on; the node answers nothing and charges nothing for it.
    """


def node_is_teacher(context: Context) -> bool:
    """A node is the teacher when its own node-config says so (`mekd-role = "teacher"`)."""
    return str(context.node_config.get(ROLE_KEY, "")) == "teacher"


def _count(name: str, value: object, minimum: int) -> int | None:
    """`value` as an int >= minimum (None stays None); an int-like string from a node-config is accepted."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; accepted: an int >= {minimum}")
    return int(value)


class _NodeLedger:
    """What the teacher node has answered, per client key, and the bounds that hold against the server.

    max_clients : distinct client keys ever answered (the next new key is refused).
    total_budget : answers to all keys together.
    client_budget : answers to one key (the oracle's own `budget`, kept here because a per-message
        ClientApp process starts a fresh oracle whose counts are zero), or None.
    path : a JSON file of the owner's (None: the node's Context.state, which holds for one run).

    A query is reserved (count and digest) before the oracle is asked, so concurrent requests never
    overspend, and given back if the oracle refuses or fails.
    """

    def __init__(self, max_clients: int, total_budget: int, client_budget: int | None, path: Path | None) -> None:
        self.max_clients, self.total_budget, self.client_budget = max_clients, total_budget, client_budget
        self.path = path
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ storage
    @contextlib.contextmanager
    def _state(self, context: Context) -> Iterator[dict]:
        """The ledger, read and written back under a lock (a file lock too when the ledger is a file)."""
        with self._lock:
            if self.path is None:
                record = context.state.config_records.get(STATE_RECORD)
                state = json.loads(str(record["json"])) if record is not None else {}
                yield state
                context.state[STATE_RECORD] = ConfigRecord({"json": json.dumps(state)})
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.path}.lock", "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                state = self._read_file()
                yield state
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
                with os.fdopen(fd, "w") as f:  # flushed to disk before it replaces the last ledger
                    json.dump(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)

    def _read_file(self) -> dict:
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            state = json.loads(self.path.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:  # never start from zero in silence: that would lift every bound
            raise NodeBudgetExceeded(  # the reason goes to the server: no path of the owner's in it
                f"the teacher node's ledger file is unreadable ({type(exc).__name__}); its owner must repair it"
            ) from exc
        return state

    # ------------------------------------------------------------------ accounting
    def charge(self, key: str, fingerprint: str, n: int, context: Context) -> bool:
        """Reserve `n` answers for `key`, or raise NodeBudgetExceeded; True when this is an exact repeat of
        images already paid for under `key` (a re-delivery), which is not charged again."""
        with self._state(context) as state:
            clients = state.setdefault("clients", {})
            account = clients.get(key)
            if account is not None and fingerprint in account["digests"]:
                return True
            if account is None and len(clients) >= self.max_clients:
                raise NodeBudgetExceeded(
                    f"client {key} refused: the teacher node serves at most max_clients={self.max_clients} distinct "
                    f"clients and all have asked (its owner sets max_clients= or node-config {MAX_CLIENTS_KEY})"
                )
            used = account["charged"] if account is not None else 0
            if self.client_budget is not None and used + n > self.client_budget:
                raise NodeBudgetExceeded(
                    f"client {key} asked for {n} answers but has {max(self.client_budget - used, 0)} of its "
                    f"query-budget={self.client_budget} left on the teacher node"
                )
            total = sum(a["charged"] for a in clients.values())
            if total + n > self.total_budget:
                raise NodeBudgetExceeded(
                    f"client {key} asked for {n} answers but the teacher node has {max(self.total_budget - total, 0)} "
                    f"of its total_budget={self.total_budget} left (its owner sets total_budget= or node-config "
                    f"{TOTAL_KEY})"
                )
            account = clients.setdefault(key, {"charged": 0, "digests": []})
            account["charged"] += n
            account["digests"].append(fingerprint)
            return False

    def release(self, key: str, fingerprint: str, n: int, context: Context) -> None:
        """Give back a reservation whose answers were never given (the oracle refused or failed)."""
        with self._state(context) as state:
            clients = state.setdefault("clients", {})
            account = clients.get(key)
            if account is None or fingerprint not in account["digests"]:
                return
            account["digests"].remove(fingerprint)
            account["charged"] -= n
            if account["charged"] <= 0 and not account["digests"]:
                del clients[key]  # back to never having asked: it takes no place under max_clients


def register_teacher(
    app: ClientApp,
    oracle: Oracle | Callable[[Context], Oracle],
    *,
    token: str | None = None,
    is_teacher: Callable[[Context], bool] = node_is_teacher,
    factory: bool = False,
    max_clients: int | None = None,
    total_budget: int | None = None,
    ledger: str | os.PathLike | None = None,
) -> ClientApp:
    """Add the teacher's handlers (`query.role`, `query.teach`) to a ClientApp; returns it.

    `oracle` answers `(client_key, uint8 images)`; with `factory=True` it is instead called once with
    the node's Context to build that oracle (load the teacher where it lives). The token comes from
    `token=`, else the node-config `mekd-teacher-token`, else `$MEKD_TEACHER_TOKEN`. A node for which
    `is_teacher(context)` is false refuses both messages, so the same app can serve student nodes too.

    The bounds that hold against the server (see the module docstring): `max_clients` distinct client
    keys (default: node-config `mekd-teacher-max-clients`, else `DEFAULT_MAX_CLIENTS`) and
    `total_budget` answers in all (default: node-config `mekd-teacher-total-budget`, else `max_clients`
    times the oracle's per-client `budget`, or the query-budget default for a callable without one:
    what that many honest clients may spend, so the default refuses no honest run the cap admits).
    `ledger`: a file (default: node-config `mekd-teacher-ledger`) that keeps the counts across runs and
    restarts; without one they live in the node's Context.state, for one run.
    """
    max_clients = _count("max_clients", max_clients, 1)
    total_budget = _count("total_budget", total_budget, 0)
    built: dict[str, Any] = {}

    def teacher_of(context: Context) -> tuple[Oracle, _NodeLedger]:
        if not is_teacher(context):
            raise PermissionError("this node is not the teacher")
        if "oracle" not in built:
            ask = oracle(context) if factory else oracle  # type: ignore[call-arg]
            built["ledger"] = ledger_for(ask, context)
            built["oracle"] = ask
        return built["oracle"], built["ledger"]

    def ledger_for(ask: Oracle, context: Context) -> _NodeLedger:
        config = context.node_config
        cap = max_clients if max_clients is not None else _count(MAX_CLIENTS_KEY, config.get(MAX_CLIENTS_KEY), 1)
        cap = cap if cap is not None else DEFAULT_MAX_CLIENTS
        own = getattr(ask, "budget", None)
        per_client = int(own) if isinstance(own, (int, np.integer)) and not isinstance(own, bool) else None
        total = total_budget if total_budget is not None else _count(TOTAL_KEY, config.get(TOTAL_KEY), 0)
        if total is None:
            total = cap * (per_client if per_client is not None else int(run_setting("query-budget").default))
        path = ledger if ledger is not None else (config.get(LEDGER_KEY) or None)
        return _NodeLedger(cap, total, per_client, Path(str(path)).expanduser() if path else None)

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
        ask, book = teacher_of(context)
        client = str(message.content[P.CONFIG][P.CLIENT])
        if not client.strip() or len(client) > MAX_KEY_CHARS:
            raise NodeBudgetExceeded(
                f"client key {client[:40]!r} is not accepted; accepted: 1..{MAX_KEY_CHARS} characters"
            )
        array = np.ascontiguousarray(message.content[P.QUERIES][P.IMAGES].numpy())
        if array.ndim < 1:
            raise NodeBudgetExceeded("query images must be a batch (B, C, H, W)")
        fingerprint, n = images_digest(torch.from_numpy(array)), int(array.shape[0])
        redelivery = book.charge(client, fingerprint, n, context)
        try:
            images = torch.from_numpy(array)
            again = getattr(ask, "redeliver", None) if redelivery else None
            answers = again(client, images) if callable(again) else ask(client, images)
            answers = answers.detach().cpu().numpy() if isinstance(answers, torch.Tensor) else np.asarray(answers)
            answers = np.ascontiguousarray(answers, dtype=np.float32)
        except BaseException:
            if not redelivery:
                book.release(client, fingerprint, n, context)
            raise
        record = ArrayRecord({P.RESPONSES: Array(answers)})
        return Message(RecordDict({P.ANSWERS_RECORD: record}), reply_to=message)

    app.query(P.ROLE.split(".", 1)[1])(prove)
    app.query(P.TEACH.split(".", 1)[1])(answer)
    return app


def make_teacher_app(oracle: Oracle | Callable[[Context], Oracle], **kwargs: Any) -> ClientApp:
    """A ClientApp that is only the teacher (for the teacher owner's SuperNode)."""
    return register_teacher(ClientApp(), oracle, is_teacher=kwargs.pop("is_teacher", lambda _: True), **kwargs)
