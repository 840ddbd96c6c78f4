"""Device choice, made once: `cuda` when present (or asked for), else `cpu`; never hard-coded elsewhere."""

from __future__ import annotations

import os

import torch

from mekd_fl.errors import ConfigError


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible; accepted here: auto, cpu")
    if setting not in ("cpu", "cuda"):
        raise ConfigError(f"device={setting!r} is not accepted; accepted: auto, cpu, cuda")
    return torch.device(setting)


def limit_threads() -> None:
    """Use as many intra-op threads as the CPUs this process was given.

    Ray gives each simulated client `num-cpus` CPUs and exports OMP_NUM_THREADS accordingly; torch
    would otherwise start one thread per core in every client and the clients would fight for cores.
    """
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0 and torch.get_num_threads() != int(n):
        torch.set_num_threads(int(n))
