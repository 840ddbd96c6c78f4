"""The budget ledger: what each client paid for, what it holds, and what a resumed run re-delivers.

Why a unit of its own: budgets are the teacher owner's protection against extraction, and a client's
weight in every average is capped by the answers it holds. Both must survive a killed run exactly:
a client is charged once for an exact set of images (its digest), a resumed run re-delivers those
answers without a second charge, and the oracle is asked only for a query that fits the budget.
Answers are held here from the moment they are charged until the client confirms it stored them
(`delivered`): a client that crashed while receiving them gets the same answers again, from here, when
it asks again for the images it paid for (no second charge, and no second oracle call, which a
teacher that counts its own budget would refuse).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from strategies import protocol as P

Oracle = Callable[[str, torch.Tensor], "torch.Tensor | np.ndarray"]


def digest(images: np.ndarray) -> str:
    """A fingerprint of exactly these query images (dtype, shape and bytes)."""
    h = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:32]


def client_key(partition: int) -> str:
    """The oracle's account of a client: from the server's own label of an authenticated node."""
    return f"client-{partition}"


class QueryLedger:
    """Budgets charged (`queries_used`), digests of the images paid for, answers held (`example_cap`).

    query_budget : images each client may send to the teacher in a run.
    query_teacher : False for a reference that trains on labels: queries register the client with a
        budget of 0 and the oracle is never called.
    """

    def __init__(self, query_budget: int, query_teacher: bool = True) -> None:
        if isinstance(query_budget, bool) or not isinstance(query_budget, int) or query_budget < 0:
            raise ValueError(f"query_budget={query_budget!r}: accepted: an integer >= 0")
        self.query_budget = query_budget
        self.query_teacher = query_teacher
        self.queries_used: dict[str, int] = {}  # client key -> images charged
        self.query_digests: dict[str, str] = {}  # client key -> digest of the images it paid for
        # query-selection=uncertainty: the round whose global student scored a client's queries, and those
        # students (a resumed run sends a client the same student again, so it re-sends what it paid for)
        self.query_rounds: dict[str, int] = {}
        self.query_scorers: dict[int, ArrayRecord] = {}
        self.answered: set[int] = set()  # nodes holding teacher answers (eligible for rounds)
        self.example_cap: dict[int, int] = {}  # node id -> answers it holds (the most its reply may weigh)
        self.log: list[dict] = []  # one entry per query reply (queries.jsonl)
        self.undelivered: dict[str, tuple[str, ArrayRecord]] = {}  # client key -> (digest, answers) not yet stored

    @property
    def total(self) -> int:
        return sum(self.queries_used.values())

    def budget_for(self, key: str) -> tuple[int, bool]:
        """Images the client may send now, and whether that is a re-delivery of what it paid for."""
        if self.query_digests.get(key):
            return self.queries_used.get(key, 0), True
        left = max(0, self.query_budget - self.queries_used.get(key, 0))
        return (left if self.query_teacher else 0), False

    def answer(self, key: str, node: int, images: np.ndarray | None, budget: int, oracle: Oracle) -> dict:
        """Check one client's query images, ask the oracle, charge the client; a query-log entry, with the
        answers under "responses" when they may be sent, or a "reason" when refused."""
        entry: dict = {"phase": "query", "node": node, "asked": budget, "sent": 0, "answered": 0, "charged": 0}
        entry.update({"redelivered": False, "responses": None})
        if images is None:
            return {**entry, "reason": f"no '{P.QUERIES}/{P.IMAGES}' array in the reply"}
        entry["sent"] = int(images.shape[0]) if images.ndim else 0
        if images.ndim == 0 or entry["sent"] > budget:
            return {**entry, "reason": f"sent {entry['sent']} images, more than its budget of {budget}"}
        if not self.query_teacher:
            entry["responses"] = ArrayRecord({P.RESPONSES: Array(np.zeros((0, 0), dtype=np.float32))})
            self.example_cap[node] = max(1, entry["sent"])
            return entry
        fingerprint = digest(images)
        redelivery = self.query_digests.get(key) == fingerprint
        left = self.query_budget - self.queries_used.get(key, 0)
        if not redelivery and entry["sent"] > left:
            reason = (
                f"query refused: {entry['sent']} images but {max(left, 0)} of query-budget={self.query_budget} left"
            )
            return {**entry, "reason": reason}
        held = self.undelivered.get(key)
        if redelivery and held is not None and held[0] == fingerprint:  # paid for, never stored: the same again
            entry.update(answered=entry["sent"], redelivered=True, responses=held[1])
            self.example_cap[node] = entry["sent"]
            return entry
        # a paid repeat goes to an oracle's `redeliver` when it has one (TeacherOracle: answered without a
        # second charge of its own budget; a teacher node recognises repeats itself)
        again = getattr(oracle, "redeliver", None) if redelivery else None
        try:
            responses = (again if callable(again) else oracle)(key, torch.from_numpy(np.ascontiguousarray(images)))
            responses = np.asarray(
                responses.detach().cpu().numpy() if isinstance(responses, torch.Tensor) else responses, dtype=np.float32
            )
            if responses.ndim != 2 or responses.shape[0] != images.shape[0] or not np.isfinite(responses).all():
                raise ValueError(
                    f"oracle answered shape {responses.shape} for {images.shape[0]} images (or non-finite values)"
                )
        except Exception as exc:  # noqa: BLE001  (any oracle failure refuses this query, not the run)
            return {**entry, "reason": f"teacher refused the query: {type(exc).__name__}: {exc}"}
        entry["answered"] = int(len(responses))
        if redelivery:
            entry["redelivered"] = True
        else:
            entry["charged"] = entry["answered"]
            self.queries_used[key] = self.queries_used.get(key, 0) + entry["answered"]
            self.query_digests[key] = fingerprint
        self.example_cap[node] = entry["answered"]
        entry["responses"] = ArrayRecord({P.RESPONSES: Array(responses)})
        self.undelivered[key] = (fingerprint, entry["responses"])
        return entry

    def delivered(self, key: str) -> None:
        """The client stored its answers: they need not be held any longer."""
        self.undelivered.pop(key, None)

    def state(self) -> dict:
        """What a resumed run needs (JSON-able but for the scoring students' tensors)."""
        return {
            "queries-used": dict(self.queries_used),
            "query-digests": dict(self.query_digests),
            "query-rounds": dict(self.query_rounds),
            "query-scorers": {str(r): a.to_torch_state_dict() for r, a in self.query_scorers.items()},
        }

    def load_state(self, state: Mapping) -> None:
        self.queries_used = {str(k): int(v) for k, v in dict(state.get("queries-used", {})).items()}
        self.query_digests = {str(k): str(v) for k, v in dict(state.get("query-digests", {})).items()}
        self.query_rounds = {str(k): int(v) for k, v in dict(state.get("query-rounds", {})).items()}
        self.query_scorers = {int(r): ArrayRecord(dict(sd)) for r, sd in dict(state.get("query-scorers", {})).items()}
