"""`experiments/bench_method_cost.py`'s planning and reporting, without running anything: the commands it
builds for each shape and method, and the ratios it prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mekd_fl.config import RunConfig
from tests.helpers import write_run_folder

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_method_cost.py"
_spec = importlib.util.spec_from_file_location("bench_method_cost", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _settings(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in command[2:])


def test_each_method_runs_the_shape_with_no_shared_answers(tmp_path: Path) -> None:
    kd = _settings(bench.plan("quickstart", "kd", {"seed": 1}, tmp_path, "mekd-fl"))
    mekd = _settings(bench.plan("quickstart", "mekd", {"seed": 1}, tmp_path, "mekd-fl"))
    assert {k: v for k, v in kd.items() if k not in ("method", "run-name")} == {
        k: v for k, v in mekd.items() if k not in ("method", "run-name")
    }
    assert kd["method"] == "kd" and mekd["run-name"] == "quickstart-mekd" and kd["answer-cache"] == "False"
    assert kd["seed"] == "1" and kd["out-dir"] == str(tmp_path / "runs")
    default = _settings(bench.plan("default", "kd", {}, tmp_path, "mekd-fl"))
    assert set(default) == {"answer-cache", "method", "run-name", "out-dir"}  # make run's own settings


def test_the_quickstart_shape_is_a_valid_run_with_small_local_data() -> None:
    cfg = RunConfig.from_mapping({**bench.SHAPES["quickstart"], "method": "mekd"})
    per_client = 60_000 * (1 - cfg.server_share) / cfg.num_clients
    assert per_client < 2_000 and cfg.num_rounds <= 3 and cfg.emulator_fid is False


def test_report_gives_each_methods_ratio_to_the_first_per_shape(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "kd", 100.0, [(40.0, 0.5), (60.0, 0.6)])
    write_run_folder(tmp_path / "mekd", 125.0, [(50.0, 0.5), (75.0, 0.62)], **{"fidelity-consistency": 0.93})
    rows = [
        {"shape": "quickstart", "method": "kd", "wall-s": 110.0, **bench.read_run(tmp_path / "kd")},
        {"shape": "quickstart", "method": "mekd", "wall-s": 132.0, **bench.read_run(tmp_path / "mekd")},
        {"shape": "default", "method": "kd", "wall-s": 10.0, **bench.read_run(tmp_path / "none")},
    ]
    text = bench.report(rows, ["kd", "mekd"])
    assert "quickstart: mekd/kd run 1.25, wall 1.20" in text
    assert "| quickstart | mekd | completed | 132.0 | 125.0 |" in text and "| 0.620 | 0.930 |" in text
    assert "| default | kd | missing |" in text and "default: mekd/kd: no ratio" in text


def test_results_are_written_as_markdown_and_json_lines(tmp_path: Path) -> None:
    bench.write_results(tmp_path, "Cost", "python x.py --a", "on 2 CPUs.", "| a |\n|---|", [{"a": 1}, {"a": 2}])
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Cost (") and "`python x.py --a` on 2 CPUs.\n\n| a |\n|---|\n" in text
    assert (tmp_path / "results.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
