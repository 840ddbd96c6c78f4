"""Benchmark (not a test): the CUDA paths' figures in one prepared command, for a short GPU window.

GPU time is rare and short here, so everything is measured by one command that ends within `--budget-s`
(default 450 s: an 8-minute window with room to start). Parts, in this order:

1. `step`: one optimisation step of KD and of MEKD on `cuda`, at fp32 and bf16 (bench_step's measure:
   same batch, same student, interleaved): MEKD/KD and steps per second;
2. `oracle`: the oracle's images per second (validation, budget, conversion, softmax) against the
   teacher's raw forward on the same images, on `cuda`;
3. `runs`: `mekd-fl run` with the default settings but `--rounds` rounds, at each `--levels` value of
   `--client-gpus` (0.125, 0.25, 0.5, 1: 8, 4, 2 and 1 clients per GPU), with nvidia-smi read every
   0.5 s: seconds per round, GPU utilisation (mean and peak over the rounds), peak GPU memory, accuracy;
4. the same run with `device=cpu` on this machine's cores, for the GPU/CPU ratio of seconds per round.

The runs share the remaining time by weight (the CPU run twice a GPU run's share, and what one leaves
goes to the next); a run that outlives its share is stopped and reported from the rounds it finished.
The first run trains the teacher (cached for the others: its `setup-s` shows it; seconds per round do
not include it), and no run reuses another's teacher answers (`answer-cache=false`).

Without CUDA it refuses in one line. `--rehearse-on-cpu` runs every part on the CPU instead (the runs
with `device=cpu` and no GPU share, no nvidia-smi), to check the command before a GPU window; its table
says that its figures are not GPU figures.

Output: a Markdown table on stdout, `results.md` (command, machine, tables) and `results.jsonl` (one line
per measurement) under `--out` (default `experiments/runs/bench-gpu/<time>/`, git-ignored); a GPU's
table is kept in `experiments/results/gpu/`.

Usage: `python experiments/bench_gpu.py [--levels 0.125 0.25 0.5 1] [--rounds 3] [--budget-s 450]
[--repeats 30] [--set key=value ...] [--out DIR] [--rehearse-on-cpu]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mekd_fl.bench.gpu_sampler import GpuSampler, summarise
from mekd_fl.bench.timing import parse_value, read_run, run_command, write_results
from mekd_fl.config import RunConfig
from mekd_fl.data import load_dataset
from mekd_fl.errors import ConfigError

LEVELS = (0.125, 0.25, 0.5, 1.0)  # fastest first: the time a run leaves goes to the slower ones
CPU_WEIGHT = 2.0  # the CPU run's share of the time left, against 1 for each GPU run
COMMON = {"answer-cache": False}  # no run may skip the queries another one paid for


@dataclass(frozen=True)
class RunPlan:
    """One `mekd-fl run` of part 3 or 4: its label, engine, GPU share and the command."""

    label: str
    engine: str  # "cuda" or "cpu"
    client_gpus: float
    concurrent: int  # clients Ray can run at once: by the GPU share and by the CPUs
    weight: float
    command: list[str]


def refusal(cuda: bool, rehearse: bool) -> str | None:
    """The one-line refusal when there is no GPU to measure, else None."""
    if cuda or rehearse:
        return None
    return (
        "bench_gpu: no CUDA device is visible (torch.cuda.is_available() is False); this benchmark measures "
        "the GPU paths: run it on a machine with an NVIDIA GPU, or pass --rehearse-on-cpu to check the command"
    )


def plan_runs(
    levels: list[float],
    rounds: int,
    extra: dict[str, object],
    out: Path,
    launcher: list[str],
    cpus: int,
    rehearse: bool = False,
) -> list[RunPlan]:
    """The GPU runs (one per level) and the CPU run, with the same settings but device and GPU share.

    Each client gets `cpus // num-clients` CPUs (at least 1), so the CPU run uses the machine's cores and
    the GPU runs are limited by their GPU share, not by CPUs. Rehearsed, the GPU runs run on the CPU too."""
    settings = {**COMMON, "num-rounds": rounds, **extra}
    cfg = RunConfig.from_mapping(settings)
    load_dataset(cfg.dataset, cfg.data_dir, cfg.download)  # a missing data set fails here, in one line
    num_clients = cfg.num_clients
    client_cpus = max(1, cpus // num_clients)
    by_cpu = max(1, cpus // client_cpus)
    plans = []
    for level in levels:
        label = f"cuda x{level:g}"
        device, gpus = ("cpu", 0.0) if rehearse else ("cuda", level)
        by_gpu = num_clients if rehearse else int(1 / level + 1e-9)
        concurrent = min(num_clients, by_cpu, by_gpu)
        plans.append(
            RunPlan(
                label,
                "cuda",
                level,
                concurrent,
                1.0,
                _command(launcher, settings, device, gpus, client_cpus, out, label),
            )
        )
    plans.append(
        RunPlan(
            "cpu",
            "cpu",
            0.0,
            min(num_clients, by_cpu),
            CPU_WEIGHT,
            _command(launcher, settings, "cpu", 0.0, client_cpus, out, "cpu"),
        )
    )
    return plans


def _command(
    launcher: list[str], settings: dict[str, object], device: str, gpus: float, client_cpus: int, out: Path, label: str
) -> list[str]:
    values = {**settings, "device": device, "run-name": run_name(label), "out-dir": str(out / "runs")}
    return [
        *launcher,
        "run",
        "--client-gpus",
        f"{gpus:g}",
        "--client-cpus",
        str(client_cpus),
        *(f"{k}={v}" for k, v in values.items()),
    ]


def timeouts(weights: list[float], left_s: float) -> float:
    """The first run's share of `left_s` when the runs still to go weigh `weights` (its own first)."""
    return max(0.0, left_s * weights[0] / sum(weights))


def run_started_at(folder: Path) -> float | None:
    """When the run's own clock started: its config.json is written at `folder-ready` (a few ms in)."""
    path = folder / "config.json"
    return path.stat().st_mtime if path.is_file() else None


def measure_run(plan: RunPlan, timeout_s: float, out: Path, sampler: GpuSampler) -> dict:
    """Run one plan under `timeout_s`; what it says about itself (finished rounds only, if stopped), and the
    GPU readings taken between its first and last round."""
    name = run_name(plan.label)
    folder = out / "runs" / name
    print(f"[bench-gpu] {plan.label}: {shlex.join(plan.command)} (at most {timeout_s:.0f} s)", flush=True)
    wall = run_command(plan.command, out / f"{name}.log", timeout_s)
    row: dict = {"part": "run", "label": plan.label, "engine": plan.engine, "client-gpus": plan.client_gpus}
    row |= {"concurrent": plan.concurrent, "wall-s": wall, "timeout-s": timeout_s}
    if (folder / "summary.json").is_file():
        row |= read_run(folder)
        window = (row["setup-s"], row["last-round-at-s"])
    else:
        row |= _unfinished(folder, wall >= timeout_s)
        window = row.pop("window", None)
    zero = run_started_at(folder)
    if zero is not None and window is not None:
        row |= summarise(sampler.samples, zero + window[0], zero + window[1])
    print(f"[bench-gpu] {plan.label}: {row['status']} in {wall:.0f} s", flush=True)
    return row


def run_name(label: str) -> str:
    """The run folder and log name of a plan: "cuda x0.25" -> "cuda-x0.25"."""
    return label.replace(" ", "-")


def _unfinished(folder: Path, timed_out: bool) -> dict:
    """A run with no summary: its finished rounds from metrics.jsonl (stopped at its share, or failed)."""
    path = folder / "metrics.jsonl"
    rounds = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    done = [r for r in rounds if r.get("round", 0) >= 1]
    status = f"stopped at {len(done)} rounds" if timed_out else "failed"
    row: dict = {"status": status, "accuracy": done[-1].get("server/accuracy") if done else None}
    if len(done) > 1:
        per_round = (done[-1]["elapsed-s"] - done[0]["elapsed-s"]) / (len(done) - 1)
        # the GPU readings from about the start of round 1 to the end of the last finished round
        row |= {"s-per-round": per_round, "window": (done[0]["elapsed-s"] - per_round, done[-1]["elapsed-s"])}
    return row


def measure_steps(args: argparse.Namespace, device_name: str) -> tuple[list[dict], list[dict]]:
    """Parts 1 and 2, in this process."""
    import torch

    from mekd_fl.bench.step_timing import time_oracle, time_steps

    cfg = RunConfig.from_mapping(_extra(args))  # the runs' own settings: same data, student and batch
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    device = torch.device(device_name)
    n = max(cfg.batch_size, args.round_images)
    images = ds.train_images[: max(n, args.oracle_images)]
    steps = []
    for precision in ("fp32", "bf16"):
        t = time_steps(cfg, images[:n], device, args.repeats, cfg.batch_size, precision=precision)
        steps.append(
            {
                "part": "step",
                "device": device_name,
                "precision": precision,
                "batch-size": cfg.batch_size,
                "kd-ms": t["kd"] * 1e3,
                "mekd-ms": t["mekd"] * 1e3,
                "mekd/kd": t["mekd"] / t["kd"],
                "kd-steps-per-s": 1 / t["kd"],
                "mekd-steps-per-s": 1 / t["mekd"],
                "prepare-ms": t["prepare"] * 1e3,
            }
        )
        print(f"[bench-gpu] step {precision}: MEKD/KD {steps[-1]['mekd/kd']:.2f}", flush=True)
    rates = time_oracle(cfg, images[: args.oracle_images], device, max(3, args.repeats // 5))
    oracle = [
        {
            "part": "oracle",
            "device": device_name,
            "images": args.oracle_images,
            "oracle-img-per-s": rates["oracle"],
            "raw-img-per-s": rates["raw"],
            "oracle/raw": rates["oracle"] / rates["raw"],
        }
    ]
    return steps, oracle


def _extra(args: argparse.Namespace) -> dict[str, object]:
    return {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}


def _fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}f}"


def report(steps: list[dict], oracle: list[dict], runs: list[dict], rehearsal: bool) -> str:
    """The three tables, and each GPU run's seconds per round over the CPU run's."""
    lines = []
    if rehearsal:
        lines += ["**Rehearsal on the CPU: no figure below is a GPU figure.**", ""]
    lines += [
        "| precision | KD ms/step | MEKD ms/step | MEKD/KD | KD steps/s | MEKD steps/s | prepare G(T(x)) ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['precision']} | {_fmt(s['kd-ms'], 2)} | {_fmt(s['mekd-ms'], 2)} | {_fmt(s['mekd/kd'], 2)} | "
            f"{_fmt(s['kd-steps-per-s'])} | {_fmt(s['mekd-steps-per-s'])} | {_fmt(s['prepare-ms'])} |"
        )
    lines += ["", "| oracle img/s | raw forward img/s | oracle/raw |", "|---|---|---|"]
    for o in oracle:
        rates = (_fmt(o["oracle-img-per-s"], 0), _fmt(o["raw-img-per-s"], 0), _fmt(o["oracle/raw"], 2))
        lines.append("| " + " | ".join(rates) + " |")
    cpu = next((r for r in runs if r["engine"] == "cpu"), {})
    cpu_round = cpu.get("s-per-round")
    lines += [
        "",
        "| run | client-gpus | clients at once | status | setup s | s/round | CPU s/round over it | "
        "GPU util mean % | GPU util peak % | GPU memory peak MiB | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        speedup = cpu_round / r["s-per-round"] if r.get("s-per-round") and cpu_round and r is not cpu else None
        lines.append(
            f"| {r['label']} | {r['client-gpus']:g} | {r['concurrent']} | {r['status']} | {_fmt(r.get('setup-s'))} | "
            f"{_fmt(r.get('s-per-round'))} | {_fmt(speedup, 2)} | {_fmt(r.get('gpu-util-mean'))} | "
            f"{_fmt(r.get('gpu-util-max'))} | {_fmt(r.get('gpu-mem-peak-mib'), 0)} | {_fmt(r.get('accuracy'), 4)} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """What ran it: GPU name and driver (nvidia-smi), torch and CUDA versions, CPU count."""
    import torch

    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["nvidia-smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia-smi"] = None
    return info


def launcher(given: str) -> list[str]:
    """How to start `mekd-fl`: as given, the script beside this Python, or `python -m mekd_fl.cli` where the
    package is on PYTHONPATH but not installed (the GPU machine's bundle)."""
    if given:
        return [given]
    script = Path(sys.executable).with_name("mekd-fl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mekd_fl.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="client-gpus of each GPU run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each run (seconds per round need 2)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole command's time, in seconds")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per method and precision")
    parser.add_argument("--round-images", type=int, default=2048, help="answers whose G(T(x)) prepare computes")
    parser.add_argument("--oracle-images", type=int, default=4096)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="added to every run's settings")
    parser.add_argument("--out", default="")
    parser.add_argument("--mekd-fl", default="", help="the mekd-fl command (default: this Python's, or -m)")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="every part on the CPU: checks the command")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: accepted: 2 or more (seconds per round are measured between rounds)")
    if any(not 0 < level <= 1 for level in args.levels):
        parser.error(f"--levels {args.levels}: accepted: client-gpus values in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    rehearse = args.rehearse_on_cpu
    if (line := refusal(torch.cuda.is_available(), rehearse)) is not None:
        print(line, file=sys.stderr)
        return 2
    started = time.time()
    out = Path(args.out or f"experiments/runs/bench-gpu/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    try:  # every setting and the data are checked before a second of the window is spent
        plans = plan_runs(
            args.levels, args.rounds, _extra(args), out, launcher(args.mekd_fl), os.cpu_count() or 1, rehearse
        )
    except ConfigError as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"[bench-gpu] {info}", flush=True)
    steps, oracle = measure_steps(args, "cpu" if args.rehearse_on_cpu else "cuda")
    runs = []
    with GpuSampler() as sampler:
        for i, plan in enumerate(plans):
            left = args.budget_s - (time.time() - started)
            runs.append(measure_run(plan, timeouts([p.weight for p in plans[i:]], left), out, sampler))
    table = report(steps, oracle, runs, args.rehearse_on_cpu)
    print(table)
    command = f"python experiments/bench_gpu.py {shlex.join(sys.argv[1:] if argv is None else argv)}"
    context = (
        f"in {time.time() - started:.0f} s on {info['nvidia-smi'] or info['gpu'] or 'no GPU'}, {info['cpus']} CPUs, "
        f"torch {info['torch']} (CUDA {info['cuda']}); runs: the default settings with "
        f"{ {**COMMON, 'num-rounds': args.rounds, **_extra(args)} }."
    )
    write_results(out, "GPU figures", command, context, table, [{"part": "machine", **info}, *steps, *oracle, *runs])
    return 0 if all(r["status"] == "completed" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
