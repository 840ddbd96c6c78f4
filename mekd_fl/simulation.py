"""Flower simulation wiring shared by `mekd-fl run` and multi-run simulations (`mekd_fl.bench.multirun`).

Why a module of its own: the command line (`cli`) and the benchmark tooling both start Flower's
simulation runtime with the same Ray resources and the same quiet logging; keeping that here lets
`cli` stay argument parsing only, importing the rest and never imported by it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any


def backend_config(client_cpus: float, client_gpus: float | None, ray_address: str = "") -> dict[str, Any]:
    """Ray resources per simulated client; GPUs are shared fractionally when CUDA is present.

    `ray_address` ("HOST:PORT" of a running `ray start --head`) attaches the simulation to that cluster
    instead of starting a private one; empty leaves it to Ray, which honours `RAY_ADDRESS`.
    """
    import torch

    gpus = client_gpus if client_gpus is not None else (0.25 if torch.cuda.is_available() else 0.0)
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if ray_address:
        init_args["address"] = ray_address
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus}, "init_args": init_args}


def quiet_flower(verbose: bool) -> None:
    """Unless `verbose`, hide Flower's INFO and deprecation logs: our own progress lines say what happens."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
