"""Flower ServerApp: builds the data split, the teacher oracle and the MEKD strategy, writes results.

`app` reads its settings from the Flower run-config (`flwr run . --run-config "..."`); `make_server_app`
builds one whose settings are fixed in Python, which the `mekd-fl run` command uses for in-process
simulations. Both go through `run_server`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from mekd_fl.aggregation import build_aggregation
from mekd_fl.answer_cache import AnswerCache
from mekd_fl.config import CLIENT_SETTINGS, RunConfig
from mekd_fl.data import class_names
from mekd_fl.device import pick_device
from mekd_fl.distill import get_class, needs_generator
from mekd_fl.emulator import build_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.fidelity import emulator_fidelity
from mekd_fl.oracle import TeacherOracle
from mekd_fl.preflight import check_environment
from mekd_fl.results import RunResults
from mekd_fl.run_data import RunData, run_data
from mekd_fl.teacher import build_model, load_or_train_teacher, predict_logits
from strategies import MEKD, RunFailed
from strategies import protocol as P


def say(line: str) -> None:
    print(line, flush=True)


def prepare(cfg: RunConfig, *, resume: bool = False) -> None:
    """Every check that can fail fast: settings, data files, partition feasibility, device, writable
    folders, the aggregation's minimum cohort (no training, no Ray, no run folder claimed)."""
    cfg.validate()
    if emulators_needed(cfg) and cfg.emulator_steps == 0:
        raise ConfigError(
            f"emulator-steps=0, but method={cfg.method} with query-source={cfg.query_source} needs "
            f"an emulator; accepted: emulator-steps >= 1"
        )
    build_aggregation(cfg)
    run_data(cfg)
    check_environment(cfg, resume=resume)


def emulators_needed(cfg: RunConfig) -> bool:
    """The emulator phase runs when the method distills through G or the queries are G's samples."""
    return needs_generator(cfg.method) or cfg.query_source != "local"


def shard_records(data: RunData) -> Callable[[int, int], dict[str, ArrayRecord]]:
    """Per partition, the `shard` record that tells a simulated node which images are its own."""
    shards = [
        ArrayRecord(
            {
                P.TRAIN_INDEX: Array(np.asarray(train, dtype=np.int64)),
                P.TEST_INDEX: Array(np.asarray(test, dtype=np.int64)),
                P.PARTITION: Array(np.asarray(i, dtype=np.int64)),
            }
        )
        for i, (train, test) in enumerate(zip(data.split.client_train, data.split.client_test))
    ]

    def records(node: int, partition: int) -> dict[str, ArrayRecord]:
        return {P.SHARD: shards[partition]}

    return records


def run_server(grid: Grid, cfg: RunConfig, log: Callable[[str], None] = say, *, resume: bool = False) -> dict[str, Any]:
    """One complete run (or the rest of a killed one, with `resume`). Returns the summary, also written
    to `summary.json` with "status": "completed"; a run that fails writes "status": "failed" with the
    reason and raises RunFailed."""
    t_start = time.time()
    prepare(cfg, resume=resume)
    data = run_data(cfg)
    ds, split = data.dataset, data.split
    names = class_names(ds.name, ds.num_classes)
    checkpoint = None
    if resume:
        results, checkpoint = RunResults.reopen(Path(cfg.out_dir) / cfg.run_name)
        log(f"[setup] resuming {results.folder} after round {checkpoint['round']} of {cfg.num_rounds}")
    else:
        results = RunResults.claim(cfg)
        cfg = cfg.replace(run_name=results.folder.name)  # clients key their state by it
        log(f"[setup] run folder {results.folder}")
    log(
        f"[setup] {ds.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test, {ds.num_classes} classes, "
        f"{cfg.num_clients} clients, partition={cfg.partition}"
        + (f" alpha={cfg.alpha}" if cfg.partition == "dirichlet" else "")
        + (f" classes-per-client={cfg.classes_per_client}" if cfg.partition == "pathological" else "")
        + (f" shards-per-client={cfg.shards_per_client}" if cfg.partition == "shard" else "")
    )
    log(split.summary_table(names))
    results.write_json(
        "partition.json",
        {
            "label_counts": split.label_counts,
            "class_names": names,
            "client_train_sizes": [len(p) for p in split.client_train],
            "client_test_sizes": [len(p) for p in split.client_test],
            "server_size": len(split.server_indices),
        },
    )
    results.plot_label_distribution(split.label_counts, names, f"{ds.name}: {cfg.partition} partition")

    device = pick_device(cfg.device)
    server_images, server_labels = data.server_train()
    recipe = data.teacher_recipe(cfg)
    teacher, teacher_meta = load_or_train_teacher(
        recipe, cfg.resolved_cache_dir(), server_images, server_labels, ds.test_images, ds.test_labels, device, log
    )

    def answer_cache(output: str) -> AnswerCache | None:
        return AnswerCache(cfg.resolved_cache_dir(), recipe.key(), output) if cfg.answer_cache else None

    oracle = TeacherOracle(
        teacher,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        output=cfg.oracle_output,
        budget=cfg.query_budget,
        batch_size=cfg.oracle_batch_size,
        device=device,
        answer_cache=answer_cache(cfg.oracle_output),
        top_k=cfg.oracle_top_k,
        decimals=None if cfg.oracle_decimals < 0 else cfg.oracle_decimals,
    )
    test_cache = answer_cache("test-logits")

    def teacher_logits(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(teacher, images, device)

    test_logits = test_cache.get(ds.test_images, teacher_logits) if test_cache else teacher_logits(ds.test_images)
    teacher_test_pred = test_logits.argmax(1)

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
    initial = ArrayRecord(student.state_dict())

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        student.load_state_dict(arrays.to_torch_state_dict())
        pred = predict_logits(student.to(device), ds.test_images, device).argmax(1)
        return MetricRecord(
            {
                "accuracy": (pred == ds.test_labels).float().mean().item(),
                "agreement": (pred == teacher_test_pred).float().mean().item(),
            }
        )

    def on_round(record: dict, arrays: ArrayRecord) -> None:
        results.append_round(record)
        results.save_checkpoint(record["round"], arrays.to_torch_state_dict(), strategy.state())
        if record["round"] == 0:
            log(f"[round 0/{cfg.num_rounds}] initial student: acc {record['server/accuracy']:.4f}")
            return
        fed = record.get("fed/accuracy")
        log(
            f"[round {record['round']}/{cfg.num_rounds}] distill ({cfg.method}): "
            f"loss {record.get('train/train-loss', float('nan')):.4f}, "
            f"test acc {record['server/accuracy']:.4f}, agreement {record['server/agreement']:.4f}, "
            f"client-test acc {fed if fed is None else round(fed, 4)}, rejected {record.get('rejected', 0)}, "
            f"failures {len(record.get('failures', []))}, {record['elapsed-s']:.0f}s"
        )

    emulator_reference = {}
    if cfg.federated_emulator:
        gen, disc = build_emulator(ds.num_classes, ds.image_shape, cfg.emulator_width, kind=cfg.emulator)
        emulator_reference = {
            P.GENERATOR: ArrayRecord(gen.state_dict()),
            P.DISCRIMINATOR: ArrayRecord(disc.state_dict()),
        }
    # The supervised reference reads labels, never the teacher: it spends no queries.
    strategy = MEKD(
        oracle,
        strategy=build_aggregation(cfg),
        query_budget=cfg.query_budget,
        query_teacher=not get_class(cfg.method).uses_labels,
        train_emulators=emulators_needed(cfg),
        federated_emulator=cfg.federated_emulator,
        emulator_rounds=cfg.emulator_rounds,
        emulator_phase=cfg.emulator_phase,
        emulator_pairing=cfg.emulator_pairing,
        emulator_steps=cfg.emulator_steps,
        emulator_reference=emulator_reference,
        measure_fid=emulators_needed(cfg) and cfg.emulator_fid,
        client_config_keys=CLIENT_SETTINGS,
        node_records=shard_records(data) if cfg.client_data == "shard" else None,  # node-config: nodes cut their own
        max_update_norm=cfg.max_update_norm,
        norm_outlier_factor=cfg.norm_outlier_factor,
        min_reply_fraction=cfg.min_reply_fraction,
        seed=cfg.seed,
        on_round=on_round,
        log_fn=log,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.num_clients,
    )
    start_round = 1
    if checkpoint is not None:
        strategy.load_state(checkpoint["strategy"])
        initial = ArrayRecord(checkpoint["student"])
        start_round = checkpoint["round"] + 1
    config = ConfigRecord(cfg.client_dict())

    def summary_of(status: str, **extra: Any) -> dict[str, Any]:
        last = results.rounds[-1] if results.rounds else {}
        return {
            "status": status,
            **extra,
            "method": cfg.method,
            "dataset": ds.name,
            "partition": cfg.partition,
            "alpha": cfg.alpha,
            "num-clients": cfg.num_clients,
            "num-rounds": cfg.num_rounds,
            "rounds-done": strategy.last_round,
            "seed": cfg.seed,
            "teacher-arch": cfg.teacher_arch,
            "student-arch": cfg.student_arch,
            "aggregation": cfg.aggregation,
            "teacher-accuracy": teacher_meta["test_accuracy"],
            "teacher-cached": teacher_meta["cached"],
            "student-accuracy": last.get("server/accuracy"),
            "student-best-accuracy": max((r["server/accuracy"] for r in results.rounds), default=None),
            "student-agreement": last.get("server/agreement"),
            "client-test-accuracy": last.get("fed/accuracy"),
            "student": "student.pt" if (results.folder / "student.pt").exists() else None,
            "queries-used": strategy.queries_used,
            "queries-total": sum(strategy.queries_used.values()),
            "rejected-updates": strategy.rejected,
            "clipped-updates": strategy.clipped,
            "failures": strategy.failures,
            "emulator": strategy.emulator_metrics,
            "emulator-kind": cfg.emulator,
            "federated-emulator": cfg.federated_emulator,
            "emulator-phase": cfg.emulator_phase,
            "emulator-pairing": cfg.emulator_pairing,
            "clients-prepared": len(strategy.answered),
            "emulator-fid-mean": _mean([m.get("fid") for m in strategy.emulator_metrics.values()]),
            "query-source": cfg.query_source,
            "query-views": cfg.query_views,
            "query-fraction": cfg.query_fraction,
            "query-selection": cfg.query_selection,
            # The supervised reference reads the clients' true labels: it breaks the source-blind rule.
            "source-blind": not get_class(cfg.method).uses_labels,
            "resumed": resume,
            "wall-seconds": round(time.time() - t_start, 1),
            "folder": str(results.folder),
        }

    try:
        result = strategy.start(
            grid,
            initial,
            num_rounds=cfg.num_rounds,
            timeout=cfg.reply_timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluate_global,
            num_nodes=cfg.num_clients,
            start_round=start_round,
        )
    except Exception as exc:  # recorded as the run's status, then re-raised: no failure is silent
        reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        results.write_json("summary.json", summary_of("failed", error=reason))
        log(f"[failed] {reason} -> {results.folder}")
        raise
    finally:
        results.write_jsonl("queries.jsonl", strategy.query_log)

    final_arrays = result.arrays if result.arrays is not None else initial
    count = max(cfg.num_samples, cfg.fidelity_images)
    samples = strategy.request_samples(grid, final_arrays, ConfigRecord(dict(config)), count)
    fidelity: dict[str, Any] = {}
    if samples is not None:
        if cfg.num_samples:
            results.plot_samples({k: v[: cfg.num_samples] for k, v in samples.items()})
        if cfg.fidelity_images:
            fidelity = emulator_fidelity(teacher_logits, samples["images"], samples["g-teacher"], samples["g-student"])
            log(
                f"[fidelity] the teacher re-classifies G(T(x)) as T(x)'s class on {fidelity['consistency']:.1%} of "
                f"{fidelity['images']} query images; class means of G(T(x)) "
                f"{fidelity['class-separation'] or 0:.3f} apart "
                f"(real images {fidelity['real-class-separation'] or 0:.3f})"
            )
    summary = summary_of("completed", **{f"fidelity-{k}": v for k, v in fidelity.items()})
    results.write_json("summary.json", summary)
    results.plot_accuracy(
        teacher_meta["test_accuracy"], f"{cfg.method}: {ds.name}, {cfg.partition}, {cfg.num_clients} clients"
    )
    failed = len(strategy.failures)
    log(
        f"[done] {cfg.method} on {ds.name} ({cfg.partition}, {cfg.num_clients} clients, {cfg.num_rounds} rounds): "
        f"student {summary['student-accuracy']:.4f} vs teacher {summary['teacher-accuracy']:.4f} test acc, "
        f"{summary['queries-total']} teacher queries, {failed} failure{'s' * (failed != 1)}, "
        f"{summary['wall-seconds']:.0f}s -> {results.folder}"
    )
    return summary


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def make_server_app(settings: Mapping[str, Any] | RunConfig, *, resume: bool = False) -> ServerApp:
    """A ServerApp with fixed settings (for in-process simulation, where Flower passes no run-config)."""
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, resume=resume)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: settings come from `[tool.flwr.app.config]` plus `--run-config`."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_server(grid, RunConfig.from_mapping(dict(context.run_config)))
