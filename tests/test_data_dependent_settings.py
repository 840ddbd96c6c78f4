"""Settings whose accepted range depends on the data set (its classes, image shape and sizes) are judged
once the data set is known, before Ray starts or the teacher loads: `mekd-fl run --check` refuses them in
one line naming the setting and the accepted values (issue 21, item 4), and an in-process run refuses
client-data=node-config, which only the Deployment Engine can serve (item 10c)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mekd_fl.cli import main
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.server.app import prepare
from mekd_fl.settings.data_rules import DataFacts, check_data


def check(tmp_path: Path, capsys: pytest.CaptureFixture, *settings: str) -> tuple[int, str]:
    """`mekd-fl run --check` on synthetic data; (exit code, stderr)."""
    base = ["dataset=synthetic", "device=cpu", f"out-dir={tmp_path / 'runs'}", f"cache-dir={tmp_path / 'cache'}"]
    code = main(["run", "--check", *base, *settings])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["oracle-top-k=11"], "oracle-top-k=11 is not accepted with dataset=synthetic (10 classes); accepted: 0"),
        (
            ["partition=pathological", "classes-per-client=11"],
            "classes-per-client=11 is not accepted with dataset=synthetic (10 classes); accepted: 1 to 10",
        ),
        (["server-share=0.004"], "server-share=0.004 leaves none of the 1200 synthetic training images"),
        (["query-fraction=0.001"], "query-fraction=0.001 gives client"),
        (["num-clients=2", "client-data=node-config"], "client-data=node-config is not accepted by an in-process"),
    ],
)
def test_check_refuses_data_dependent_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, settings: list[str], expected: str
) -> None:
    code, err = check(tmp_path, capsys, *settings)
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert "accepted" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no folder claimed


@pytest.mark.parametrize(
    "settings",
    [["oracle-top-k=10"], ["partition=pathological", "classes-per-client=10"], ["query-fraction=0.2"]],
)
def test_check_accepts_the_edges_of_the_data_dependent_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture, settings: list[str]
) -> None:
    code, err = check(tmp_path, capsys, *settings)
    assert code == 0, err


def test_the_deployment_engine_still_accepts_node_config(tmp_path: Path) -> None:
    """deploy-local and `flwr run` call prepare() without in_process: their nodes cut their own partition."""
    cfg = RunConfig.from_mapping(
        {
            "dataset": "synthetic",
            "num-clients": 2,
            "client-data": "node-config",
            "device": "cpu",
            "out-dir": str(tmp_path / "runs"),
            "cache-dir": str(tmp_path / "cache"),
        }
    )
    prepare(cfg)
    with pytest.raises(ConfigError, match=r"^client-data=node-config is not accepted .*accepted: client-data=shard"):
        prepare(cfg, in_process=True)


FACTS = DataFacts(dataset="toy", num_classes=10, image_shape=(1, 28, 28), train_images=100, emulators=True)


@pytest.mark.parametrize(
    ("facts", "match"),
    [
        (DataFacts("toy", 10, (1, 28, 30), 100, emulators=True), r"needs square images with a side divisible by 4"),
        (DataFacts("toy", 10, (1, 4, 4), 100, emulators=True), r"^emulator-fid=true is not accepted .*accepted"),
        (
            DataFacts("toy", 10, (1, 28, 28), 100, emulators=True, client_train_sizes=(5, 1)),
            r"^emulator-fid=true needs at least 2 training images on every client, but client 1 has 1",
        ),
    ],
)
def test_image_shape_and_client_size_rules(facts: DataFacts, match: str) -> None:
    """The built-in data sets all fit the emulator; these rules guard a data set that does not."""
    with pytest.raises(ConfigError, match=match):
        check_data(RunConfig(), facts)
    check_data(RunConfig(), FACTS)
