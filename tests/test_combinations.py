"""Every method x emulator x query-source combination that makes a different run runs end to end
(synthetic data, tiny settings).

All cells share one Flower simulation (one Ray start) through `tests/combination_runner.py`, so the
whole grid costs about as much as a few separate runs. `COMBINATIONS` leaves out only cells that would
repeat another: see its docstring.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mekd_fl.config import RunConfig
from mekd_fl.distill import methods, needs_generator
from mekd_fl.server.app import emulators_needed

EMULATORS = ("dcgan", "wgan-gp", "infogan")
SOURCES = ("local", "generated", "mixed")
TINY = {
    "dataset": "synthetic",
    "num-clients": 2,
    "num-rounds": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "teacher-epochs": 1,
    "teacher-arch": "resnet8",
    "server-share": 0.3,
    "emulator-steps": 3,
    "emulator-width": 8,
    "wgan-n-critic": 2,
    "num-samples": 2,
    "query-views": 2,
    "emulator-fid": True,
    # Local queries pair the emulator (emulator-pairing=auto); with the GAN term kept, each emulator kind
    # is its own paired run here (without it, the three kinds would be one run three times).
    "emulator-pairing-gan": True,
}


def combinations() -> list[tuple[str, str, str]]:
    """(method, emulator, query source) cells: every method with every query source, and every emulator
    with every query source and with every method that distills through G.

    Why not the full product: a method that does not distill through G, on local queries, trains no
    emulator at all (`server_app.emulators_needed`), so its three emulator cells are the same run; on
    generated or mixed queries G only makes the samples, whatever the method does with the answers, so
    the emulators rotate across those methods (each emulator meets each source and most methods). The
    full product ran 54 cells, about half of the default suite's time, to test 24 distinct paths.
    """
    cells = []
    plain = [m for m in methods() if not needs_generator(m)]
    for m, e, q in itertools.product(methods(), EMULATORS, SOURCES):
        if needs_generator(m):
            cells.append((m, e, q))
        elif not emulator_trained(m, q):
            if e == EMULATORS[0]:
                cells.append((m, e, q))
        elif EMULATORS.index(e) == (plain.index(m) + SOURCES.index(q)) % len(EMULATORS):
            cells.append((m, e, q))
    return cells


def emulator_trained(method: str, source: str) -> bool:
    """The run's own rule (`server_app.emulators_needed`), so the grid follows it if it changes."""
    return emulators_needed(RunConfig.from_mapping(dict(TINY, method=method, **{"query-source": source})))


COMBINATIONS = combinations()


# Flower's aggregators inside MEKD, end to end (2 clients: Krum and Bulyan need more, see test_strategy.py).
AGGREGATIONS = {"median": {}, "trimmed-mean": {"trim-beta": 0.0, "dp-clip": 50.0, "dp-noise": 0.001}}


@pytest.fixture(scope="module")
def grid_outcome(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("grid")
    cells = [
        dict(TINY, method=m, emulator=e, **{"query-source": q, "run-name": f"{m}-{e}-{q}"}) for m, e, q in COMBINATIONS
    ]
    cells.append(
        dict(
            TINY,
            method="mekd",
            emulator="dcgan",
            **{"query-source": "local", "run-name": "fed-emulator", "federated-emulator": True, "emulator-rounds": 2},
        )
    )
    # Lazy phases: of the 2 clients, 1 is sampled in the one round: only it trains an emulator and queries.
    lazy = {"emulator-phase": "lazy", "fraction-train": 0.5}
    cells.append(dict(TINY, method="mekd", emulator="dcgan", **{"query-source": "local", "run-name": "lazy", **lazy}))
    # Paired emulators (queries first, G trained on the answers), upfront and lazy.
    for phase in ("upfront", "lazy"):
        paired = {"emulator-pairing": "paired", "emulator-phase": phase, "fraction-train": 0.5}
        cells.append(dict(TINY, method="mekd", emulator="wgan-gp", **{"run-name": f"paired-{phase}", **paired}))
    for aggregation, extra in AGGREGATIONS.items():
        cells.append(
            dict(
                TINY,
                method="kd",
                emulator="dcgan",
                **{
                    "query-source": "local",
                    "aggregation": aggregation,
                    "run-name": f"aggregation-{aggregation}",
                    **extra,
                },
            )
        )
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
    runner = Path(__file__).with_name("combination_runner.py")
    proc = subprocess.run(
        [sys.executable, str(runner), str(out / "runs"), str(out / "cache"), json.dumps(cells)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    outcome_file = out / "runs" / "outcome.json"
    assert outcome_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "runs", json.loads(outcome_file.read_text())


def test_the_grid_covers_every_pair_that_changes_a_run() -> None:
    cells = set(COMBINATIONS)
    assert {(m, q) for m, _, q in cells} == set(itertools.product(methods(), SOURCES))
    assert {(e, q) for _, e, q in cells} == set(itertools.product(EMULATORS, SOURCES))
    for m in methods():
        emulators = {e for mm, e, q in cells if mm == m and emulator_trained(m, q)}
        assert len(emulators) >= (3 if needs_generator(m) else 2), (m, emulators)


@pytest.mark.parametrize("method, emulator, source", COMBINATIONS)
def test_combination_runs_end_to_end(grid_outcome: tuple[Path, dict], method: str, emulator: str, source: str) -> None:
    runs, outcome = grid_outcome
    name = f"{method}-{emulator}-{source}"
    assert outcome.get(name) == "ok", outcome.get(name)
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["method"] == method and summary["emulator-kind"] == emulator
    assert summary["query-source"] == source
    # 2 views of each local image (or as many generated samples), all counted against the budget; the
    # supervised reference trains on labels and never queries the teacher
    assert (summary["queries-total"] > 0) == (method != "supervised"), summary["queries-total"]


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_flower_aggregation_runs_end_to_end(grid_outcome: tuple[Path, dict], aggregation: str) -> None:
    runs, outcome = grid_outcome
    name = f"aggregation-{aggregation}"
    assert outcome.get(name) == "ok", outcome.get(name)
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["aggregation"] == aggregation
    assert summary["rejected-updates"] == [] and summary["student-accuracy"] is not None


def test_federated_emulator_runs_and_measures_fid(grid_outcome: tuple[Path, dict]) -> None:
    runs, outcome = grid_outcome
    assert outcome.get("fed-emulator") == "ok", outcome.get("fed-emulator")
    summary = json.loads((runs / "fed-emulator" / "summary.json").read_text())
    assert summary["federated-emulator"] is True
    assert all("fid" in m for m in summary["emulator"].values())


def test_lazy_phases_prepare_only_the_sampled_clients(grid_outcome: tuple[Path, dict]) -> None:
    runs, outcome = grid_outcome
    assert outcome.get("lazy") == "ok", outcome.get("lazy")
    summary = json.loads((runs / "lazy" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["emulator-phase"] == "lazy"
    assert summary["clients-prepared"] == 1 < summary["num-clients"] == 2
    assert len(summary["emulator"]) == summary["clients-prepared"]


def test_paired_emulators_run_and_the_server_measures_their_fidelity(grid_outcome: tuple[Path, dict]) -> None:
    runs, outcome = grid_outcome
    for phase in ("upfront", "lazy"):
        assert outcome.get(f"paired-{phase}") == "ok", outcome.get(f"paired-{phase}")
        summary = json.loads((runs / f"paired-{phase}" / "summary.json").read_text())
        assert summary["emulator-pairing"] == "paired" and summary["status"] == "completed"
        assert 0.0 <= summary["fidelity-consistency"] <= 1.0 and 0.0 < summary["fidelity-majority-share"] <= 1.0
        assert summary["fidelity-images"] >= 1 and summary["fidelity-student-distance"] >= 0.0
        # Queries are counted as without pairing: the pairs are the queries already paid for.
        assert summary["queries-total"] == sum(summary["queries-used"].values()) > 0


# ---------------------------------------------------------------------------- the trust invariant
def _state_shapes(module) -> dict[str, list]:
    return {k: [str(v.numpy().dtype), list(v.shape)] for k, v in module.state_dict().items()}


def test_every_message_to_a_client_fits_the_allow_list(grid_outcome: tuple[Path, dict]) -> None:
    """Captured from every cell above (every method, emulator and query source, the federated emulator,
    domain FID): a client receives the student, averaged emulators, its own answers, its shard and the
    client settings, and never a server-trained network, a teacher setting or a server path."""
    from mekd_fl.config import CLIENT_SETTINGS
    from mekd_fl.data import load_dataset
    from mekd_fl.emulator import build_emulator
    from mekd_fl.models.classifier import build_model
    from strategies import protocol as P

    runs, _ = grid_outcome
    sent = [json.loads(line) for line in (runs / "messages.jsonl").read_text().splitlines()]
    # query.role and query.teach go only to a teacher node (tests/test_teacher_node.py), never to these clients
    assert {m["type"] for m in sent} == set(P.OUTGOING) - P.TEACHER_MESSAGES, "a message type was never exercised"
    ds = load_dataset("synthetic")
    arch = RunConfig.from_mapping(TINY).student_arch  # the cells' student (TINY keeps the default)
    student = _state_shapes(build_model(arch, ds.num_classes, ds.image_shape, ds.mean, ds.std))
    gen, disc = build_emulator(ds.num_classes, ds.image_shape, TINY["emulator-width"], kind="dcgan")
    emulator = {P.GENERATOR: _state_shapes(gen), P.DISCRIMINATOR: _state_shapes(disc)}
    allowed_config = set(CLIENT_SETTINGS) | set(P.STRATEGY_KEYS)
    server_paths = (str(runs), str(runs.parent / "cache"))
    for m in sent:
        records = m["records"]
        assert set(records) <= P.OUTGOING[m["type"]], m
        assert P.CONFIG in records, m
        config = records[P.CONFIG]["values"]
        assert set(config) <= allowed_config, sorted(set(config) - allowed_config)
        for value in config.values():
            assert not any(path in str(value) for path in server_paths), value
        for name, record in records.items():
            if name == P.ARRAYS:
                assert record["arrays"] == student, "only the global student travels as 'arrays'"
            elif name in emulator:
                assert m["type"] == P.EMULATOR and record["arrays"] == emulator[name]
            elif name == P.ANSWERS_RECORD:
                ((key, (dtype, shape)),) = record["arrays"].items()
                assert key == P.RESPONSES and len(shape) == 2 and shape[1] in (0, ds.num_classes), record
            elif name == P.SHARD:
                assert set(record["arrays"]) == {P.TRAIN_INDEX, P.TEST_INDEX, P.PARTITION}
            else:
                assert name == P.CONFIG, name
    assert not any(
        k.startswith("teacher") or k in ("server-share", "cache-dir", "out-dir", "data-dir")
        for m in sent
        for k in m["records"][P.CONFIG]["values"]
    )


def test_the_first_student_a_client_receives_classifies_at_chance(grid_outcome: tuple[Path, dict]) -> None:
    """Before any teacher answer, nothing a client holds classifies: the initial student is at chance."""
    runs, _ = grid_outcome
    for cell in runs.iterdir():
        metrics = cell / "metrics.jsonl"
        if metrics.is_file():
            first = json.loads(metrics.read_text().splitlines()[0])
            assert first["round"] == 0 and first["server/accuracy"] < 0.25, (cell.name, first)
