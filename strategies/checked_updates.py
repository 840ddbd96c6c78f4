"""A round's replies made safe for the wrapped strategy: checked, weighed, bounded, rebuilt.

Why a unit of its own: the wrapped Flower strategy aggregates whatever it is given, so MEKD hands it
only updates that passed every check, in the global model's dtypes, scaled onto the norm bound, each
weighted by at most the answers its client holds, with one clean MetricRecord of the metrics all
accepted replies share. A reply whose metrics are not numbers in their known range is refused whole:
its metrics would be averaged into the round's results, and a client that lies there is not trusted
with the model either. Plain functions of messages and arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from strategies import protocol as P
from strategies.updates import Arrays, check_metrics, example_weight, sanitize


def check_update(
    reply: Message, reference: Mapping[str, np.ndarray] | None, cap: int | None, weighted_by_key: str
) -> tuple[Arrays | None, float | None, str | None]:
    """A reply's update in the reference dtypes and its capped weight, or (None, None, why refused)."""
    if reply.has_error():
        return None, None, f"client error: {reply.error.reason}"
    content = reply.content
    if len(content.array_records) != 1:
        return None, None, f"expected 1 ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return None, None, f"expected 1 MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight, why = example_weight(metrics.get(weighted_by_key), cap)
    if why:
        return None, None, f"'{weighted_by_key}' {why}"
    _, why = check_metrics(dict(metrics), P.MAX_METRICS, (P.PARTITION_ID,))
    if why:  # a client that misreports its metrics is not trusted with the model either
        return None, None, why
    record = next(iter(content.array_records.values()))
    try:
        arrays = {k: record[k].numpy() for k in record.keys()}
    except Exception as exc:  # noqa: BLE001  (a malformed Array can fail to decode in many ways)
        return None, None, f"arrays unreadable: {type(exc).__name__}"
    if reference is None:
        return arrays, weight, None
    clean, why = sanitize(arrays, reference)
    return clean, weight, why


def rebuild(
    replies: list[Message], updates: list[Arrays], weights: list[float], metric_sets: list[dict], weighted_by_key: str
) -> None:
    """Replace each accepted reply's content with its checked update and the metrics all replies share
    (the weight key set to the capped weight), under the record names the wrapped strategy reads."""
    shared = set.intersection(*(set(m) for m in metric_sets)) - {P.PARTITION_ID} if metric_sets else set()
    for msg, arrays, weight, metrics in zip(replies, updates, weights, metric_sets):
        kept = {k: metrics[k] for k in sorted(shared)}
        kept[weighted_by_key] = weight
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        msg.content = RecordDict({P.ARRAYS: record, P.METRICS: MetricRecord(kept)})
