"""`experiments/bench_deploy.py`'s planning and reporting, without running either engine: the commands it
builds, what it reads from a run folder, and the ratios it prints."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from flwr.common.config import parse_config_args

from tests.helpers import write_run_folder

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_deploy.py"
_spec = importlib.util.spec_from_file_location("bench_deploy", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_plan_gives_each_engine_its_own_run_and_deploy_local_a_toml_run_config(tmp_path: Path) -> None:
    settings = {"dataset": "synthetic", "num-clients": 3, "num-rounds": 2, "lr": 0.05, "download": False}
    commands = bench.plan(settings, tmp_path, "mekd-fl", (8100, 9100), 600)
    local, deployed = commands["in-process"], commands["deploy-local"]
    assert local[:2] == ["mekd-fl", "run"] and "run-name=in-process" in local and "num-clients=3" in local
    assert deployed[deployed.index("--supernodes") + 1] == "3"
    assert deployed[deployed.index("--port") + 1] == "8100" and deployed[deployed.index("--node-port") + 1] == "9100"
    parsed = parse_config_args([deployed[deployed.index("--run-config") + 1]])  # as flwr run reads it
    assert parsed["run-name"] == "deploy-local" and parsed["dataset"] == "synthetic" and parsed["lr"] == 0.05
    assert parsed["download"] is False and parsed["out-dir"] == str(tmp_path / "runs")


def test_ports_are_free_and_distinct() -> None:
    link, first = bench.free_ports(3)
    assert link not in range(first, first + 3) and all(bench.port_free(p) for p in (link, first, first + 1, first + 2))


def test_messages_per_node_follow_the_settings() -> None:
    assert bench.exchanges({"num-rounds": 2}) == 1 + 2 + 4 + 1
    assert bench.exchanges({"num-rounds": 3, "num-samples": 0}) == 1 + 2 + 6
    assert bench.exchanges({"num-rounds": 1, "federated-emulator": True, "emulator-rounds": 3}) == 4 + 2 + 2 + 1


def test_read_run_takes_the_run_s_own_times(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "r", 30.0, [(14.0, 0.2), (18.0, 0.3)])
    row = bench.read_run(tmp_path / "r")
    assert row["status"] == "completed" and row["run-s"] == 30.0 and row["setup-s"] == 10.0
    assert row["emulator-s"] == 6.0 and row["s-per-round"] == 4.0 and row["after-last-round-s"] == 12.0
    assert row["accuracies"] == [0.1, 0.2, 0.3] and row["accuracy"] == 0.3
    assert bench.read_run(tmp_path / "none") == {"status": "missing"}
    write_run_folder(tmp_path / "one", 20.0, [(14.0, 0.2)])
    assert math.isnan(bench.read_run(tmp_path / "one")["s-per-round"])


def test_report_gives_the_ratios_and_the_overhead_per_message(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "a", 30.0, [(14.0, 0.2), (18.0, 0.3)])
    write_run_folder(tmp_path / "b", 110.0, [(50.0, 0.2), (70.0, 0.3)])
    rows = {
        "in-process": {"wall-s": 40.0, **bench.read_run(tmp_path / "a")},
        "deploy-local": {"wall-s": 120.0, **bench.read_run(tmp_path / "b")},
    }
    text = bench.report(rows, messages=8)
    assert "wall 3.00, run 3.67, emulator 1.00, per round 5.00" in text
    assert "overhead per message: 10.0 s (8 messages per node" in text
    assert "per-round accuracies: identical" in text


def test_report_says_when_a_run_did_not_complete(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "a", 30.0, [(14.0, 0.2), (18.0, 0.3)])
    rows = {"in-process": {"wall-s": 40.0, **bench.read_run(tmp_path / "a")}, "deploy-local": {"wall-s": 9.0}}
    text = bench.report(rows, messages=8)
    assert "| deploy-local | missing |" in text and "no ratio: a run did not complete" in text
