"""Averaging the clients' emulators (a federated emulator): checked, bounded, uniform.

Why a unit of its own: emulator weights are as hostile as student updates, but they are averaged
uniformly (the clients' own sizes are not trusted here) and checked against a reference structure
that may not exist yet in the first averaging round. Pure functions of messages and arrays.

Two bounds, because one is not enough with two clients. The distance bound (`bound_norms`) measures
each upload against a centre; in the first averaging round there is no previous average, the centre is
the median of the uploads, and with two clients that is their midpoint: both are equally far from it
and the bound never fires. So each upload's own norm is also compared with the lower median of the
round's norms (the smaller one with two clients, an honest one while honest clients are at least
half), or with the norm of the server's own reference or previous average when that is larger: an
upload longer than `outlier_factor` times it is refused, a recorded failure. Honest emulators of one
architecture, trained for the same steps, have norms within a few percent (DCGAN generators of three
seeds at initialisation: 27.44-27.49).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from strategies import protocol as P
from strategies.updates import Arrays, bound_norms, like_reference, norm, sanitize

KEYS = (P.GENERATOR, P.DISCRIMINATOR)


def reference_of(
    key: str, given: Mapping[str, ArrayRecord], previous: Mapping[str, ArrayRecord], replies: list[Message]
) -> dict[str, np.ndarray]:
    """The structure emulator weights must have: the given reference, the previous average, or else the
    structure a strict majority of the replies share (none: every reply is refused)."""
    source = given.get(key) or previous.get(key)
    if source is None:
        shapes: dict[str, int] = {}
        for reply in replies:
            record = reply.content.array_records.get(key)
            if record is not None:
                sig = repr(sorted((k, tuple(record[k].shape), record[k].dtype) for k in record.keys()))
                shapes[sig] = shapes.get(sig, 0) + 1
                if shapes[sig] * 2 > len(replies):
                    source = record
                    break
    return {k: source[k].numpy() for k in source.keys()} if source is not None else {}


def checked_weights(
    reply: Message, references: Mapping[str, Mapping[str, np.ndarray]]
) -> tuple[dict[str, Arrays] | None, str | None]:
    """A reply's generator and discriminator in the reference dtypes, or (None, why refused)."""
    parts: dict[str, Arrays] = {}
    for key in KEYS:
        record = reply.content.array_records.get(key)
        if record is None:
            return None, f"no '{key}' weights"
        try:
            arrays = {k: record[k].numpy() for k in record.keys()}
        except Exception as exc:  # noqa: BLE001  (a malformed Array can fail to decode in many ways)
            return None, f"'{key}' unreadable: {type(exc).__name__}"
        parts[key], reason = sanitize(arrays, references[key])
        if reason:
            return None, f"{key}: {reason}"
    return parts, None


def too_long(
    cleaned: Mapping[int, Mapping[str, Arrays]], factor: float, floors: Mapping[str, float] | None = None
) -> dict[int, str]:
    """The nodes whose generator or discriminator norm exceeds `factor` times the yardstick of that part,
    with why (0 = off; one upload, or a zero yardstick, is never refused).

    The yardstick is the lower median of the round's norms, or the server's own norm of that part
    (`floors`: the fresh reference, the previous average) when larger. The floor only loosens the bound:
    with two clients, one that shrinks its upload would otherwise make the honest one look long."""
    if factor <= 0 or len(cleaned) < 2:
        return {}
    out: dict[int, str] = {}
    for key in KEYS:
        norms = {node: norm(parts[key]) for node, parts in cleaned.items()}
        yardstick = max(sorted(norms.values())[(len(norms) - 1) // 2], (floors or {}).get(key, 0.0))
        if yardstick <= 0:
            continue
        for node, length in norms.items():
            if length > factor * yardstick and node not in out:
                out[node] = f"{key} norm {length:.3g} is over {factor:g} x {yardstick:.3g} (median or server norm)"
    return out


def server_norms(given: Mapping[str, ArrayRecord], previous: Mapping[str, ArrayRecord]) -> dict[str, float]:
    """The norm of each part the server holds itself (never one a client sent): the larger of the fresh
    reference's and the previous average's."""
    out: dict[str, float] = {}
    for key in KEYS:
        records = [r for r in (given.get(key), previous.get(key)) if r is not None]
        lengths = []
        for record in records:
            try:
                lengths.append(norm({k: np.asarray(record[k].numpy()) for k in record.keys()}))
            except Exception:  # noqa: BLE001  (an unreadable reference gives no floor, not a crash)
                continue
        out[key] = max(lengths, default=0.0)
    return out


def average_emulators(
    replies: list[Message],
    previous: dict[str, ArrayRecord],
    given: Mapping[str, ArrayRecord],
    outlier_factor: float,
    label: Callable[[int], int],
) -> tuple[dict[str, ArrayRecord], list[int], list[tuple[int, str]], list[tuple[str, int, float, float]]]:
    """Uniform average of the checked emulator weights.

    An upload whose norm is over `outlier_factor` times the round's lower median norm is refused
    (`too_long`); the others are scaled onto the distance bound (`bound_norms`). Returns the average
    (the previous one when no reply is usable), the contributing nodes (by label), the refused
    (node, reason) and the scaled (key, node, norm, bound).
    """
    references = {key: reference_of(key, given, previous, replies) for key in KEYS}
    cleaned: dict[int, dict[str, Arrays]] = {}
    refused: list[tuple[int, str]] = []
    for reply in replies:
        parts, reason = checked_weights(reply, references)
        if parts is None:
            refused.append((reply.metadata.src_node_id, f"emulator weights refused: {reason}"))
        else:
            cleaned[reply.metadata.src_node_id] = parts
    for node, reason in too_long(cleaned, outlier_factor, server_norms(given, previous)).items():
        del cleaned[node]
        refused.append((node, f"emulator weights refused: {reason}"))
    nodes = sorted(cleaned, key=label)
    if not nodes:
        return previous, [], refused, []
    averaged: dict[str, ArrayRecord] = {}
    scaled_all: list[tuple[str, int, float, float]] = []
    for key in KEYS:
        center = {k: v.numpy() for k, v in previous[key].items()} if key in previous else None
        updates, scaled = bound_norms([cleaned[n][key] for n in nodes], center, outlier_factor=outlier_factor)
        scaled_all += [(key, nodes[i], norm, bound) for i, norm, bound in scaled]
        mean = {k: np.mean(np.stack([u[k].astype(np.float64) for u in updates]), axis=0) for k in updates[0]}
        out = like_reference({k: np.asarray(v) for k, v in mean.items()}, updates[0])
        for k, v in updates[0].items():  # floats back to their own width (like_reference rounds integers)
            if v.dtype.kind == "f":
                out[k] = np.asarray(mean[k], dtype=v.dtype)
        averaged[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})
    return averaged, nodes, refused, scaled_all
