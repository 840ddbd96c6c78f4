"""GPU utilisation and memory, sampled from `nvidia-smi` while a run goes on, for `experiments/bench_gpu.py`.

Why nvidia-smi rather than torch.cuda: the clients of a simulation are Ray worker processes; the process
that runs the benchmark sees none of their allocations, while the driver sees every process on the card.
Why a window: a run spends its first seconds importing, starting Ray and loading the teacher, when the
GPU idles; the utilisation that says how well the clients share the card is the one over the rounds.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

#: One line per GPU every `interval_ms`: index, utilisation %, memory used and total in MiB.
QUERY = "--query-gpu=index,utilization.gpu,memory.used,memory.total"


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU, `at` in `time.time()` seconds."""

    at: float
    index: int
    util: float
    mem_used_mib: float
    mem_total_mib: float


def parse_line(line: str, at: float) -> GpuSample | None:
    """A `nvidia-smi --format=csv,noheader,nounits` line of QUERY; None for anything else ("[N/A]", blank)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        return GpuSample(at, int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]))
    except ValueError:
        return None


def summarise(samples: list[GpuSample], start: float = float("-inf"), end: float = float("inf")) -> dict[str, float]:
    """Mean and peak utilisation and the peak memory of the samples taken in [start, end], over all GPUs
    (utilisation averaged per reading time, memory summed); {} when there is none."""
    inside = [s for s in samples if start <= s.at <= end]
    if not inside:
        return {}
    by_time: dict[float, list[GpuSample]] = {}
    for s in inside:
        by_time.setdefault(s.at, []).append(s)
    utils = [sum(s.util for s in group) / len(group) for group in by_time.values()]
    mems = [sum(s.mem_used_mib for s in group) for group in by_time.values()]
    return {
        "gpu-util-mean": sum(utils) / len(utils),
        "gpu-util-max": max(utils),
        "gpu-mem-peak-mib": max(mems),
        "gpu-mem-total-mib": sum(s.mem_total_mib for s in by_time[next(iter(by_time))]),
        "gpu-samples": float(len(utils)),
    }


@dataclass
class GpuSampler:
    """`with GpuSampler() as sampler:` reads nvidia-smi every `interval_ms` until the block ends; without
    nvidia-smi on the PATH it samples nothing (`available` is False) rather than failing the benchmark."""

    interval_ms: int = 500
    samples: list[GpuSample] = field(default_factory=list)
    available: bool = False
    _proc: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        self._proc = subprocess.Popen(
            [exe, QUERY, "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.available = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        at = time.time()
        for line in self._proc.stdout:
            if line.split(",", 1)[0].strip() == "0":
                at = time.time()  # a reading starts with GPU 0: one time stamp for all of its GPUs
            if (sample := parse_line(line, at)) is not None:
                self.samples.append(sample)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
