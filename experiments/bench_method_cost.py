"""Benchmark (not a test): what MEKD's emulator costs a whole run, against KD on the same settings.

Each shape is run with every method, one after the other, in one invocation, as `mekd-fl run` would be
run by a user: same seed, same cached teacher, and `answer-cache=false`, so that no method reuses the
teacher answers another one paid for. Shapes:

- `default`: `make run`'s settings (10 clients, Dirichlet 0.5, 8 rounds x 2 local epochs; about 2,700
  images per client);
- `quickstart`: the shape of `examples/quickstart-mekd`, where the emulator weighs most: small local data
  (17 IID clients, about 1,590 images each), 3 rounds of 1 local epoch, half the clients sampled per
  round, and no domain FID (the strategy's default, `measure_fid=False`).

Measured by each run (summary.json): its own time (`wall-seconds`), the emulator and query phases, the
accuracy and, for MEKD, the fidelity consistency of its emulator; from outside: each command's wall
time. The ratio printed per shape is every method's run time over the first method's (KD by default).

Output: a Markdown table and the ratios on stdout; `results.md` (table, command, machine, load) and
`results.jsonl` (one line per run) under `--out` (default `experiments/runs/bench-method-cost/<time>/`,
git-ignored). Run it alone: two heavy jobs on 2 cores distort both timings.

Usage: `python experiments/bench_method_cost.py [--shapes default quickstart] [--methods kd mekd]
[--set key=value ...] [--timeout 1800] [--out DIR] [--mekd-fl PATH]`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from mekd_fl.bench.timing import parse_value, read_run, run_command, write_results

SHAPES: dict[str, dict[str, object]] = {
    "default": {},
    "quickstart": {
        "num-clients": 17,
        "partition": "iid",
        "num-rounds": 3,
        "local-epochs": 1,
        "fraction-train": 0.5,
        "emulator-fid": False,
    },
}
COMMON = {"answer-cache": False}
COLUMNS = ("wall-s", "run-s", "emulator-s", "query-s", "s-per-round", "accuracy", "fidelity-consistency")


def plan(shape: str, method: str, extra: dict, out: Path, mekd_fl: str) -> list[str]:
    """The `mekd-fl run` command of one (shape, method), with its own run-name under `out/runs`."""
    settings = {**SHAPES[shape], **COMMON, **extra, "method": method, "run-name": f"{shape}-{method}"}
    return [mekd_fl, "run", *(f"{k}={v}" for k, v in {**settings, "out-dir": str(out / "runs")}.items())]


def _cell(value: object, column: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.3f}" if column in ("accuracy", "fidelity-consistency") else f"{value:.1f}"


def report(rows: list[dict], methods: list[str]) -> str:
    """The Markdown table (one line per run) and, per shape, each method's run time over the first method's."""
    lines = ["| shape | method | status | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        cells = " | ".join(_cell(r.get(c), c) for c in COLUMNS)
        lines.append(f"| {r['shape']} | {r['method']} | {r.get('status', 'missing')} | {cells} |")
    lines.append("")
    base = methods[0]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["method"]: r for r in rows if r["shape"] == shape}
        ref = by.get(base, {})
        ratios = []
        for method in methods[1:]:
            r = by.get(method, {})
            done = r.get("status") == "completed" and ref.get("status") == "completed" and ref.get("run-s")
            ratios.append(
                f"{method}/{base} run {r['run-s'] / ref['run-s']:.2f}, wall {r['wall-s'] / ref['wall-s']:.2f}"
                if done
                else f"{method}/{base}: no ratio (a run did not complete; see its log)"
            )
        lines.append(f"{shape}: " + "; ".join(ratios))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["kd", "mekd"], help="the first is the reference")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="added to every run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", default="")
    parser.add_argument("--mekd-fl", default=str(Path(sys.executable).with_name("mekd-fl")))
    args = parser.parse_args()
    if len(args.methods) < 2:
        parser.error("--methods needs at least two (the first is the reference)")
    extra = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = Path(args.out or f"experiments/runs/bench-method-cost/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rows: list[dict] = []
    for shape in args.shapes:
        for method in args.methods:
            command = plan(shape, method, extra, out, args.mekd_fl)
            print(f"[bench] {shape} {method}: {shlex.join(command)}", flush=True)
            wall = run_command(command, out / f"{shape}-{method}.log", args.timeout)
            row = {"shape": shape, "method": method, "wall-s": wall, **read_run(out / "runs" / f"{shape}-{method}")}
            rows.append(row)
            print(f"[bench] {shape} {method}: {row['status']} in {wall:.0f} s", flush=True)
    table = report(rows, args.methods)
    print(table)
    context = (
        f"on {os.cpu_count()} CPUs, load average {load[0]:.2f} at the start; shapes "
        f"{[SHAPES[s] for s in args.shapes]}, every run with {COMMON | extra}."
    )
    command = f"python experiments/bench_method_cost.py {shlex.join(sys.argv[1:])}"
    write_results(out, "Whole-run cost by method", command, context, table, rows)
    return 0 if all(r.get("status") == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
