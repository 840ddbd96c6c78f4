"""Benchmark (not a test): what Flower's Deployment Engine costs against the in-process simulation.

The same tiny run twice, one after the other, in one invocation: `mekd-fl run` (the in-process
simulation, Ray) and `mekd-fl deploy-local` (Flower's Deployment Engine on loopback: a SuperLink with
TLS and N authenticated SuperNodes, N = num-clients, each reading its own partition). The in-process run
goes first so that both use the same cached teacher. Both must reach the same per-round accuracies.

Measured from outside: each command's wall time. Measured by each run (summary.json, metrics.jsonl):
its own time (`wall-seconds`, from the ServerApp's start), the emulator and query phases, the rounds, and
the time after the last round (samples, summary). The overhead per message is the difference of the two
runs' own times divided by the messages each node answers: 1 emulator (federated: rounds + 1), 2 for the
queries (images, answers), 2 per round (train, evaluate) and 1 for the samples when num-samples > 0.
Under the Deployment Engine every message is a fresh ClientApp process (Flower 1.42), and an idle
SuperNode looks for messages every 3 s; see docs/deployment.md ("What the Deployment Engine costs").

Output: a Markdown table and the ratios on stdout; `results.md` (table, command, machine, load) and
`results.jsonl` (one line per engine) under `--out` (default `experiments/runs/bench-deploy/<time>/`,
git-ignored). Run it alone: two heavy jobs on 2 cores distort both timings.

Usage: `python experiments/bench_deploy.py [--set key=value ...] [--timeout 900] [--out DIR]
[--mekd-fl PATH]` (defaults: dataset=synthetic num-clients=2 num-rounds=2).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from mekd_fl.bench.timing import parse_value, read_run, write_results
from mekd_fl.bench.timing import run_command as run
from mekd_fl.runtime.deploy.local import port_free, toml_value

DEFAULTS = {"dataset": "synthetic", "num-clients": 2, "num-rounds": 2}
ENGINES = ("in-process", "deploy-local")


def free_ports(nodes: int) -> tuple[int, int]:
    """A free port for the SuperLink, and the first of `nodes` consecutive free ports for the SuperNodes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        link = s.getsockname()[1]
    for first in range(20000, 60000, nodes + 1):
        if link not in range(first, first + nodes) and all(port_free(p) for p in range(first, first + nodes)):
            return link, first
    raise RuntimeError("no free ports for the SuperNodes")


def plan(settings: dict, out: Path, mekd_fl: str, ports: tuple[int, int], timeout: float) -> dict[str, list[str]]:
    """The two commands, each with its own run-name under `out/runs`."""
    common = {**settings, "out-dir": str(out / "runs")}
    local = {**common, "run-name": "in-process"}
    deployed = {**common, "run-name": "deploy-local"}
    pairs = " ".join(f"{k}={toml_value(v)}" for k, v in deployed.items())
    return {
        "in-process": [mekd_fl, "run", *(f"{k}={v}" for k, v in local.items())],
        "deploy-local": [
            mekd_fl, "deploy-local", "--supernodes", str(settings["num-clients"]), "--workdir", str(out / "work"),
            "--port", str(ports[0]), "--node-port", str(ports[1]), "--timeout", str(int(timeout)),
            "--run-config", pairs,
        ],
    }  # fmt: skip


def exchanges(settings: dict) -> int:
    """Messages one node answers in the run (see the module docstring)."""
    from mekd_fl.config import RunConfig  # the defaults of the settings not given

    defaults = RunConfig()
    federated = settings.get("federated-emulator", defaults.federated_emulator)
    emulator = int(settings.get("emulator-rounds", defaults.emulator_rounds)) + 1 if federated else 1
    samples = 1 if int(settings.get("num-samples", defaults.num_samples)) > 0 else 0
    return emulator + 2 + 2 * int(settings["num-rounds"]) + samples


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def report(rows: dict[str, dict], messages: int) -> str:
    """The Markdown table, the ratios deploy-local / in-process and the overhead per message."""
    cols = ("wall-s", "run-s", "setup-s", "emulator-s", "query-s", "s-per-round", "after-last-round-s")
    lines = ["| engine | status | " + " | ".join(cols) + " | accuracy |", "|---" * (len(cols) + 3) + "|"]
    for engine in ENGINES:
        r = rows.get(engine, {})
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), int | float) else "-" for c in cols]
        acc = r.get("accuracy")
        lines.append(
            f"| {engine} | {r.get('status', 'missing')} | " + " | ".join(cells) + f" | {acc if acc else '-'} |"
        )
    a, b = rows.get("deploy-local", {}), rows.get("in-process", {})
    if a.get("status") == "completed" and b.get("status") == "completed":
        lines.append("")
        parts = {"wall": "wall-s", "run": "run-s", "emulator": "emulator-s", "per round": "s-per-round"}
        lines.append("deploy-local / in-process: " + ", ".join(f"{k} {ratio(a[v], b[v])}" for k, v in parts.items()))
        per = (a["run-s"] - b["run-s"]) / messages
        lines.append(
            f"overhead per message: {per:.1f} s ({messages} messages per node: emulator, queries, answers, "
            "train and evaluate per round, samples)"
        )
        same = a["accuracies"] == b["accuracies"]
        lines.append(
            "per-round accuracies: " + ("identical" if same else f"DIFFER: {a['accuracies']} vs {b['accuracies']}")
        )
    else:
        lines.append("")
        lines.append("no ratio: a run did not complete (see its log)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--mekd-fl", default=str(Path(sys.executable).with_name("mekd-fl")))
    args = parser.parse_args()
    settings = {**DEFAULTS, **{k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}}
    out = Path(args.out or f"experiments/runs/bench-deploy/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    commands = plan(settings, out, args.mekd_fl, free_ports(int(settings["num-clients"])), args.timeout)
    rows: dict[str, dict] = {}
    for engine in ENGINES:
        print(f"[bench] {engine}: {shlex.join(commands[engine])}", flush=True)
        wall = run(commands[engine], out / f"{engine}.log", args.timeout)
        rows[engine] = {"engine": engine, "wall-s": wall, **read_run(out / "runs" / engine)}
        print(f"[bench] {engine}: {rows[engine]['status']} in {wall:.0f} s", flush=True)
    table = report(rows, exchanges(settings))
    print(table)
    command = f"python experiments/bench_deploy.py {shlex.join(sys.argv[1:])}"
    context = f"on {os.cpu_count()} CPUs, load average {load[0]:.2f} at the start; settings {settings}."
    write_results(out, "Deployment Engine vs in-process", command, context, table, list(rows.values()))
    done = all(r.get("status") == "completed" for r in rows.values())
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
