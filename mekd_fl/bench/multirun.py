"""Several runs in ONE Flower simulation: one Ray start, clients kept warm, cells run one after another.

Why: starting Ray and the simulated SuperNodes costs seconds to tens of seconds; a comparison of six
methods (or a test of every combination) pays it once. Each cell is a complete `ServerRun` with its
own result folder; clients key their state by run name, so nothing leaks from one cell to the next.
All cells must share `num-clients` (one federation).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError


def run_configs(
    configs: list[RunConfig],
    *,
    client_cpus: float = 1.0,
    client_gpus: float | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    wrap_grid: Callable[[Any], Any] | None = None,
    client_app: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run every config; returns {run-name: {"summary": RunSummary} or {"error": traceback}} in order.

    `wrap_grid` wraps the ServerApp's Grid (tests record every message with it); `client_app` replaces
    the project's ClientApp (tests inject failing clients with it).
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from mekd_fl.client.app import make_client_app
    from mekd_fl.runtime.simulation import backend_config, fast_message_polling, quiet_flower
    from mekd_fl.server.app import ServerRun, prepare

    if not configs:
        raise ConfigError("nothing to run: the list of configurations is empty")
    sizes = {cfg.num_clients for cfg in configs}
    if len(sizes) != 1:
        raise ConfigError(f"num-clients differs between the runs ({sorted(sizes)}); one simulation has one federation")
    if len({cfg.data_dir for cfg in configs}) != 1:
        raise ConfigError("data-dir differs between the runs; the simulated nodes of one simulation read one folder")
    names = [cfg.run_name for cfg in configs]
    if "" in names or len(set(names)) != len(names):
        raise ConfigError("every run needs its own non-empty run-name")
    for cfg in configs:
        prepare(cfg, in_process=True)
    quiet_flower(verbose)
    fast_message_polling()
    outcome: dict[str, dict[str, Any]] = {}
    server = ServerApp()

    @server.main()
    def run_all(grid: Grid, context: Context) -> None:
        if wrap_grid is not None:
            grid = wrap_grid(grid)
        for i, cfg in enumerate(configs, 1):
            log(f"=== run {i}/{len(configs)}: {cfg.run_name}")
            try:
                outcome[cfg.run_name] = {"summary": ServerRun(grid, cfg, log).run()}
            except Exception:  # one failing cell must not stop the others; its error is reported
                outcome[cfg.run_name] = {"error": traceback.format_exc(limit=6)}
                log(f"=== run {cfg.run_name} failed: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")

    client_app = client_app if client_app is not None else make_client_app(configs[0].data_dir)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=configs[0].num_clients,
        backend_config=backend_config(client_cpus, client_gpus),
        verbose_logging=verbose,
    )
    return outcome
