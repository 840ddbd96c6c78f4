"""`mekd-fl report` on a bench folder written by hand: statistics, best marks, the upper bound, CSV, plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mekd_fl.bench.cells import load_results
from mekd_fl.bench.figures import query_curves
from mekd_fl.bench.report import Stat, format_stat, write_report
from mekd_fl.bench.spec import parse_spec
from mekd_fl.cli import main
from mekd_fl.errors import ConfigError

SPEC = {
    "name": "hand",
    "description": "Written by the test.",
    "base": {"dataset": "synthetic", "num-clients": 2},
    "grid": {
        "method": ["kd", "mekd", "supervised"],
        "partition": [
            {"label": "iid", "partition": "iid"},
            {"label": "dir-a0.1", "partition": "dirichlet", "alpha": 0.1},
            {"label": "dir-a1.0", "partition": "dirichlet", "alpha": 1.0},
        ],
        "seed": [1, 2, 3],
    },
    "report": {"rows": "method", "columns": "partition", "metrics": ["student-accuracy"]},
    "timing": "none",
}
# student accuracy per (method, partition) over seeds 1, 2, 3; None: the cell never finished
ACC = {
    ("kd", "iid"): [0.70, 0.72, None],
    ("kd", "dir-a0.1"): [0.50, 0.52, 0.54],
    ("kd", "dir-a1.0"): [0.6, 0.6, 0.6],
    ("mekd", "iid"): [0.80, 0.82, 0.84],
    ("mekd", "dir-a0.1"): [0.50, 0.50, 0.50],
    ("mekd", "dir-a1.0"): [0.58, 0.6, 0.62],
    ("supervised", "iid"): [0.95, 0.95, 0.95],
    ("supervised", "dir-a0.1"): [0.9, 0.9, 0.9],
    ("supervised", "dir-a1.0"): [0.9, 0.9, 0.9],
}


@pytest.fixture()
def bench_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hand"
    folder.mkdir()
    spec = parse_spec(SPEC, "hand.yaml", {})
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    for cell in spec.cells(out_dir=str(folder)):
        seed = cell.config.seed
        acc = ACC[cell.labels["method"], cell.labels["partition"]][seed - 1]
        run = folder / cell.name
        run.mkdir()
        (run / "config.json").write_text(json.dumps(cell.config.to_dict()))
        (run / "partition.json").write_text(
            json.dumps(
                {"label_counts": [[5, 1] + [0] * 8, [0, 3] + [1] * 8], "class_names": [f"c{i}" for i in range(10)]}
            )
        )
        rounds = [{"round": r, "server/accuracy": 0.1 + r * 0.2} for r in range(3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        if acc is None:
            continue
        summary = {
            "student-accuracy": acc,
            "teacher-accuracy": 0.9 + 0.01 * seed,
            "queries-total": 1000 * seed,
            "emulator-fid-mean": 30.0 + seed if cell.config.method == "mekd" else None,
            "source-blind": cell.config.method != "supervised",
            "wall-seconds": 10.0,
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return folder


def row_of(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_gives_mean_and_sample_std_over_seeds(bench_folder: Path) -> None:
    markdown = write_report(bench_folder)
    header = row_of(markdown, "method")
    assert header == ["method \\ partition", "iid", "dir-a0.1", "dir-a1.0"]
    mekd = row_of(markdown, "mekd")
    assert mekd[1] == "**82.00 ± 2.00**"  # mean 0.82, sample std 0.02, best of its column
    assert mekd[2] == "50.00 ± 0.00"
    kd = row_of(markdown, "kd")
    assert kd[1] == "71.00 ± 1.41 (n=2/3)"  # one seed never finished
    assert kd[2] == "**52.00 ± 2.00**" and kd[3] == "**60.00 ± 0.00**"  # ties at the best are both bold
    assert row_of(markdown, "mekd")[3] == "**60.00 ± 2.00**"
    assert "2 more" not in markdown and "26/27 cells finished" in markdown
    assert "method=kd__partition=iid__seed=3" in markdown  # named as unfinished
    assert "mean ± sample std over seed (3)" in markdown


def test_supervised_is_an_upper_bound_never_best(bench_folder: Path) -> None:
    markdown = write_report(bench_folder)
    supervised = row_of(markdown, "supervised")
    assert supervised[0] == "supervised (labels, upper bound)"
    assert supervised[1:] == ["95.00 ± 0.00", "90.00 ± 0.00", "90.00 ± 0.00"]  # highest, yet not bold
    teacher = row_of(markdown, "teacher")
    assert teacher[1] == "92.00 ± 1.00"  # one value per seed's teacher, not one per method


def test_csv_is_long_format_and_parseable(bench_folder: Path) -> None:
    write_report(bench_folder)
    with (bench_folder / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "partition", "metric", "mean", "std", "n", "expected", "source-blind", "best"]
    assert len(rows) == 3 * 3 + 3  # every entry plus the teacher per column
    entry = next(r for r in rows if (r["method"], r["partition"]) == ("mekd", "iid"))
    assert np.isclose(float(entry["mean"]), 0.82) and np.isclose(float(entry["std"]), 0.02)
    assert (entry["n"], entry["best"], entry["source-blind"]) == ("3", "True", "True")
    supervised = next(r for r in rows if (r["method"], r["partition"]) == ("supervised", "iid"))
    assert (supervised["best"], supervised["source-blind"]) == ("False", "False")


def test_plots_are_written_and_linked(bench_folder: Path) -> None:
    markdown = write_report(bench_folder)
    for name in (
        "accuracy_per_round",
        "accuracy_vs_alpha",
        "accuracy_vs_queries",
        "accuracy_vs_fid",
        "label_distribution",
    ):
        assert (bench_folder / f"{name}.png").stat().st_size > 1000, name
        assert f"({name}.png)" in markdown
    assert (bench_folder / "report.md").read_text() == markdown


def test_metrics_without_columns_axis_and_lower_is_better(tmp_path: Path) -> None:
    folder = tmp_path / "abl"
    folder.mkdir()
    spec = parse_spec(
        {
            "name": "abl",
            "base": {"dataset": "synthetic", "num-clients": 1},
            "grid": {
                "variant": [{"label": "good", "emulator-steps": 400}, {"label": "poor", "emulator-steps": 25}],
                "seed": [1, 2],
            },
            "report": {"rows": "variant", "metrics": ["student-accuracy", "emulator-fid-mean"]},
        },
        "abl.yaml",
        {},
    )
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    for cell in spec.cells(out_dir=str(folder)):
        good = cell.labels["variant"] == "good"
        (folder / cell.name).mkdir()
        (folder / cell.name / "summary.json").write_text(
            json.dumps(
                {
                    "student-accuracy": 0.8 if good else 0.7,
                    "emulator-fid-mean": 20.0 if good else 90.0,
                    "source-blind": True,
                    "teacher-accuracy": 0.9,
                }
            )
        )
    markdown = write_report(folder)
    assert row_of(markdown, "variant") == ["variant", "student-accuracy", "emulator-fid-mean"]
    assert row_of(markdown, "good")[1:] == ["**80.00 ± 0.00**", "**20.0 ± 0.0**"]
    assert row_of(markdown, "poor")[1:] == ["70.00 ± 0.00", "90.0 ± 0.0"]
    assert not (folder / "accuracy_per_round.png").exists()  # no metrics.jsonl: nothing to draw


def test_report_command(bench_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(bench_folder)]) == 0
    assert "| mekd |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no spec.yaml" in capsys.readouterr().err


def test_missing_spec_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mekd-fl bench"):
        write_report(tmp_path)


def test_published_reference_columns_sit_beside_the_measured_ones(bench_folder: Path) -> None:
    data = yaml.safe_load((bench_folder / "spec.yaml").read_text())
    data["report"]["reference"] = {
        "title": "paper",
        "source": "Table 1",
        "values": {"iid": {"kd": 99.41, "mekd": 99.53, "teacher": 99.43}},
    }
    (bench_folder / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    markdown = write_report(bench_folder)
    assert row_of(markdown, "method") == ["method \\ partition", "iid", "iid (paper)", "dir-a0.1", "dir-a1.0"]
    assert row_of(markdown, "mekd")[1:3] == ["**82.00 ± 2.00**", "99.53"]
    assert row_of(markdown, "supervised")[2] == ""  # no published number for it
    assert row_of(markdown, "teacher")[1:3] == ["92.00 ± 1.00", "99.43"]
    assert "published numbers, not measured here; source: Table 1." in markdown


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            {"title": "paper", "values": {"cifar": {"kd": 1.0}}},
            "column 'cifar' is not a label of partition; accepted: iid, dir-a0.1, dir-a1.0",
        ),
        (
            {"title": "paper", "values": {"iid": {"fedavg": 1.0}}},
            "row 'fedavg' is not a label of method; accepted: kd, mekd, supervised, teacher",
        ),
        ({"title": "paper", "values": {"iid": {"kd": "high"}}}, "values.iid.kd: 'high' is not a number"),
        ({"title": "paper"}, "give title, source and values"),
    ],
)
def test_bad_reference_is_refused(reference: dict, message: str) -> None:
    spec = dict(SPEC, report=dict(SPEC["report"], reference=reference))
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_spec(spec, "hand.yaml", {})


def test_copy_to_keeps_report_and_cell_numbers_only(bench_folder: Path, tmp_path: Path) -> None:
    (bench_folder / "method=kd__partition=iid__seed=1" / "accuracy.png").write_bytes(b"png")  # a run's own plot
    assert main(["report", str(bench_folder), "--copy-to", str(tmp_path / "kept")]) == 0
    kept = tmp_path / "kept"
    for name in ("report.md", "report.csv", "spec.yaml", "accuracy_per_round.png"):
        assert (kept / name).is_file(), name
    assert (kept / "report.md").read_text() == (bench_folder / "report.md").read_text()
    cell = kept / "method=kd__partition=iid__seed=1"
    assert sorted(p.name for p in cell.iterdir()) == ["config.json", "metrics.jsonl", "partition.json", "summary.json"]
    assert not (kept / "method=kd__partition=iid__seed=3").exists()  # unfinished: nothing to keep
    # the copy is itself a bench folder: its report can be redrawn from it
    assert "| mekd |" in write_report(kept)


def test_caption_names_grid_levels_not_run_yet(bench_folder: Path) -> None:
    for summary in bench_folder.glob("*seed=3/summary.json"):  # as `--only seed=1,2` leaves a folder
        summary.unlink()
    markdown = write_report(bench_folder)
    assert "18/27 cells finished" in markdown
    assert "Not finished: seed=3 (9 cells, not run yet)." in markdown
    assert "(n=2/3)" in row_of(markdown, "mekd")[1]


def test_accuracy_vs_queries_is_one_curve_per_method_over_the_budget_levels(tmp_path: Path) -> None:
    """A query-budget axis (query-fraction / query-views): one line per method, ordered by queries."""
    spec_data = {
        "name": "curve",
        "description": "Written by the test.",
        "base": {"dataset": "synthetic", "num-clients": 2},
        "grid": {
            "budget": [
                {"label": "2x", "query-fraction": 1.0, "query-views": 2},  # listed first: order comes from queries
                {"label": "f0.1", "query-fraction": 0.1},
                {"label": "f1", "query-fraction": 1.0},
            ],
            "method": ["kd", "mekd"],
            "seed": [1, 2],
        },
        "report": {"rows": "method", "columns": "budget", "metrics": ["student-accuracy", "queries-total"]},
        "timing": "none",
    }
    folder = tmp_path / "curve"
    folder.mkdir()
    spec = parse_spec(spec_data, "curve.yaml", {})
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    for cell in spec.cells(out_dir=str(folder)):
        cfg = cell.config
        queries = 1000 * cfg.query_fraction * cfg.query_views + cfg.seed  # seeds differ a little
        acc = 0.5 + 0.1 * cfg.query_fraction * cfg.query_views + (0.05 if cfg.method == "mekd" else 0) + 0.01 * cfg.seed
        (folder / cell.name).mkdir()
        summary = {"student-accuracy": acc, "queries-total": queries, "source-blind": True, "wall-seconds": 1.0}
        (folder / cell.name / "summary.json").write_text(json.dumps(summary))
    _, results = load_results(folder)
    curves = query_curves(spec, results)
    assert list(curves) == ["kd", "mekd"]
    for method, bonus in (("kd", 0.0), ("mekd", 5.0)):
        xs, ys, sd, n = zip(*curves[method])
        assert xs == pytest.approx((101.5, 1001.5, 2001.5)) and n == (2, 2, 2)  # means over the two seeds
        assert ys == pytest.approx((52.5 + bonus, 61.5 + bonus, 71.5 + bonus)) and sd == pytest.approx((0.5,) * 3)
    write_report(folder)
    assert (folder / "accuracy_vs_queries.png").stat().st_size > 0
    assert "accuracy_vs_queries.png" in (folder / "report.md").read_text()


def test_without_a_budget_axis_queries_stay_one_point_per_cell(bench_folder: Path) -> None:
    spec, results = load_results(bench_folder)
    assert query_curves(spec, results) == {}  # the partition axis is no budget axis: no lines across it
    write_report(bench_folder)
    assert (bench_folder / "accuracy_vs_queries.png").is_file()


def test_table_entries_keep_the_digits_their_metric_needs() -> None:
    """Accuracies in % to 2 decimals; fidelity shares in [0, 1] to 3 (not rounded to 0 or 1); FID to 1."""
    assert format_stat(Stat((0.6503,), 1, True), "student-accuracy") == "65.03"
    assert format_stat(Stat((0.62109375,), 1, True), "fidelity-consistency") == "0.621"
    assert format_stat(Stat((0.5, 0.7), 2, True), "fidelity-class-separation") == "0.600 ± 0.141"
    assert format_stat(Stat((88.87,), 3, True), "emulator-fid-mean") == "88.9 (n=1/3)"


def test_plateau_check_lists_every_finished_cell_and_flags_the_ones_still_moving(bench_folder: Path) -> None:
    data = yaml.safe_load((bench_folder / "spec.yaml").read_text())
    data["report"]["plateau"] = {"rounds": 3, "points": 0.3}
    (bench_folder / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    still = "method=kd__partition=dir-a0.1__seed=1"  # its last 3 rounds: 50.00, 50.20, 50.60 -> moved 0.60 points
    flat = "method=kd__partition=dir-a0.1__seed=2"  # 50.00, 50.20, 50.25 -> 0.25
    accuracies = {still: [0.5, 0.502, 0.506], flat: [0.5, 0.502, 0.5025]}
    for name, values in accuracies.items():
        rounds = [{"round": 0, "server/accuracy": 0.1}] + [
            {"round": r + 1, "server/accuracy": a} for r, a in enumerate(values)
        ]
        (bench_folder / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    markdown = write_report(bench_folder)
    section = markdown[markdown.index("## Plateau check") :]
    assert "| method=kd__partition=dir-a0.1__seed=1 | 50.00, 50.20, 50.60 | 0.60 | **NO** |" in section
    assert "| method=kd__partition=dir-a0.1__seed=2 | 50.00, 50.20, 50.25 | 0.25 | yes |" in section
    assert "| method=kd__partition=iid__seed=3 |" not in section  # unfinished: not judged
    # the fixture's other cells have 2 distillation rounds: too few to judge, so flagged, not passed
    assert "| method=mekd__partition=iid__seed=1 | 30.00, 50.00 | n/a (too few rounds) | **NO** |" in section
    assert "1 of 26 finished cells are at their plateau; **not at plateau**: " in section
    assert parse_spec(data, "hand.yaml", {}).to_dict()["report"]["plateau"] == {"rounds": 3, "points": 0.3}


@pytest.mark.parametrize("plateau", [{"rounds": 1}, {"points": 0}, {"rounds": 3, "slack": 1}, "3"])
def test_bad_plateau_check_is_refused(plateau: object) -> None:
    with pytest.raises(ConfigError, match="report.plateau"):
        parse_spec(dict(SPEC, report=dict(SPEC["report"], plateau=plateau)), "hand.yaml", {})


def test_relative_table_divides_each_cell_by_its_own_reference_cell_seed_by_seed(bench_folder: Path) -> None:
    data = yaml.safe_load((bench_folder / "spec.yaml").read_text())
    data["report"]["relative-to"] = "iid"
    (bench_folder / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    markdown = write_report(bench_folder)
    section = markdown[markdown.index("## Student accuracy as a percentage") :]
    # mekd: dir-a0.1 0.50 / iid 0.80, 0.82, 0.84 (seeds 1-3); kd: 0.50/0.70, 0.52/0.72, seed 3's iid unfinished
    mekd = [100 * 0.5 / x for x in (0.80, 0.82, 0.84)]
    kd = [100 * 0.50 / 0.70, 100 * 0.52 / 0.72]
    assert f"| mekd | 100.0 ± 0.0 | {np.mean(mekd):.1f} ± {np.std(mekd, ddof=1):.1f} |" in section
    assert f"| kd | 100.0 ± 0.0 (n=2/3) | {np.mean(kd):.1f} ± {np.std(kd, ddof=1):.1f} (n=2/3) |" in section
    with pytest.raises(ConfigError, match="relative-to='f1' is not a label of the columns axis; accepted: iid"):
        parse_spec(dict(SPEC, report=dict(SPEC["report"], **{"relative-to": "f1"})), "hand.yaml", {})


def _with_report(folder: Path, **report: object) -> str:
    data = yaml.safe_load((folder / "spec.yaml").read_text())
    data["report"].update(report)
    (folder / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    markdown = write_report(folder)
    return markdown[markdown.index("## Best of") :]


def test_versus_compares_the_best_of_each_group_seed_by_seed(bench_folder: Path) -> None:
    """Per partition and seed: mekd against kd (ACC), reached where mekd wins by 1 point or more."""
    section = _with_report(bench_folder, versus={"ours": ["mekd"], "baselines": ["kd"], "points": 1})
    assert "| iid | 1 | mekd 80.00 | kd 70.00 | +10.00 | **yes** | yes | - |" in section
    assert "| dir-a0.1 | 3 | mekd 50.00 | kd 54.00 | -4.00 | no | yes | - |" in section
    assert "| dir-a1.0 | 2 | mekd 60.00 | kd 60.00 | +0.00 | no | yes | - |" in section
    assert "| dir-a1.0 | 3 | mekd 62.00 | kd 60.00 | +2.00 | **yes** | yes | - |" in section
    assert "| iid | 3 |" not in section  # kd's cell never finished: nothing to compare with
    assert "Reached in 3 of 8 comparisons (8 of them with every listed method finished)." in section
    # a group's best is its highest finished cell, and a group member without a finished cell is named
    section = _with_report(bench_folder, versus={"ours": ["mekd"], "baselines": ["kd", "supervised"], "points": 0})
    assert "| iid | 3 | mekd 84.00 | supervised 95.00 | -11.00 | no | yes | kd |" in section
    assert "Reached in 0 of 9 comparisons (8 of them with every listed method finished)." in section


def test_versus_marks_a_best_cell_not_at_its_plateau(bench_folder: Path) -> None:
    section = _with_report(
        bench_folder, plateau={"rounds": 2, "points": 0.3}, versus={"ours": ["mekd"], "baselines": ["kd"]}
    )
    # the fixture's cells climb 20 points over their last 2 rounds
    assert "| iid | 1 | mekd 80.00* | kd 70.00* | +10.00 | **yes** | yes | - |" in section


def test_versus_does_not_count_cells_taught_by_different_teachers(bench_folder: Path) -> None:
    """The same recipe trained on another machine is another teacher: such a pairing is shown, flagged and
    never counted as reached, by weights digest where the summaries have one (else by test accuracy)."""
    mekd_iid_1 = bench_folder / "method=mekd__partition=iid__seed=1" / "summary.json"
    kd_iid_1 = bench_folder / "method=kd__partition=iid__seed=1" / "summary.json"
    for file, digest in ((mekd_iid_1, "aaaa"), (kd_iid_1, "bbbb")):
        summary = json.loads(file.read_text())
        file.write_text(json.dumps(dict(summary, **{"teacher-digest": digest})))  # same accuracy, other weights
    section = _with_report(bench_folder, versus={"ours": ["mekd"], "baselines": ["kd"], "points": 1})
    assert "| iid | 1 | mekd 80.00 | kd 70.00 | +10.00 | no | **no** | - |" in section
    assert "| iid | 2 | mekd 82.00 | kd 72.00 | +10.00 | **yes** | yes | - |" in section
    assert "Reached in 2 of 8 comparisons" in section and "**1 of them compare cells taught by different" in section
    # Without digests, a different test accuracy is a different teacher.
    file = bench_folder / "method=kd__partition=iid__seed=2" / "summary.json"
    file.write_text(json.dumps(dict(json.loads(file.read_text()), **{"teacher-accuracy": 0.5})))
    section = _with_report(bench_folder, versus={"ours": ["mekd"], "baselines": ["kd"], "points": 1})
    assert "| iid | 2 | mekd 82.00 | kd 72.00 | +10.00 | no | **no** | - |" in section


@pytest.mark.parametrize(
    ("versus", "message"),
    [
        ({"ours": ["mekd"], "baselines": ["dkd"]}, "baselines: 'dkd' is not a label of the rows axis; accepted: kd, "),
        ({"ours": ["mekd", "kd"], "baselines": ["kd"]}, "'kd' is in both ours and baselines"),
        ({"ours": [], "baselines": ["kd"]}, "versus.ours: give a non-empty list of rows labels"),
        ({"ours": ["mekd"], "baselines": ["kd"], "points": -1}, r"points=-1 is not accepted; accepted: a number >= 0"),
        ({"ours": ["mekd"], "baseline": ["kd"]}, "give a mapping with ours and baselines"),
    ],
)
def test_bad_versus_is_refused(versus: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(dict(SPEC, report=dict(SPEC["report"], versus=versus)), "hand.yaml", {})


def test_versus_survives_the_saved_spec() -> None:
    versus = {"ours": ["mekd"], "baselines": ["kd", "supervised"], "points": 0.5}
    spec = parse_spec(dict(SPEC, report=dict(SPEC["report"], versus=versus)), "hand.yaml", {})
    saved = spec.to_dict()
    assert saved["report"]["versus"] == versus
    assert parse_spec(saved, "again.yaml", {}).report.versus == spec.report.versus
