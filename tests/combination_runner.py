"""Runs many small configurations in one Flower simulation (see `mekd_fl.multirun`) for the tests.

Usage: python tests/combination_runner.py OUT_DIR CACHE_DIR JSON_LIST_OF_SETTINGS
Writes OUT_DIR/outcome.json: {run-name: "ok" | traceback}.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def main() -> None:
    from mekd_fl.config import RunConfig
    from mekd_fl.multirun import run_configs

    out_dir, cache_dir, cells = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    configs = [RunConfig.from_mapping({**cell, "out-dir": out_dir, "cache-dir": cache_dir}) for cell in cells]
    outcome = run_configs(configs, client_gpus=0.0, log=lambda line: None)
    with open(os.path.join(out_dir, "outcome.json"), "w") as fh:
        json.dump({name: "ok" if "summary" in res else res["error"] for name, res in outcome.items()}, fh)


if __name__ == "__main__":
    main()
