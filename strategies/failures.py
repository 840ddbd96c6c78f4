"""Failure records and the minimum-reply rule: why a client's failure never stops a run, and when a run stops.

Why a unit of its own: every phase (emulators, queries, rounds) and every transport problem records
its failures the same way (phase, round, node, the server's label of the node, one readable reason),
and one rule decides when too few usable replies end the run (`min_reply_fraction`). A run that
stops says so in one line that names where the failures are listed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable


class RunFailed(RuntimeError):
    """A phase or round got too few usable replies (or aggregated nothing): the run cannot go on."""


def short(reason: object, limit: int = 300) -> str:
    """One readable line of a failure: Flower wraps a client's exception in the whole Ray traceback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    if "Message: " in text:  # Flower's ClientAppException: "... Message: <the client's own words>"
        text = "client error: " + text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() not in ("'>", "'")]
    text = lines[0] if len(lines) == 1 else (lines[-1] if lines else "")
    text = text.rstrip("'>").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Failures:
    """Every failure of a run (`entries`), those of the round in progress (`current`), and the rule.

    Parameters
    ----------
    min_reply_fraction : fewest usable replies a phase or round accepts, as a fraction of the clients
        asked (at least one); fewer raises RunFailed.
    say : where a failure is reported as it happens (a line per failure).
    label_of : the server's own label (partition) of a node, or None when it has none.
    listed_in : where a stopped run's failures can be read, named in RunFailed's message (the project's
        ServerApp writes them to summary.json; in a user's app they are `MEKD.failures.entries`).
    """

    def __init__(
        self,
        min_reply_fraction: float,
        say: Callable[[str], None],
        label_of: Callable[[int], int | None],
        listed_in: str = "MEKD.failures.entries",
    ) -> None:
        if not (isinstance(min_reply_fraction, (int, float)) and 0 <= min_reply_fraction <= 1):
            raise ValueError(f"min_reply_fraction={min_reply_fraction!r}: accepted: a number in [0, 1]")
        self.min_reply_fraction = float(min_reply_fraction)
        self.say = say
        self.label_of = label_of
        self.listed_in = listed_in
        self.entries: list[dict] = []
        self.current: list[dict] = []
        self.lenient = False  # lazy phases: judged once on the whole sampled cohort, not per phase

    def record(self, phase: str, node: int | None, reason: str, server_round: int = 0) -> dict:
        """Record a failure (it never stops the run by itself) and say it."""
        label = self.label_of(node) if node is not None else None
        entry = {"phase": phase, "round": server_round, "node": node, "partition": label, "reason": short(reason)}
        self.entries.append(entry)
        self.current.append(entry)
        where = f"client {label}" if label is not None else f"node {node}"
        self.say(f"[{phase}{f' {server_round}' if server_round else ''}] {where}: {entry['reason']}")
        return entry

    def need(self, asked: int) -> int:
        """Fewest usable replies out of `asked` that a phase or round accepts."""
        return max(1, math.ceil(self.min_reply_fraction * asked)) if asked else 0

    def require(self, phase: str, usable: int, asked: int, server_round: int = 0) -> None:
        """Raise RunFailed (one line) when `usable` of `asked` replies are fewer than the rule accepts."""
        if self.lenient or not asked or usable >= self.need(asked):
            return
        where = f"{phase} round {server_round}" if server_round else f"{phase} phase"
        raise RunFailed(
            f"{where}: {usable} of {asked} clients gave a usable reply, fewer than "
            f"min-reply-fraction={self.min_reply_fraction:g} allows ({self.need(asked)}); "
            f"the failures are listed in {self.listed_in}"
        )
