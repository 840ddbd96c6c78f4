"""Timing whole runs from outside, for the benchmarks in `experiments/`: a command's wall time, and what
a finished run says about itself (summary.json, metrics.jsonl).

Why a module: the benchmarks that compare two ways of running the same thing (bench_deploy: two
engines; bench_method_cost: two methods) read and time runs the same way, so their ratios mean the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def parse_value(text: str) -> object:
    """A `--set` value as the CLI would read it: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text.strip("'\""))


def read_run(folder: Path) -> dict:
    """What the run says about itself (summary.json, metrics.jsonl); status 'missing' without a summary."""
    path = folder / "summary.json"
    if not path.is_file():
        return {"status": "missing"}
    summary = json.loads(path.read_text())
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["elapsed-s"] for r in rounds if r.get("round", 0) >= 1]
    timeline = summary.get("timeline", {})
    run_s = float(summary.get("wall-seconds", 0.0))
    last = timeline.get(f"round-{len(elapsed)}", elapsed[-1] if elapsed else 0.0)
    return {
        "status": summary.get("status"),
        "run-s": run_s,
        "setup-s": float(timeline.get("round-0", 0.0)),
        "emulator-s": float(summary.get("phase-seconds", {}).get("emulator", 0.0)),
        "query-s": float(summary.get("phase-seconds", {}).get("query", 0.0)),
        "s-per-round": (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else float("nan"),
        "last-round-at-s": float(last),
        "after-last-round-s": max(0.0, run_s - float(last)),
        "accuracies": [r.get("server/accuracy") for r in rounds],
        "accuracy": summary.get("student-accuracy"),
        "fidelity-consistency": summary.get("fidelity-consistency"),  # None without a measured emulator
    }


def run_command(argv: list[str], log: Path, timeout: float) -> float:
    """Run one command (its own session, output to `log`); its wall time. Killed by group on timeout."""
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    pass
    return time.time() - t0


def write_results(out: Path, title: str, command: str, context: str, table: str, rows: list[dict]) -> None:
    """A benchmark's `results.md` (title, date, the command and what it ran on, then the table) and
    `results.jsonl` (one line per row) under `out`, and a line saying where they are."""
    with (out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    header = f"# {title} ({time.strftime('%Y-%m-%d')})\n\n`{command}` {context}\n\n"
    (out / "results.md").write_text(header + table + "\n")
    print(f"[bench] {out / 'results.md'}, {out / 'results.jsonl'}", flush=True)
