"""Divergence made visible: a warning that names the likely cause when a round's updates look unstable.

Why: a learning rate too large for a user's own model diverges in silence otherwise. The norm bound
scales the longest updates down and the averaged student quietly falls to chance; the only symptom
was a line per scaled update. A distillation whose local steps are stable gives updates of similar
length, much shorter than the weights, and a loss that falls from round to round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

#: A median update this many times longer than the weights themselves has left the global model far behind
RELATIVE_LIMIT = 10.0
#: A round whose longest update is this many times the median one has an unstable client.
SPREAD_LIMIT = 10.0
#: A distillation loss this many times the lowest of earlier rounds is rising.
LOSS_RISE = 1.25

ADVICE = "lower lr (see docs/plugging-in.md: choosing the learning rate for your model)"


class DivergenceWatch:
    """Watches each round's update lengths, scalings and distillation loss; returns warnings to say."""

    def __init__(self) -> None:
        self.best_loss = math.inf

    def observe(
        self, server_round: int, norms: list[float], weight_norm: float, scaled: int, loss: float | None
    ) -> list[str]:
        """Warnings for round `server_round` (none when it looks stable)."""
        out = []
        where = f"[train {server_round}] warning:"
        if norms:
            median = sorted(norms)[(len(norms) - 1) // 2]
            if scaled and scaled * 2 >= len(norms):
                out.append(f"{where} {scaled} of {len(norms)} updates were scaled down to the norm bound: {ADVICE}")
            if median > 0 and max(norms) >= SPREAD_LIMIT * median:
                out.append(f"{where} update norms {max(norms) / median:.0f}x the median: {ADVICE}")
            if weight_norm > 0 and median > RELATIVE_LIMIT * weight_norm:
                out.append(
                    f"{where} the median update ({median:.3g}) is {median / weight_norm:.0f}x longer than the global "
                    f"weights ({weight_norm:.3g}): "
                    f"{ADVICE}"
                )
        if loss is not None and math.isfinite(loss):
            if loss > LOSS_RISE * self.best_loss:
                out.append(f"{where} distillation loss {loss:.4g} rose from {self.best_loss:.4g}: {ADVICE}")
            self.best_loss = min(self.best_loss, loss)
        elif loss is not None:
            out.append(f"{where} distillation loss is {loss}: {ADVICE}")
        return out

    def observe_round(
        self,
        server_round: int,
        norms: list[float],
        center: Mapping[str, np.ndarray] | None,
        scaled: int,
        metrics: Mapping | None,
    ) -> list[str]:
        """`observe` on a round's accepted updates: their distances from the global model `center` (before
        bounding), the global model's own length, the aggregated train-loss."""
        if center is None:
            return []
        floats = [np.asarray(v, dtype=np.float64) for v in center.values() if np.asarray(v).dtype.kind == "f"]
        weight_norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in floats))
        loss = (metrics or {}).get("train-loss")
        usable = isinstance(loss, (int, float)) and not isinstance(loss, bool)
        return self.observe(server_round, norms, weight_norm, scaled, float(loss) if usable else None)
