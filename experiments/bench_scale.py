"""Benchmark (not a test): what a run costs as the population grows while the cohort stays fixed.

One `mekd-fl run` per population N (default 10, 100, 1,000, 10,000 clients), each a subprocess with the same
settings but `num-clients`: a fixed cohort of `--cohort` clients per round (`fraction-train` = cohort / N),
`emulator-phase=lazy` (a client trains its emulator and queries the teacher only the first time it is
sampled), `--rounds` rounds (1), `partition=iid`, the default Fashion-MNIST data and the default teacher
(cached for seed 42, so nothing retrains), `emulator-steps=20`, no emulator FID, no samples, no fidelity.

Measured per population, from outside the run: its wall time (the subprocess, start to exit), the time to its
first console line, and the peak, over samples every `--interval` seconds, of the PSS summed over the run's whole
process tree (the `mekd-fl` process and every descendant, Ray's gcs_server, raylet and workers included:
/proc/*/stat parent links, /proc/PID/smaps_rollup), so pages shared between processes count once. Measured by
the run itself: its typed summary (`mekd_fl.server.summary.RunSummary` read from summary.json: `timeline`, when each
step ended; `phase-seconds`, the time spent in the emulator and query phases; `wall-seconds`, `clients-prepared`,
`queries-total`) and its `metrics.jsonl` (`elapsed-s` per round). The run's times count from the moment the run
began (the ServerApp's start, after the imports and Flower's start), not from the process's start; the rest of
the wall time (imports, Flower's and Ray's start and shutdown, the plots after the summary) is `outside-run-s`
in results.jsonl (wall minus the run's `wall-seconds`). Columns: wall (the subprocess, start to exit); setup
(since the run began, to the first phase: settings and data checks, the split, the server's set-up, waiting for
the nodes, and with lazy phases the initial evaluation), of which "to first line" (since the run began, to the
run folder being ready: the run says its first line, "[setup] run folder", there), "server setup" (from there
to the nodes being ready: split table, partition.json, label_distribution.png, teacher, test logits, the
strategy, waiting for the nodes) and "initial eval" (round 0: the global student on the test set); emulator+query
(`phase-seconds`: the lazy phases, or the upfront ones); s/round (`elapsed-s` differences in metrics.jsonl: with
lazy phases round 1 holds them) and s/round without the lazy phases; after last round (the last round's end to
the run's own end: samples, summary.json). results.jsonl also holds each process's PSS at the peak. At the end,
the ratio of each population's wall time to the smallest population's (the issue's target: 1,000 clients <= 2 x
10 clients on CPU, 1 round, cohort 10).

The data set is fixed, so a client's share shrinks as N grows (2,700 images at N=10, 30 at N=1,000), and with it
the cohort's work: 10 clients of N=10 query 19,800 images and distill on them, 10 of N=1,000 only 200.
`--set query-budget=20` gives every cohort the same work (20 query images per client, as at N=1,000), so that
the ratio shows what the population itself costs.

Settings that make 10,000 clients run: the 30,000 client images give each of 10,000 clients 3; with the default
`client-test-fraction=0.1` a client holds round(0.3) = 0 test images and its evaluation reply (num-examples 0)
is refused as a failure. `client-test-fraction=0.34` (the default here, for every population, so that only
`num-clients` differs) leaves 2 training and 1 test image each: distillation's batch of 2 trains (batches of
fewer than 2 are skipped) and evaluation counts. `fraction-evaluate` defaults to cohort / min(N, cohort x rounds):
evaluation samples among the clients that hold answers (the ones prepared so far), so with 1 round it is 1.0,
the same 10 clients as trained (cohort / N would evaluate 1 client for N >= 100).

The child gets `RAY_ADDRESS=local`, so that it starts a private Ray instance (its processes are then in its
tree) instead of attaching to one already running. Ctrl-C (or SIGTERM to this script) and `--timeout` end the
run by its PID (SIGTERM, then SIGKILL after 15 s) and then its leftover descendants, by PID; an interrupted
population is left out of the table.

Output: a table on stdout; under `--out` (default `experiments/runs/bench-scale/<time>/`, git-ignored):
`results.jsonl` (one line per population), `results.md` (the table, the command and the load), `N.log` (the
run's console) and the run folders `runs/scale-N/`. Usage:
`python experiments/bench_scale.py [--populations 10 100 1000 10000] [--cohort 10] [--rounds 1] [--timeout 1800]
[--emulator-steps 20] [--client-test-fraction 0.34] [--fraction-evaluate F] [--set key=value ...] [--out DIR]
[--interval 0.5] [--client-cpus 1] [--mekd-fl PATH]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mekd_fl.server.summary import RunSummary

ROOT = Path(__file__).resolve().parent.parent
MEKD_FL = ROOT / ".venv" / "bin" / "mekd-fl"
#: How a run's console says it failed (its error, when it wrote no summary.json).
FAILED_LINES = ("[failed] ", "mekd-fl: error: ")


# ---------------------------------------------------------------------------------------------- process tree
def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """The root and every process under it, as {pid: start time}."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        info = _stat(int(entry.name))
        if info is None:
            continue
        children.setdefault(info[0], []).append(int(entry.name))
        starts[int(entry.name)] = info[1]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in tree:
            tree[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return tree


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 when it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Every `interval` s: the PSS summed over the process tree under `root`; keeps the peak and the pids seen."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.peak_kib, self.peak_procs, self.peak_at, self.samples = 0, 0, 0.0, 0
        self.max_procs = 0
        self.peak_each: dict[int, tuple[str, int]] = {}  # pid -> (name, PSS KiB) at the peak
        self.seen: dict[int, int] = {}  # pid -> start time, for killing leftovers by pid (not a reused one)
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        tree = descendants(self.root)
        if not tree:
            return
        self.seen.update(tree)
        each = {pid: pss_kib(pid) for pid in tree}
        total = sum(each.values())
        self.samples += 1
        self.max_procs = max(self.max_procs, len(tree))
        if total > self.peak_kib:
            self.peak_kib, self.peak_procs, self.peak_at = total, len(tree), time.monotonic() - self.t0
            self.peak_each = {pid: (process_name(pid), kib) for pid, kib in each.items()}


def process_name(pid: int) -> str:
    """A short name: Ray's processes name themselves (ray::ClientAppActor, raylet, gcs_server)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in args if a]
    if not words:
        return "?"
    script = next((Path(w).name for w in words[1:3] if w.endswith(".py") or w.endswith("mekd-fl")), "")
    return f"{Path(words[0]).name} {script}".strip()[:60]


def end_tree(proc: subprocess.Popen, seen: dict[int, int], grace: float = 15.0) -> None:
    """Stop the run by its pid (SIGTERM, SIGKILL after `grace` s), then whatever is left of its tree, by pid."""
    if proc.poll() is None:
        seen.update(descendants(proc.pid))
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, start in seen.items():
        info = _stat(pid)
        if pid != proc.pid and info is not None and info[1] == start:  # still the same process
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------- one run
def settings_for(n: int, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The `mekd-fl run` settings of population `n` (only num-clients and the fractions differ)."""
    fraction_train = min(1.0, args.cohort / n)
    while int(n * fraction_train) < min(n, args.cohort):  # float rounding must not shrink the cohort
        fraction_train = math.nextafter(fraction_train, 2.0)
    fraction_train = min(1.0, fraction_train)
    fraction_evaluate = args.fraction_evaluate or min(1.0, args.cohort / min(n, args.cohort * args.rounds))
    settings = {
        "seed": 42,
        "num-clients": n,
        "partition": "iid",
        "fraction-train": repr(fraction_train),
        "fraction-evaluate": repr(fraction_evaluate),
        "emulator-phase": "lazy",
        "num-rounds": args.rounds,
        "emulator-steps": args.emulator_steps,
        "emulator-fid": "false",
        "num-samples": 0,
        "fidelity-images": 0,
        "client-test-fraction": args.client_test_fraction,
        "device": "cpu",
        "run-name": f"scale-{n}",
        "out-dir": str(out_dir / "runs"),
    }
    for pair in args.set:
        key, _, value = pair.partition("=")
        settings[key] = value
    return [f"{k}={v}" for k, v in settings.items()]


def read_run(folder: Path) -> dict:
    """The run's own numbers: metrics.jsonl (`elapsed-s` per round) and its typed summary (what exists)."""
    out: dict = {}
    round0 = None
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        elapsed = {r["round"]: r["elapsed-s"] for r in rounds if "elapsed-s" in r}
        out["round-s"] = [elapsed[r] - elapsed[r - 1] for r in sorted(elapsed) if r > 0 and r - 1 in elapsed]
        out["round0-s"] = round0 = elapsed.get(0)
        out["student-accuracy"] = rounds[-1].get("server/accuracy") if rounds else None
    if not (folder / "summary.json").is_file():
        return out
    try:
        summary = RunSummary.read(folder / "summary.json")
    except ValueError as exc:
        return {**out, "status": "unreadable summary.json", "error": str(exc)}
    out.update(
        {
            "status": summary.status,
            "error": summary.error,
            "wall-seconds": summary.wall_seconds,
            "clients-prepared": summary.clients_prepared,
            "queries-total": summary.queries_total,
            "rounds-done": summary.rounds_done,
            "failures": len(summary.failures),
        }
    )
    return {**out, **phase_times(summary, round0)}


def phase_times(summary: RunSummary, round0: float | None) -> dict:
    """Setup, phase and tail times by the run's own clock (seconds since the run began): its `timeline` and
    `phase-seconds`; `round0` is round 0's `elapsed-s` (the initial evaluation). None where a step is missing."""
    t, seconds = summary.timeline, summary.phase_seconds
    emulator, query = seconds.get("emulator"), seconds.get("query")
    phases = None if emulator is None or query is None else emulator + query
    lazy = summary.emulator_phase == "lazy"
    # The nodes ready, the first phase about to begin: the rounds' clock (`elapsed-s`) starts after the upfront phases.
    ready = None
    if "round-0" in t and round0 is not None and (lazy or phases is not None):
        ready = t["round-0"] - round0 - (0.0 if lazy else phases)
    rounds = sorted(int(k.split("-", 1)[1]) for k in t if k.startswith("round-"))
    end = seconds.get("total", summary.wall_seconds)
    return {
        "setup-s": t.get("round-0") if lazy else ready,  # the lazy phases begin with round 1
        "setup-line-s": t.get("folder-ready"),
        "server-setup-s": _diff(ready, t.get("folder-ready")),
        "teacher-loaded-s": t.get("teacher-loaded"),
        "emulator-s": emulator,
        "query-s": query,
        "phases-s": phases,
        "phases-in-rounds": lazy,
        "round-ends-s": {str(r): t[f"round-{r}"] for r in rounds},
        "tail-s": _diff(end, t[f"round-{rounds[-1]}"]) if rounds else None,
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_population(n: int, args: argparse.Namespace, out: Path, current: dict) -> dict:
    cmd = [str(args.mekd_fl), "run", *settings_for(n, args, out), "--client-cpus", str(args.client_cpus)]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    log_path = out / f"{n}.log"
    lines: list[tuple[float, str]] = []
    row: dict = {"clients": n, "command": shlex.join(cmd), "load-before": loadavg()}
    print(f"\n=== {n} clients: {row['command']}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    sampler = TreeSampler(proc.pid, args.interval)
    current.update(proc=proc, sampler=sampler)
    sampler.start()

    def reader() -> None:
        with log_path.open("w") as log:
            for line in proc.stdout:  # type: ignore[union-attr]
                t = time.monotonic() - t0
                lines.append((t, line.rstrip("\n")))
                log.write(f"{t:8.2f} {line}")
                log.flush()
                if args.echo or not line.startswith("[emulator] client "):
                    print(f"  {t:7.1f}s | {line}", end="", flush=True)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    status = "ok"
    try:
        proc.wait(args.timeout)
    except subprocess.TimeoutExpired:
        status = f"timeout after {args.timeout:g}s"
        end_tree(proc, sampler.seen)
    wall = time.monotonic() - t0
    sampler.stop_event.set()
    sampler.join()
    thread.join(5)
    end_tree(proc, sampler.seen)  # Ray processes that outlived the run, if any
    current.clear()
    run = read_run(out / "runs" / f"scale-{n}")
    if status == "ok":  # the run's own word, when it exited by itself
        status = run.get("status", "no summary.json") if proc.returncode == 0 else f"exit {proc.returncode}"
    rounds, phases = run.get("round-s", []), run.get("phases-s")
    in_rounds = phases if run.get("phases-in-rounds") else 0.0  # the lazy phases are in round 1's time
    ex_phases = (sum(rounds) - in_rounds) / len(rounds) if rounds and in_rounds is not None else None
    row.update(
        {
            "status": status,
            "wall-s": round(wall, 1),
            "run-wall-s": run.get("wall-seconds"),
            "outside-run-s": _diff(wall, run.get("wall-seconds")),
            "setup-s": _r(run.get("setup-s")),
            "setup-line-s": _r(run.get("setup-line-s")),
            "server-setup-s": run.get("server-setup-s"),
            "teacher-loaded-s": _r(run.get("teacher-loaded-s")),
            "first-line-s": _r(lines[0][0]) if lines else None,
            "round0-s": run.get("round0-s"),
            "emulator-s": _r(run.get("emulator-s")),
            "query-s": _r(run.get("query-s")),
            "phases-s": _r(phases),
            "round-ends-s": run.get("round-ends-s"),
            "round-s": [round(r, 2) for r in rounds],
            "round-mean-s": _r(sum(rounds) / len(rounds)) if rounds else None,
            "round-ex-phases-s": _r(ex_phases),
            "tail-s": run.get("tail-s"),
            "peak-pss-gib": round(sampler.peak_kib / 2**20, 3),
            "peak-at-s": round(sampler.peak_at, 1),
            "procs-at-peak": sampler.peak_procs,
            "pss-at-peak-mib": {
                f"{pid} {name}": kib // 1024
                for pid, (name, kib) in sorted(sampler.peak_each.items(), key=lambda item: -item[1][1])
            },
            "max-procs": sampler.max_procs,
            "samples": sampler.samples,
            "clients-prepared": run.get("clients-prepared"),
            "queries": run.get("queries-total"),
            "failures": run.get("failures"),
            "student-accuracy": run.get("student-accuracy"),
            "error": run.get("error") or next((x for _, x in lines if x.startswith(FAILED_LINES)), None),
            "load-after": loadavg(),
        }
    )
    return row


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _diff(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else round(end - start, 1)


# ---------------------------------------------------------------------------------------------- report
COLUMNS = [
    ("clients", "clients"),
    ("status", "status"),
    ("wall-s", "wall s"),
    ("setup-s", "setup s"),
    ("setup-line-s", "of which to first line s"),
    ("server-setup-s", "server setup s"),
    ("round0-s", "initial eval s"),
    ("phases-s", "emulator+query s"),
    ("round-mean-s", "s/round"),
    ("round-ex-phases-s", "s/round ex phases"),
    ("tail-s", "after last round s"),
    ("peak-pss-gib", "peak PSS GiB"),
    ("max-procs", "procs"),
    ("clients-prepared", "prepared"),
    ("queries", "queries"),
]


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        out.append("| " + " | ".join("" if row.get(k) is None else str(row[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    done = [r for r in rows if r["status"] == "completed"]
    if len(done) < 2:
        return []
    base = min(done, key=lambda r: r["clients"])
    return [
        f"wall({r['clients']}) / wall({base['clients']}) = {r['wall-s'] / base['wall-s']:.2f}"
        + (" (target <= 2)" if r["clients"] == 1000 and base["clients"] == 10 else "")
        for r in done
        if r is not base
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--cohort", type=int, default=10, help="clients trained per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--emulator-steps", type=int, default=20)
    parser.add_argument("--client-test-fraction", type=float, default=0.34)
    parser.add_argument("--fraction-evaluate", type=float, default=None, help="default: cohort / min(N, cohort x R)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run settings, for every N")
    parser.add_argument("--client-cpus", type=float, default=1.0, help="`mekd-fl run --client-cpus`")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per population")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/runs/bench-scale/<time>")
    parser.add_argument("--mekd-fl", type=Path, default=MEKD_FL)
    parser.add_argument("--echo", action="store_true", help="also echo the per-client emulator lines")
    args = parser.parse_args()
    out = args.out or ROOT / "experiments" / "runs" / "bench-scale" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    rows: list[dict] = []
    current: dict = {}
    # Ctrl-C and SIGTERM both stop cleanly, also when started in the background (where a shell may have set
    # SIGINT to be ignored, and Python then keeps it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_start = loadavg()
    try:
        for n in args.populations:
            row = run_population(n, args, out, current)
            rows.append(row)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"=== {n} clients: {row['status']}, wall {row['wall-s']}s, peak PSS {row['peak-pss-gib']} GiB")
    except KeyboardInterrupt:
        if current:
            print(f"\ninterrupted: stopping the run (pid {current['proc'].pid}) and its processes", flush=True)
            end_tree(current["proc"], current["sampler"].seen)
        print("interrupted", flush=True)
    report = [
        f"`{command}` (load average before {load_start}, after {loadavg()}; {os.cpu_count()} CPUs)",
        "",
        table(rows),
        "",
        *[f"- {line}" for line in ratios(rows)],
    ]
    for row in rows:
        if row["status"] != "completed":
            error = f": {row['error']}" if row.get("error") else ""
            report.append(f"- {row['clients']} clients: {row['status']}{error}")
    text = "\n".join(report)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text + f"\n\nwritten: {out}/results.jsonl, results.md, N.log, runs/")
    return 0 if rows and all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
