"""Flower ServerApp: builds the data split, the teacher oracle and the MEKD strategy, writes results.

`app` reads its settings from the Flower run-config (`flwr run . --run-config "..."`); `make_server_app`
builds one whose settings are fixed in Python, which the `mekd-fl run` command uses for in-process
simulations. Both go through `ServerRun`, one run of the project's own ServerApp: its steps (folder,
partition, teacher, strategy, rounds, samples, summary) are methods, and it writes a typed
`RunSummary` that every tool reads back.
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
from flwr.serverapp.strategy import Result

from mekd_fl.config import CLIENT_SETTINGS, RunConfig
from mekd_fl.data import class_names
from mekd_fl.device import pick_device
from mekd_fl.distill import get_class, needs_generator
from mekd_fl.emulator import build_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.fidelity import emulator_fidelity
from mekd_fl.models.classifier import build_model, predict_logits
from mekd_fl.run_data import RunData, run_data
from mekd_fl.server.aggregation import build_aggregation
from mekd_fl.server.preflight import check_data_settings, check_engine, check_environment
from mekd_fl.server.results import RunResults
from mekd_fl.server.summary import DEPLOYMENT, SIMULATION, RunSummary
from mekd_fl.teacher.answer_cache import AnswerCache
from mekd_fl.teacher.oracle import TeacherOracle
from mekd_fl.teacher.training import TeacherRecipe, load_or_train_teacher
from strategies import MEKD, RunFailed
from strategies import protocol as P


def say(line: str) -> None:
    print(line, flush=True)


def prepare(cfg: RunConfig, *, resume: bool = False, in_process: bool = False) -> None:
    """Every check that can fail fast: settings, data files, the settings whose range depends on the data
    set, partition feasibility, device, writable folders, the aggregation's minimum cohort (no training,
    no Ray, no run folder claimed). `in_process`: the run is an in-process simulation (`mekd-fl run`,
    `make_server_app`), whose nodes cannot cut their own partition (client-data=node-config)."""
    cfg.validate()
    check_engine(cfg, in_process=in_process)
    if emulators_needed(cfg) and cfg.emulator_steps == 0:
        raise ConfigError(
            f"emulator-steps=0, but method={cfg.method} with query-source={cfg.query_source} needs "
            f"an emulator; accepted: emulator-steps >= 1"
        )
    build_aggregation(cfg)
    check_data_settings(cfg, emulators=emulators_needed(cfg), queries=not get_class(cfg.method).uses_labels)
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


class ServerRun:
    """One complete run of the project's ServerApp (or the rest of a killed one, with `resume`).

    `run()` returns the `RunSummary`, also written to `summary.json` with status "completed"; a run that
    fails writes status "failed" with the reason and raises (RunFailed for too few usable replies).
    """

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        log: Callable[[str], None] = say,
        *,
        resume: bool = False,
        engine: str = SIMULATION,
        in_process: bool = True,
    ) -> None:
        self.grid, self.cfg, self.log, self.resume = grid, cfg, log, resume
        # Recorded in every checkpoint and the summary: `mekd-fl run --resume` continues only simulations.
        self.engine, self.in_process = engine, in_process
        self.t_start = time.time()
        self.checkpoint: dict | None = None
        self.timeline: dict[str, float] = {}  # event -> seconds since the run began (RunSummary.timeline)

    def mark(self, event: str) -> None:
        self.timeline[event] = round(time.time() - self.t_start, 2)

    # ------------------------------------------------------------------ the steps
    def run(self) -> RunSummary:
        prepare(self.cfg, resume=self.resume, in_process=self.in_process)
        self.data = run_data(self.cfg)
        self.open_folder()
        self.mark("folder-ready")
        try:
            self.describe_partition()
            self.build_teacher()
            self.mark("teacher-loaded")
            self.build_strategy()
        except Exception as exc:
            self.setup_failed(exc)
            raise
        self.mark("strategy-start")
        try:
            result = self.rounds()
        except Exception as exc:  # recorded as the run's status, then re-raised: no failure is silent
            reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
            self.results.write_json("summary.json", self.summary("failed", error=reason).to_dict())
            self.log(f"[failed] {reason} -> {self.results.folder}")
            raise
        finally:
            self.results.write_jsonl("queries.jsonl", self.strategy.ledger.log)
        return self.finish(result)

    def setup_failed(self, exc: Exception) -> None:
        """Record a failure between claiming the folder and round 0 as the run's status (summary.json).

        Why: without it the folder of a run whose teacher or strategy could not be built reads
        "unfinished" and looks like a killed run. A resumed run's folder is left as it was: its
        checkpoint is still good for a later `--resume` once the cause is fixed.
        """
        reason = f"{type(exc).__name__}: {exc}"
        self.log(f"[failed] {reason} -> {self.results.folder}")
        if self.resume:
            return
        cfg = self.cfg
        summary = RunSummary(
            status="failed",
            error=reason,
            method=cfg.method,
            dataset=cfg.dataset,
            partition=cfg.partition,
            alpha=cfg.alpha,
            num_clients=cfg.num_clients,
            num_rounds=cfg.num_rounds,
            rounds_done=0,
            seed=cfg.seed,
            teacher_arch=cfg.teacher_arch,
            student_arch=cfg.student_arch,
            aggregation=cfg.aggregation,
            engine=self.engine,
            wall_seconds=round(time.time() - self.t_start, 1),
            timeline=dict(self.timeline),
            folder=str(self.results.folder),
        )
        self.results.write_json("summary.json", summary.to_dict())

    def open_folder(self) -> None:
        """A new run folder, or the killed run's folder and its last checkpoint."""
        if self.resume:
            self.results, self.checkpoint = RunResults.reopen(Path(self.cfg.out_dir) / self.cfg.run_name)
            done = self.checkpoint["round"]
            self.log(f"[setup] resuming {self.results.folder} after round {done} of {self.cfg.num_rounds}")
        else:
            self.results = RunResults.claim(self.cfg)
            self.cfg = self.cfg.replace(run_name=self.results.folder.name)  # clients key their state by it
            self.log(f"[setup] run folder {self.results.folder}")

    def describe_partition(self) -> None:
        cfg, ds, split = self.cfg, self.data.dataset, self.data.split
        self.names = class_names(ds.name, ds.num_classes)
        detail = {"dirichlet": f" alpha={cfg.alpha}", "pathological": f" classes-per-client={cfg.classes_per_client}"}
        detail["shard"] = f" shards-per-client={cfg.shards_per_client}"
        self.log(
            f"[setup] {ds.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test, {ds.num_classes} classes, "
            f"{cfg.num_clients} clients, partition={cfg.partition}{detail.get(cfg.partition, '')}"
        )
        self.log(split.summary_table(self.names))
        self.results.write_json(
            "partition.json",
            {
                "label_counts": split.label_counts,
                "class_names": self.names,
                "client_train_sizes": [len(p) for p in split.client_train],
                "client_test_sizes": [len(p) for p in split.client_test],
                "server_size": len(split.server_indices),
            },
        )
        self.results.plot_label_distribution(split.label_counts, self.names, f"{ds.name}: {cfg.partition} partition")

    def build_teacher(self) -> None:
        """The teacher (trained or from the cache), its oracle, and its answers on the test set."""
        cfg, ds = self.cfg, self.data.dataset
        self.device = pick_device(cfg.device)
        server_images, server_labels = self.data.server_train()
        recipe = TeacherRecipe.for_run(self.data, cfg)
        self.teacher, self.teacher_meta = load_or_train_teacher(
            recipe, cfg.resolved_cache_dir(), server_images, server_labels, ds.test_images, ds.test_labels,
            self.device, self.log,
        )  # fmt: skip

        # Keyed by the weights, not only the recipe: the same recipe retrained on another machine gives
        # other weights, and a cache dir copied between machines must not serve the old teacher's answers.
        teacher_key = f"{recipe.key()}-w{self.teacher_meta['digest']}"

        def answer_cache(output: str) -> AnswerCache | None:
            return AnswerCache(cfg.resolved_cache_dir(), teacher_key, output) if cfg.answer_cache else None

        self.oracle = TeacherOracle(
            self.teacher,
            num_classes=ds.num_classes,
            image_shape=ds.image_shape,
            output=cfg.oracle_output,
            budget=cfg.query_budget,
            batch_size=cfg.oracle_batch_size,
            device=self.device,
            answer_cache=answer_cache(cfg.oracle_output),
            top_k=cfg.oracle_top_k,
            decimals=None if cfg.oracle_decimals < 0 else cfg.oracle_decimals,
        )
        test_cache = answer_cache("test-logits")
        logits = (
            test_cache.get(ds.test_images, self.teacher_logits) if test_cache else self.teacher_logits(ds.test_images)
        )
        self.teacher_test_pred = logits.argmax(1)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.teacher, images, self.device)

    def build_strategy(self) -> None:
        cfg, ds = self.cfg, self.data.dataset
        torch.manual_seed(cfg.seed)
        self.student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
        self.initial = ArrayRecord(self.student.state_dict())
        reference = {}
        if cfg.federated_emulator:
            gen, disc = build_emulator(ds.num_classes, ds.image_shape, cfg.emulator_width, kind=cfg.emulator)
            reference = {P.GENERATOR: ArrayRecord(gen.state_dict()), P.DISCRIMINATOR: ArrayRecord(disc.state_dict())}
        self.strategy = MEKD(
            self.oracle,
            strategy=build_aggregation(cfg),
            query_budget=cfg.query_budget,
            query_teacher=not get_class(cfg.method).uses_labels,  # the supervised reference spends no queries
            train_emulators=emulators_needed(cfg),
            federated_emulator=cfg.federated_emulator,
            emulator_rounds=cfg.emulator_rounds,
            emulator_phase=cfg.emulator_phase,
            emulator_pairing=cfg.pairing,
            emulator_steps=cfg.emulator_steps,
            emulator_reference=reference,
            measure_fid=emulators_needed(cfg) and cfg.emulator_fid,
            client_config_keys=CLIENT_SETTINGS,
            node_records=shard_records(self.data) if cfg.client_data == "shard" else None,
            max_update_norm=cfg.max_update_norm,
            norm_outlier_factor=cfg.norm_outlier_factor,
            min_reply_fraction=cfg.min_reply_fraction,
            seed=cfg.seed,
            on_round=self.on_round,
            log_fn=self.log,
            failures_listed_in=f"{self.results.folder / 'summary.json'}",
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=cfg.num_clients,
        )
        self.start_round = 1
        if self.checkpoint is not None:
            self.strategy.load_state(self.checkpoint["strategy"])
            self.initial = ArrayRecord(self.checkpoint["student"])
            self.start_round = self.checkpoint["round"] + 1

    def rounds(self) -> Result:
        config = ConfigRecord(self.cfg.client_dict())
        return self.strategy.start(
            self.grid,
            self.initial,
            num_rounds=self.cfg.num_rounds,
            timeout=self.cfg.reply_timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=self.evaluate_global,
            num_nodes=self.cfg.num_clients,
            start_round=self.start_round,
        )

    def finish(self, result: Result) -> RunSummary:
        """The emulator samples and fidelity, summary.json, the accuracy plot and the last line."""
        cfg, ds = self.cfg, self.data.dataset
        final = result.arrays if result.arrays is not None else self.initial
        count = max(cfg.num_samples, cfg.fidelity_images)
        samples = self.strategy.request_samples(self.grid, final, ConfigRecord(cfg.client_dict()), count)
        fidelity: dict[str, Any] = {}
        if samples is not None:
            if cfg.num_samples:
                self.results.plot_samples({k: v[: cfg.num_samples] for k, v in samples.items()})
            if cfg.fidelity_images:
                fidelity = emulator_fidelity(
                    self.teacher_logits, samples["images"], samples["g-teacher"], samples["g-student"]
                )
                self.log(
                    f"[fidelity] the teacher re-classifies G(T(x)) as T(x)'s class on {fidelity['consistency']:.1%} "
                    f"of {fidelity['images']} query images (one figure of their main class: "
                    f"{fidelity['majority-share']:.1%}); class means of G(T(x)) "
                    f"{fidelity['class-separation'] or 0:.3f} apart "
                    f"(real images {fidelity['real-class-separation'] or 0:.3f})"
                )
        self.mark("samples-done")
        summary = self.summary("completed", fidelity=fidelity)
        self.results.write_json("summary.json", summary.to_dict())
        title = f"{cfg.method}: {ds.name}, {cfg.partition}, {cfg.num_clients} clients"
        self.results.plot_accuracy(self.teacher_meta["test_accuracy"], title)
        failed = len(summary.failures)
        self.log(
            f"[done] {cfg.method} on {ds.name} ({cfg.partition}, {cfg.num_clients} clients, {cfg.num_rounds} rounds): "
            f"student {summary.student_accuracy:.4f} vs teacher {summary.teacher_accuracy:.4f} test acc, "
            f"{summary.queries_total} teacher queries, {failed} failure{'s' * (failed != 1)}, "
            f"{summary.wall_seconds:.0f}s -> {self.results.folder}"
        )
        return summary

    # ------------------------------------------------------------------ callbacks
    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global student's test accuracy and its agreement with the teacher (server side)."""
        ds = self.data.dataset
        self.student.load_state_dict(arrays.to_torch_state_dict())
        pred = predict_logits(self.student.to(self.device), ds.test_images, self.device).argmax(1)
        return MetricRecord(
            {
                "accuracy": (pred == ds.test_labels).float().mean().item(),
                "agreement": (pred == self.teacher_test_pred).float().mean().item(),
            }
        )

    def on_round(self, record: dict, arrays: ArrayRecord) -> None:
        """Append the round to metrics.jsonl, save the student (a killed run resumes), say the round."""
        cfg = self.cfg
        self.mark(f"round-{record['round']}")
        self.results.append_round(record)
        self.results.save_checkpoint(
            record["round"], arrays.to_torch_state_dict(), self.strategy.state(), engine=self.engine
        )
        if record["round"] == 0:
            self.log(f"[round 0/{cfg.num_rounds}] initial student: acc {record['server/accuracy']:.4f}")
            return
        fed = record.get("fed/accuracy")
        self.log(
            f"[round {record['round']}/{cfg.num_rounds}] distill ({cfg.method}): "
            f"loss {record.get('train/train-loss', float('nan')):.4f}, "
            f"test acc {record['server/accuracy']:.4f}, agreement {record['server/agreement']:.4f}, "
            f"client-test acc {fed if fed is None else round(fed, 4)}, rejected {record.get('rejected', 0)}, "
            f"failures {len(record.get('failures', []))}, {record['elapsed-s']:.0f}s"
        )

    def summary(self, status: str, *, error: str | None = None, fidelity: dict | None = None) -> RunSummary:
        cfg, s = self.cfg, self.strategy
        rounds = self.results.rounds
        last = rounds[-1] if rounds else {}
        fids = [m.get("fid") for m in s.phases.emulator_metrics.values() if m.get("fid") is not None]
        wall = round(time.time() - self.t_start, 1)
        return RunSummary(
            status=status,
            error=error,
            method=cfg.method,
            dataset=self.data.dataset.name,
            partition=cfg.partition,
            alpha=cfg.alpha,
            num_clients=cfg.num_clients,
            num_rounds=cfg.num_rounds,
            rounds_done=s.last_round,
            seed=cfg.seed,
            teacher_arch=cfg.teacher_arch,
            student_arch=cfg.student_arch,
            aggregation=cfg.aggregation,
            teacher_accuracy=self.teacher_meta["test_accuracy"],
            teacher_cached=self.teacher_meta["cached"],
            teacher_digest=self.teacher_meta.get("digest"),
            student_accuracy=last.get("server/accuracy"),
            student_best_accuracy=max((r["server/accuracy"] for r in rounds), default=None),
            student_agreement=last.get("server/agreement"),
            client_test_accuracy=last.get("fed/accuracy"),
            student="student.pt" if (self.results.folder / "student.pt").exists() else None,
            queries_used=dict(s.ledger.queries_used),
            queries_total=s.ledger.total,
            rejected_updates=list(s.rejected),
            clipped_updates=list(s.clipped),
            failures=list(s.failures.entries),
            emulator=s.phases.emulator_metrics,
            emulator_kind=cfg.emulator,
            federated_emulator=cfg.federated_emulator,
            emulator_phase=cfg.emulator_phase,
            emulator_pairing=cfg.pairing,
            clients_prepared=len(s.ledger.answered),
            emulator_fid_mean=sum(fids) / len(fids) if fids else None,
            query_source=cfg.query_source,
            query_views=cfg.query_views,
            query_fraction=cfg.query_fraction,
            query_selection=cfg.query_selection,
            source_blind=not get_class(cfg.method).uses_labels,
            resumed=self.resume,
            engine=self.engine,
            wall_seconds=wall,
            phase_seconds={**s.phases.seconds, "total": wall},
            timeline=dict(self.timeline),
            folder=str(self.results.folder),
            fidelity=fidelity or {},
        )


def run_server(
    grid: Grid,
    cfg: RunConfig,
    log: Callable[[str], None] = say,
    *,
    resume: bool = False,
    engine: str = SIMULATION,
    in_process: bool = True,
) -> dict[str, Any]:
    """One complete run (see `ServerRun`); returns the summary in its JSON form."""
    return ServerRun(grid, cfg, log, resume=resume, engine=engine, in_process=in_process).run().to_dict()


def engine_of(grid: Grid) -> str:
    """The engine that drives the run: SIMULATION for Flower's simulation runtime (its in-memory grid), else DEPLOYMENT.

    Why the grid: a ServerApp is not told which engine runs it; under `flwr run` the local simulation
    hands it an InMemoryGrid and the Deployment Engine a grid connected to the SuperLink.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return SIMULATION if isinstance(grid, InMemoryGrid) else DEPLOYMENT


def make_server_app(settings: Mapping[str, Any] | RunConfig, *, resume: bool = False) -> ServerApp:
    """A ServerApp with fixed settings (for in-process simulation, where Flower passes no run-config)."""
    cfg = settings if isinstance(settings, RunConfig) else RunConfig.from_mapping(settings)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, resume=resume, engine=SIMULATION, in_process=True)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of `flwr run`: settings come from `[tool.flwr.app.config]` plus `--run-config`."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_server(grid, RunConfig.from_mapping(dict(context.run_config)), engine=engine_of(grid), in_process=False)
