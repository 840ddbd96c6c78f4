"""One flat record per round, and a resumed run's own round numbers in Flower's `Result`.

Why a unit of its own: the project's ServerApp saves the student and appends `metrics.jsonl` from one
flat record per round (train, federated and server metrics, rejections, failures, queries used), built
after Flower's loop has evaluated the round. A resumed run hands Flower's loop only the rounds left,
which Flower counts from 1; the `Result` is renumbered to the run's own rounds afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.serverapp.strategy import Result


def round_record(
    server_round: int,
    elapsed: float,
    parts: Mapping[str, Mapping | None],
    rejected: int,
    failures: list[dict],
    server: Mapping | None,
    queries_used: int,
) -> dict:
    """The round's record: `parts` maps a prefix (train, fed) to the aggregated client metrics."""
    record: dict = {"round": server_round, "elapsed-s": round(elapsed, 2)}
    if server_round > 0:
        record.update({f"{part}/{k}": v for part, metrics in parts.items() for k, v in (metrics or {}).items()})
        record["rejected"] = rejected
        record["failures"] = list(failures)
    record.update({f"server/{k}": v for k, v in (server or {}).items()})
    record["queries-used"] = queries_used
    return record


def shift_rounds(result: Result, offset: int) -> Result:
    """Renumber a `Result` of Flower's loop (rounds 1..n) to the run's rounds offset+1..offset+n."""
    if offset:
        histories = (result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
        for history in histories:
            for r in sorted(history, reverse=True):
                history[r + offset] = history.pop(r)
        served = result.evaluate_metrics_serverapp
        for r in sorted((r for r in served if r > 0), reverse=True):
            served[r + offset] = served.pop(r)
    return result
