"""Flower ServerApp: builds the data split, the teacher oracle and the MEKD strategy, writes results.

`app` reads its settings from the Flower run-config (`flwr run . --run-config "..."`); `make_server_app`
builds one whose settings are fixed in Python, which the `mekd-fl run` command uses for in-process
simulations. Both go through `run_server`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from mekd_fl.answer_cache import AnswerCache
from mekd_fl.config import RunConfig
from mekd_fl.data import class_names
from mekd_fl.device import pick_device
from mekd_fl.distill import get_class, needs_generator
from mekd_fl.errors import ConfigError
from mekd_fl.fid import train_feature_net
from mekd_fl.oracle import TeacherOracle
from mekd_fl.results import RunResults
from mekd_fl.run_data import RunData, run_data
from mekd_fl.teacher import TeacherRecipe, build_model, load_or_train_teacher, predict_logits
from strategies import MEKD


def say(line: str) -> None:
    print(line, flush=True)


def prepare(cfg: RunConfig) -> None:
    """Every check that can fail fast: settings, data files, partition feasibility (no training)."""
    cfg.validate()
    if emulators_needed(cfg) and cfg.emulator_steps == 0:
        raise ConfigError(f"emulator-steps=0, but method={cfg.method} with query-source={cfg.query_source} needs "
                          f"an emulator; accepted: emulator-steps >= 1")
    run_data(cfg)


def emulators_needed(cfg: RunConfig) -> bool:
    """The emulator phase runs when the method distills through G or the queries are G's samples."""
    return needs_generator(cfg.method) or cfg.query_source != "local"


def fid_feature_net(cfg: RunConfig, data: RunData, device: torch.device, log: Callable[[str], None]) -> torch.nn.Module:
    """The small classifier whose features measure emulator FID: trained on (a part of) the server's
    labeled share with its own seed, so it is independent of the teacher, which stays blind."""
    images, labels = data.server_train()
    keep = slice(0, min(len(labels), 10_000))
    t0 = time.time()
    net = train_feature_net(images[keep], labels[keep], data.dataset.num_classes, seed=cfg.seed + 1, device=device)
    log(f"[fid] feature network trained on {len(labels[keep])} server images in {time.time() - t0:.0f}s")
    return net


def run_server(grid: Grid, cfg: RunConfig, log: Callable[[str], None] = say) -> dict[str, Any]:
    """One complete run. Returns the summary (also written to `summary.json`)."""
    t_start = time.time()
    prepare(cfg)
    data = run_data(cfg)
    ds, split = data.dataset, data.split
    names = class_names(ds.name, ds.num_classes)
    results = RunResults.claim(cfg)
    cfg = cfg.replace(run_name=results.folder.name)  # clients key their state by it
    log(f"[setup] run folder {results.folder}")
    log(f"[setup] {ds.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test, {ds.num_classes} classes, "
        f"{cfg.num_clients} clients, partition={cfg.partition}"
        + (f" alpha={cfg.alpha}" if cfg.partition == "dirichlet" else "")
        + (f" classes-per-client={cfg.classes_per_client}" if cfg.partition == "pathological" else ""))
    log(split.summary_table(names))
    results.write_json("partition.json", {
        "label_counts": split.label_counts, "class_names": names,
        "client_train_sizes": [len(p) for p in split.client_train],
        "client_test_sizes": [len(p) for p in split.client_test], "server_size": len(split.server_indices)})
    results.plot_label_distribution(split.label_counts, names, f"{ds.name}: {cfg.partition} partition")

    device = pick_device(cfg.device)
    server_images, server_labels = data.server_train()
    recipe = TeacherRecipe(dataset=ds.name, arch=cfg.teacher_arch, num_classes=ds.num_classes,
                           image_shape=ds.image_shape, mean=ds.mean, std=ds.std, seed=cfg.seed,
                           epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
                           server_share=cfg.server_share, num_train=len(server_labels))
    teacher, teacher_meta = load_or_train_teacher(recipe, cfg.resolved_cache_dir(), server_images, server_labels,
                                                  ds.test_images, ds.test_labels, device, log)
    def answer_cache(output: str) -> AnswerCache | None:
        return AnswerCache(cfg.resolved_cache_dir(), recipe.key(), output) if cfg.answer_cache else None

    oracle = TeacherOracle(teacher, num_classes=ds.num_classes, image_shape=ds.image_shape,
                           output=cfg.oracle_output, budget=cfg.query_budget,
                           batch_size=cfg.oracle_batch_size, device=device,
                           answer_cache=answer_cache(cfg.oracle_output))
    test_cache = answer_cache("test-logits")

    def teacher_logits(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(teacher, images, device)

    test_logits = test_cache.get(ds.test_images, teacher_logits) if test_cache else teacher_logits(ds.test_images)
    teacher_test_pred = test_logits.argmax(1)

    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        student.load_state_dict(arrays.to_torch_state_dict())
        pred = predict_logits(student.to(device), ds.test_images, device).argmax(1)
        return MetricRecord({"accuracy": (pred == ds.test_labels).float().mean().item(),
                             "agreement": (pred == teacher_test_pred).float().mean().item()})

    def on_round(record: dict) -> None:
        results.append_round(record)
        if record["round"] == 0:
            log(f"[round 0/{cfg.num_rounds}] initial student: acc {record['server/accuracy']:.4f}")
            return
        fed = record.get("fed/accuracy")
        log(f"[round {record['round']}/{cfg.num_rounds}] distill ({cfg.method}): "
            f"loss {record.get('train/train-loss', float('nan')):.4f}, "
            f"test acc {record['server/accuracy']:.4f}, agreement {record['server/agreement']:.4f}, "
            f"client-test acc {fed if fed is None else round(fed, 4)}, rejected {record.get('rejected', 0)}, "
            f"{record['elapsed-s']:.0f}s")

    emulator_records = {}
    if emulators_needed(cfg) and cfg.emulator_fid:
        emulator_records["fid-net"] = ArrayRecord(fid_feature_net(cfg, data, device, log).state_dict())
    # The supervised reference reads labels, never the teacher: it spends no queries.
    strategy = MEKD(oracle, query_budget=cfg.query_budget, query_teacher=not get_class(cfg.method).uses_labels,
                    train_emulators=emulators_needed(cfg),
                    federated_emulator=cfg.federated_emulator, emulator_rounds=cfg.emulator_rounds,
                    emulator_steps=cfg.emulator_steps, emulator_records=emulator_records,
                    seed=cfg.seed, on_round=on_round, log_fn=log,
                    fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                    min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=cfg.num_clients)
    config = ConfigRecord(cfg.to_dict())
    result = strategy.start(grid, ArrayRecord(student.state_dict()), num_rounds=cfg.num_rounds,
                            train_config=config, evaluate_config=ConfigRecord(dict(config)),
                            evaluate_fn=evaluate_global, num_nodes=cfg.num_clients)

    final_arrays = result.arrays
    samples = strategy.request_samples(grid, final_arrays, ConfigRecord(dict(config)), cfg.num_samples)
    if samples is not None:
        results.plot_samples(samples)
    last = results.rounds[-1]
    best = max(r["server/accuracy"] for r in results.rounds)
    summary = {
        "method": cfg.method, "dataset": ds.name, "partition": cfg.partition, "alpha": cfg.alpha,
        "num-clients": cfg.num_clients, "num-rounds": cfg.num_rounds, "seed": cfg.seed,
        "teacher-arch": cfg.teacher_arch, "student-arch": cfg.student_arch,
        "teacher-accuracy": teacher_meta["test_accuracy"], "teacher-cached": teacher_meta["cached"],
        "student-accuracy": last["server/accuracy"], "student-best-accuracy": best,
        "student-agreement": last["server/agreement"], "client-test-accuracy": last.get("fed/accuracy"),
        "queries-used": strategy.queries_used, "queries-total": sum(strategy.queries_used.values()),
        "rejected-updates": strategy.rejected, "emulator": strategy.emulator_metrics,
        "emulator-kind": cfg.emulator, "federated-emulator": cfg.federated_emulator,
        "emulator-fid-mean": _mean([m.get("fid") for m in strategy.emulator_metrics.values()]),
        "query-source": cfg.query_source, "query-views": cfg.query_views,
        # The supervised reference reads the clients' true labels: it breaks the source-blind rule.
        "source-blind": not get_class(cfg.method).uses_labels,
        "wall-seconds": round(time.time() - t_start, 1), "folder": str(results.folder),
    }
    results.write_json("summary.json", summary)
    results.plot_accuracy(teacher_meta["test_accuracy"], f"{cfg.method}: {ds.name}, {cfg.partition}, "
                                                         f"{cfg.num_clients} clients")
    log(f"[done] {cfg.method} on {ds.name} ({cfg.partition}, {cfg.num_clients} clients, {cfg.num_rounds} rounds): "
        f"student {summary['student-accuracy']:.4f} vs teacher {summary['teacher-accuracy']:.4f} test acc, "
        f"{summary['queries-total']} teacher queries, {summary['wall-seconds']:.0f}s -> {results.folder}")
    return summary


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def make_server_app(settings: Mapping[str, Any] | RunConfig) -> ServerApp:
    """A ServerApp with fixed settings (for in-process simulation, where Flower passes no run-config)."""
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: settings come from `[tool.flwr.app.config]` plus `--run-config`."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_server(grid, RunConfig.from_mapping(dict(context.run_config)))
