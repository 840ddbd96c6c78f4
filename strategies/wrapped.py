"""Checks of the Flower strategy MEKD wraps: what it names, how many nodes it waits for, what it sends.

Why before any phase runs: a wrapped strategy whose record names or weight key differ from MEKD's
would escape its checks (a weight key of its own would escape the cap on what a client may claim);
one that waits for more nodes than a cohort holds would wait forever; and one that sends its clients
a key MEKD's client handlers do not honour (a DP client-side clipping norm, a custom key) would be
ignored in silence. Each is refused in one line.
"""

from __future__ import annotations

import copy

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from strategies import protocol as P
from strategies.failures import RunFailed
from strategies.sampling import Cohort, seeded_global_random


def layers(strategy: Strategy) -> list[Strategy]:
    """The wrapped strategy and those it wraps in turn (a DP wrapper keeps its own in `.strategy`)."""
    layer, found = strategy, []
    while isinstance(layer, Strategy) and len(found) < 8:
        found.append(layer)
        layer = getattr(layer, "strategy", None)
    return found


def check_names(strategy: Strategy, weighted_by_key: str) -> None:
    """Refuse a wrapped strategy whose record names or weight key differ from MEKD's."""
    for layer in layers(strategy):
        for name, own in (
            ("weighted_by_key", weighted_by_key),
            ("arrayrecord_key", P.ARRAYS),
            ("configrecord_key", P.CONFIG),
        ):
            value = getattr(layer, name, own)
            if value != own:
                raise ValueError(
                    f"strategy={type(layer).__name__}({name}={value!r}) is not accepted; "
                    f"accepted: {name}={own!r} (MEKD checks and caps what it names)"
                )


def check_cohort(strategy: Strategy, train: bool, size: int) -> None:
    """Refuse a cohort smaller than the wrapped strategy waits for: Flower's sampling would otherwise
    wait forever for nodes that a fixed cohort never gains."""
    for layer in layers(strategy):
        for name in ("min_available_nodes", "min_train_nodes" if train else "min_evaluate_nodes"):
            want = getattr(layer, name, 0)
            if isinstance(want, int) and want > size:
                raise RunFailed(
                    f"{type(layer).__name__}({name}={want}) needs more clients than the "
                    f"{size} eligible for this {'train' if train else 'evaluate'} round; "
                    f"lower it (MEKD samples the cohort itself: fraction_train, min_train_nodes)"
                )


def check_keys(strategy: Strategy, arrays: ArrayRecord, config: ConfigRecord) -> None:
    """Refuse a wrapped strategy that adds to a round's config a key MEKD's clients do not honour.

    A dry run of the strategy's `configure_train` on a copy (no message is sent, the real strategy's
    state is untouched) shows what it adds to `config` (the config the clients would get); besides its keys,
    `protocol.WRAPPED_KEYS` are those a wrapped strategy may add (FedProx's proximal-mu).
    """
    probe = copy.deepcopy(strategy)
    for layer in layers(probe):  # a one-node cohort: the dry run must not wait for more
        for name in ("min_available_nodes", "min_train_nodes"):
            if isinstance(getattr(layer, name, None), int):
                setattr(layer, name, 1)
    with seeded_global_random(0):
        messages = list(probe.configure_train(1, arrays, ConfigRecord(dict(config)), Cohort([0])))
    known = set(config.keys()) | set(P.WRAPPED_KEYS) | set(P.STRATEGY_KEYS)
    for msg in messages[:1]:
        record = msg.content.config_records.get(P.CONFIG)
        added = sorted(set(record.keys()) - known) if record is not None else []
        if added:
            raise ValueError(
                f"strategy={type(strategy).__name__} sends its clients {', '.join(map(repr, added))}, which MEKD's "
                f"distillation does not honour; accepted: a strategy that adds only {', '.join(P.WRAPPED_KEYS)}"
            )
