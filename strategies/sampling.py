"""Seeded sampling of a round's cohort, and the part of the Grid a wrapped strategy may see.

Why a unit of its own: the same seed must give the same rounds whatever the wrapped strategy is.
MEKD samples the cohort itself (from the clients that hold answers), shows the wrapped strategy only
that cohort, and seeds the global `random` that Flower's strategies sample with for that call only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class Cohort:
    """The part of a Grid a wrapped strategy sees: only the nodes MEKD sampled for this round."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)


def round_seed(seed: int, server_round: int, salt: int) -> int:
    return seed * 7_919 + server_round * 104_729 + salt


def sample(pool: Iterable[int], fraction: float, minimum: int, seed: int, label: Callable[[int], int]) -> list[int]:
    """`fraction` of `pool` (at least `minimum`, at least one, at most all), drawn with `seed`, by label."""
    eligible = sorted(pool, key=label)
    size = min(len(eligible), max(int(len(eligible) * fraction), minimum, 1))
    chosen = random.Random(seed).sample(eligible, size)
    return sorted(chosen, key=label)


@contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed Python's global `random` inside the block and restore the caller's state after it."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)
