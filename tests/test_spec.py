"""Experiment specs: every mistake is one line naming it, before anything runs; cells are named stably."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mekd_fl.bench.spec import load_spec, parse_spec
from mekd_fl.errors import ConfigError

ROWS_ONLY = {"rows": "method"}
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def spec(**changes: Any) -> dict[str, Any]:
    data = {
        "name": "t",
        "description": "d",
        "base": {"dataset": "synthetic", "num-clients": 2},
        "grid": {
            "method": ["kd", "mekd"],
            "partition": [
                {"partition": "iid"},
                {"label": "dir-a0.1", "partition": "dirichlet", "alpha": 0.1},
                {"partition": "pathological", "classes-per-client": 2},
            ],
            "seed": [1, 2],
        },
        "report": {"rows": "method", "columns": "partition", "metrics": ["student-accuracy"]},
        "timing": "seconds",
    }
    data.update(changes)
    return data


def test_cells_are_the_product_with_readable_safe_names() -> None:
    cells = parse_spec(spec(), "t.yaml", {}).cells(out_dir="out/t")
    assert len(cells) == 2 * 3 * 2
    assert [c.name for c in cells[:3]] == [
        "method=kd__partition=iid__seed=1",
        "method=kd__partition=iid__seed=2",
        "method=kd__partition=dir-a0.1__seed=1",
    ]
    assert cells[4].name == "method=kd__partition=pathological-classes-per-client2__seed=1"
    dirichlet = cells[2].config
    assert (dirichlet.method, dirichlet.partition, dirichlet.alpha, dirichlet.seed) == ("kd", "dirichlet", 0.1, 1)
    assert dirichlet.run_name == cells[2].name and dirichlet.out_dir == "out/t"
    assert cells[0].config.alpha == 0.5  # entries that do not set alpha keep the default
    assert cells[-1].labels == {"method": "mekd", "partition": "pathological-classes-per-client2", "seed": "2"}
    assert len({c.name for c in cells}) == len(cells)


def test_set_overrides_base_and_round_trips_through_the_saved_copy(tmp_path: Path) -> None:
    parsed = parse_spec(spec(), "t.yaml", {"num-rounds": 1, "local_epochs": 3})
    assert all(c.config.num_rounds == 1 and c.config.local_epochs == 3 for c in parsed.cells())
    saved = tmp_path / "spec.yaml"
    saved.write_text(yaml.safe_dump(parsed.to_dict(), sort_keys=False))
    again = load_spec(saved)
    assert again.overrides == {"num-rounds": 1, "local-epochs": 3}
    assert [c.name for c in again.cells()] == [c.name for c in parsed.cells()]
    assert [c.config for c in again.cells()] == [c.config for c in parsed.cells()]


@pytest.mark.parametrize(
    "changes, overrides, named",
    [
        ({"grdi": {}}, {}, "unknown top-level key 'grdi'"),
        ({"base": {"alhpa": 0.1}}, {}, "unknown setting 'alhpa'; did you mean 'alpha'?"),
        ({"grid": {"method": ["kd"], "widht": [1]}}, {}, "unknown setting 'widht'"),
        ({"grid": {"method": ["kd", "magic"]}}, {}, "method='magic' is not accepted"),
        ({"base": {"method": "magic"}}, {}, "method='magic' is not accepted"),
        ({"grid": {}}, {}, "grid: is empty"),
        ({"grid": {"method": []}}, {}, "grid.method: empty axis"),
        ({"report": {"rows": "method", "columns": "alpha"}}, {}, "columns='alpha' is not a grid axis"),
        ({"report": {"rows": "teacher"}}, {}, "rows='teacher' is not a grid axis"),
        ({"report": {"rows": "method", "metrics": ["accuracy"]}}, {}, "unknown metric 'accuracy'"),
        ({"grid": {"method": ["kd"], "alpha": [1.0, 0.0]}, "report": ROWS_ONLY}, {}, "alpha=0.0 must be > 0"),
        (
            {"grid": {"method": ["kd"], "partition": [{"partition": "dirichlet", "alpha": -1}]}},
            {},
            "alpha=-1.0 must be > 0",
        ),
        ({"grid": {"method": ["kd"]}, "report": ROWS_ONLY}, {"alpha": 0}, "alpha=0.0 must be > 0"),
        ({}, {"alpha": 2}, "--set alpha: the grid axis 'partition' sets it"),
        ({}, {"seed": 3}, "--set seed: the grid axis 'seed' sets it"),
        ({"base": {"run-name": "x"}}, {}, "run-name is chosen by the bench"),
        (
            {"grid": {"method": ["kd"], "alpha": [0.1], "partition": [{"partition": "dirichlet", "alpha": 1}]}},
            {},
            "setting 'alpha' is set by two axes",
        ),
        ({"grid": {"seed": [1, 1]}}, {}, "label '1' appears twice"),
        ({"name": "a/b"}, {}, "name='a/b' must be a non-empty folder name"),
        ({"base": {"num-clients": "many"}}, {}, "num-clients='many' is not a valid int"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_problem(changes: dict, overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(spec(**changes), "t.yaml", overrides)
    message = str(err.value)
    assert named in message and "\n" not in message, message


def test_unreadable_spec_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_spec(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_specs_are_valid(path: Path) -> None:
    parsed = load_spec(path)
    assert parsed.name == path.stem and parsed.timing and parsed.description
    assert parsed.cells()


def test_shipped_specs_cover_the_promised_grids() -> None:
    table1 = load_spec(EXPERIMENTS / "paper-table1-fmnist.yaml")
    assert {c.config.method for c in table1.cells()} == {"kd", "dkd", "cdl", "can", "mekd", "supervised"}
    assert {(c.config.teacher_arch, c.config.student_arch) for c in table1.cells()} == {
        ("resnet32", "resnet8"),
        ("resnet56", "resnet8"),
    }
    assert {(c.config.num_clients, c.config.partition) for c in table1.cells()} == {(1, "iid")}
    assert {c.config.seed for c in table1.cells()} == {1, 2, 3}
    noniid = load_spec(EXPERIMENTS / "noniid-fmnist.yaml").cells()
    assert {(c.config.partition, c.config.alpha if c.config.partition == "dirichlet" else None) for c in noniid} == {
        ("iid", None),
        ("dirichlet", 1.0),
        ("dirichlet", 0.5),
        ("dirichlet", 0.1),
        ("pathological", None),
    }
    assert len(noniid) == 5 * 6 * 3
    smoke = load_spec(EXPERIMENTS / "smoke.yaml").cells()
    assert len(smoke) == 4 and {c.config.dataset for c in smoke} == {"synthetic"}


def test_query_curve_specs_sweep_the_budget_per_method() -> None:
    curve = load_spec(EXPERIMENTS / "query-curve-fmnist.yaml").cells()
    budgets = {(c.config.query_fraction, c.config.query_views) for c in curve}
    assert budgets == {(0.05, 1), (0.1, 1), (0.25, 1), (0.5, 1), (1.0, 1), (1.0, 2)}
    assert {c.labels["method"] for c in curve} == {"kd", "dkd", "mekd", "mekd-paired"}
    assert {c.config.emulator_pairing for c in curve if c.labels["method"] == "mekd-paired"} == {"paired"}
    assert {(c.config.partition, c.config.alpha, c.config.num_clients) for c in curve} == {("dirichlet", 0.1, 10)}
    assert len(curve) == 6 * 4 * 3
    selection = load_spec(EXPERIMENTS / "query-selection-fmnist.yaml").cells()
    assert {(c.config.method, c.config.query_selection) for c in selection} == {
        (m, s) for m in ("kd", "mekd") for s in ("random", "kcenter", "uncertainty", "hybrid")
    }
    # every variant under the one protocol uncertainty needs: clients joining after a round has trained
    assert {(c.config.emulator_phase, c.config.fraction_train < 1) for c in selection} == {("lazy", True)}
    assert {c.config.query_fraction for c in selection} == {0.05, 0.1, 0.25}
