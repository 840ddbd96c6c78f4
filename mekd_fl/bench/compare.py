"""`mekd-fl compare`: every method on the same teacher, partition, rounds and seed, in one table.

Why a command of its own: a comparison is only fair when the cells differ in the method alone; this
runs them in one simulation (`multirun`), so they share the cached teacher and the same split, and
reads the per-round wall time from each run's `metrics.jsonl` so the table can say what a method
costs relative to KD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mekd_fl.bench.tables import markdown_table, write_csv
from mekd_fl.config import RunConfig
from mekd_fl.server.summary import RunSummary

COLUMNS = (
    "method",
    "source-blind",
    "student acc",
    "best acc",
    "agreement",
    "client-test acc",
    "queries",
    "emulator FID",
    "s/round",
    "s/round vs KD",
    "wall s",
)


def comparison_rows(folder: Path, names: dict[str, str]) -> list[dict[str, Any]]:
    """One row per method from the runs' summary.json and metrics.jsonl files."""
    rows = []
    for method, name in names.items():
        run = folder / name
        if not (run / "summary.json").exists():
            rows.append({"method": method, "student acc": "failed"})
            continue
        summary = RunSummary.read(run / "summary.json")
        rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        per_round = rounds[-1]["elapsed-s"] / max(1, rounds[-1]["round"])
        rows.append(
            {
                "method": method,
                "source-blind": "yes" if summary.source_blind else "NO (labels)",
                "student acc": summary.student_accuracy,
                "best acc": summary.student_best_accuracy,
                "agreement": summary.student_agreement,
                "client-test acc": summary.client_test_accuracy,
                "queries": summary.queries_total,
                "emulator FID": summary.emulator_fid_mean,
                "s/round": per_round,
                "wall s": summary.wall_seconds,
            }
        )
    kd = next((r["s/round"] for r in rows if r["method"] == "kd" and "s/round" in r), None)
    for row in rows:
        if kd and "s/round" in row:
            row["s/round vs KD"] = row["s/round"] / kd
    return rows


# Columns holding fractions get 4 decimals; times, ratios and FIDs 2.
_FRACTIONS = ("student acc", "best acc", "agreement", "client-test acc")


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if column in _FRACTIONS else f"{value:.2f}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], folder: Path, caption: str) -> str:
    """Markdown (best source-blind student accuracy in bold) and CSV; returns the Markdown."""
    blind = [r["student acc"] for r in rows if r.get("source-blind") == "yes" and isinstance(r["student acc"], float)]
    best = max(blind) if blind else None
    body = []
    for row in rows:
        cells = [_fmt(row.get(c), c) for c in COLUMNS]
        if row.get("student acc") == best:
            cells[2] = f"**{cells[2]}**"
        body.append(cells)
    markdown = caption + "\n\n" + markdown_table(COLUMNS, body)
    (folder / "comparison.md").write_text(markdown)
    write_csv(folder / "comparison.csv", COLUMNS, rows)
    return markdown


def compare(base: RunConfig, methods: list[str], folder: Path, caption: str, **run_kwargs: Any) -> str:
    from mekd_fl.bench.multirun import run_configs

    prefix = base.run_name or "compare"
    names = {m: f"{prefix}-{m}" for m in methods}
    configs = [base.replace(method=m, run_name=names[m], out_dir=str(folder)) for m in methods]
    run_configs(configs, **run_kwargs)
    return write_tables(comparison_rows(folder, names), folder, caption)
