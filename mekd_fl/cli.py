"""`mekd-fl`: run a simulation in-process (`run`), with settings from YAML and `key=value` overrides.

Also `compare` (methods side by side), `bench` (an experiment spec's grid, resumable) and `report`.

Why beside `flwr run`: Flower's CLI starts a SuperLink in the background and needs the federation's
SuperNode count set to match `num-clients`; `mekd-fl run` checks the settings and data first (bad
input fails in under a second, before Ray starts), sizes the federation from `num-clients`, and
leaves no process behind.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

import yaml

from mekd_fl.errors import ConfigError


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values parsed as YAML scalars (so 0.5, true and 'text' all work)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"setting {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_settings(config_file: str | None, pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {config_file}: {exc.strerror}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {config_file} must hold a mapping of settings")
        settings.update(loaded)
    settings.update(parse_overrides(pairs))
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mekd_fl.config import RunConfig
    from mekd_fl.server import saved_run
    from mekd_fl.server.app import make_server_app, prepare
    from mekd_fl.server.results import default_run_name
    from strategies import RunFailed

    resume = args.resume is not None
    if resume:
        if args.settings or args.config:
            raise ConfigError("--resume takes no settings: a resumed run keeps those in its config.json")
        folder = Path(args.resume)
        cfg = saved_run.load_config(folder)
        outcome = saved_run.inspect(folder)  # the same judgement `mekd-fl status` advises by
        if outcome.state != "unfinished":
            raise ConfigError(f"--resume: {folder} is {outcome.state}, nothing to resume ({outcome.line})")
        if outcome.refusal is not None:  # refused before anything in the folder is touched
            raise ConfigError(f"--resume: {outcome.refusal}")
    else:
        cfg = RunConfig.from_mapping(load_settings(args.config, args.settings))
        if not cfg.run_name:  # named now, so that this process knows where the run's status lands
            cfg = cfg.replace(run_name=default_run_name(cfg))
    # settings, data, device, folders checked before any process starts; this runs in-process
    prepare(cfg, resume=resume, in_process=True)
    if args.check:
        print(f"settings and data OK: {cfg.dataset}, {cfg.num_clients} clients, method={cfg.method}")
        return 0
    from mekd_fl.runtime.simulation import backend_config, fast_message_polling, quiet_flower

    folder = Path(cfg.out_dir) / cfg.run_name
    # before Flower's imports: our own progress lines say what happens; a crashing client's tracebacks go
    # to the run folder (opened at the first one, when the server has claimed the folder)
    quiet_flower(args.verbose, log_file=folder / "flower.log")
    fast_message_polling()
    from flwr.simulation import run_simulation

    from mekd_fl.client.app import make_client_app

    try:
        run_simulation(
            server_app=make_server_app(cfg, resume=resume),
            client_app=make_client_app(cfg.data_dir),
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(args.client_cpus, args.client_gpus, args.ray_address),
            verbose_logging=args.verbose,
        )
    except RunFailed as exc:
        print(f"mekd-fl: error: run failed: {exc}", file=sys.stderr)
        return 1
    state, line = saved_run.status(folder) if (folder / "config.json").is_file() else ("failed", "no run folder")
    if state != "completed":
        print(f"mekd-fl: error: run {state}: {line}", file=sys.stderr)
        return 1
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from mekd_fl.runtime.deploy.local import deploy_local

    return deploy_local(
        args.supernodes,
        args.run_config,
        workdir=args.workdir,
        timeout=args.timeout,
        port=args.port,
        node_port=args.node_port,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mekd_fl.server import saved_run

    state, line = saved_run.status(Path(args.folder))
    print(f"{args.folder}: {line}")
    return saved_run.STATUS_EXIT[state]


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mekd_fl.server import saved_run

    out = saved_run.evaluate(Path(args.folder))
    agreement = (
        "teacher not in the cache" if out["agreement"] is None else f"agreement with the teacher {out['agreement']:.4f}"
    )
    print(
        f"{out['folder']}: student ({out['student-arch']}) test accuracy {out['accuracy']:.4f} on "
        f"{out['test-images']} images, {agreement}"
    )
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mekd_fl.bench.compare import compare
    from mekd_fl.config import RunConfig
    from mekd_fl.distill import get_class

    base = RunConfig.from_mapping(load_settings(args.config, args.settings))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        get_class(method)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    command = "mekd-fl compare " + " ".join(args.settings) + f" --methods {args.methods} --out {args.out}"
    caption = (
        f"{base.dataset}, {base.num_clients} clients, partition={base.partition} (alpha={base.alpha}), "
        f"{base.teacher_arch} -> {base.student_arch}, {base.num_rounds} rounds x {base.local_epochs} local "
        f"epochs, seed {base.seed}. Command: `{command.strip()}`"
    )
    markdown = compare(
        base, methods, folder, caption, client_cpus=args.client_cpus, client_gpus=args.client_gpus, verbose=args.verbose
    )
    print(markdown)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mekd_fl.bench.sweep import bench

    only = parse_only(args.only)
    command = " ".join(["mekd-fl", *(shlex.quote(a) for a in args.argv)])
    return bench(
        args.spec,
        args.out,
        parse_overrides(args.set),
        only=only,
        dry_run=args.dry_run,
        command=command,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        verbose=args.verbose,
    )


def parse_only(items: list[str]) -> dict[str, list[str]]:
    """`--only seed=1,2 method=kd` -> {"seed": ["1", "2"], "method": ["kd"]}."""
    only: dict[str, list[str]] = {}
    for item in items:
        axis, sep, labels = item.partition("=")
        values = [v.strip() for v in labels.split(",") if v.strip()]
        if not sep or not axis.strip() or not values:
            raise ConfigError(f"--only {item!r}: expected AXIS=LABEL[,LABEL...], e.g. --only seed=1")
        only.setdefault(axis.strip(), []).extend(values)
    return only


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mekd_fl.bench.report import copy_results, write_report

    print(write_report(Path(args.folder)))
    if args.copy_to:
        copied = copy_results(Path(args.folder), Path(args.copy_to))
        print(
            f"copied {len(copied)} files (report, plots, spec, provenance, per-cell settings and numbers) "
            f"to {args.copy_to}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mekd-fl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated distillation in Flower's simulation runtime")
    run.add_argument("settings", nargs="*", help="run settings as key=value (see docs/running.md's table)")
    run.add_argument("--config", help="YAML file of settings (key=value pairs override it)")
    run.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per simulated client (Ray)")
    run.add_argument(
        "--client-gpus",
        type=float,
        default=None,
        help="GPU share per client (default 0.25 when CUDA is present: 4 clients per GPU)",
    )
    run.add_argument("--check", action="store_true", help="validate settings and data, then stop")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument(
        "--resume",
        metavar="RUN_FOLDER",
        help="continue a killed run from its last saved round (same settings, same results)",
    )
    run.add_argument(
        "--ray-address",
        default="",
        metavar="HOST:PORT",
        help="attach to a running Ray cluster (`ray start --head`) instead of starting one; "
        "default: $RAY_ADDRESS if set, else a private cluster",
    )
    run.set_defaults(func=cmd_run)
    dep = sub.add_parser(
        "deploy-local",
        help="one run under Flower's Deployment Engine on loopback: TLS, authenticated SuperNodes, the outcome",
    )
    dep.add_argument("--supernodes", type=int, required=True, metavar="N", help="SuperNodes (= num-clients)")
    dep.add_argument(
        "--run-config", default="", metavar="'K=V ...'", help="run settings, as for `flwr run --run-config`"
    )
    dep.add_argument("--workdir", default="runs/deploy-local", help="certificates, keys, FLWR_HOME and logs")
    dep.add_argument("--timeout", type=float, default=1800.0, metavar="S", help="seconds to wait for the run")
    dep.add_argument("--port", type=int, default=8000, help="SuperLink port on 127.0.0.1")
    dep.add_argument("--node-port", type=int, default=9094, help="first SuperNode's port; node i takes NODE_PORT+i")
    dep.set_defaults(func=cmd_deploy_local)
    st = sub.add_parser("status", help="a run folder's true status (exit 0 completed, 1 failed, 3 unfinished)")
    st.add_argument("folder")
    st.set_defaults(func=cmd_status)
    ev = sub.add_parser(
        "evaluate", help="test accuracy of a run's saved student.pt (and agreement with the cached teacher)"
    )
    ev.add_argument("folder")
    ev.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ev.set_defaults(func=cmd_evaluate)
    cmp = sub.add_parser("compare", help="run several methods on the same settings and tabulate them")
    cmp.add_argument("settings", nargs="*", help="shared run settings as key=value")
    cmp.add_argument("--config", help="YAML file of settings (key=value pairs override it)")
    cmp.add_argument("--methods", default="kd,dkd,cdl,can,mekd,supervised")
    cmp.add_argument("--out", default="runs/compare", help="folder for the runs and comparison.md/.csv")
    cmp.add_argument("--client-cpus", type=float, default=1.0)
    cmp.add_argument("--client-gpus", type=float, default=None)
    cmp.add_argument("--verbose", action="store_true")
    cmp.set_defaults(func=cmd_compare)
    bench = sub.add_parser("bench", help="run every cell of an experiment spec (resumable), then report")
    bench.add_argument("spec", help="experiment spec, e.g. experiments/smoke.yaml")
    bench.add_argument("--out", default="experiments/runs", help="results go to OUT/<spec name>/")
    bench.add_argument("--dry-run", action="store_true", help="list the cells and which are done; run nothing")
    bench.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="settings applied over the spec's base for every cell (saved in the spec copy)",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        action="extend",
        default=[],
        metavar="AXIS=LABELS",
        help="run only the cells whose AXIS label is one of LABELS (comma-separated), "
        "e.g. --only seed=1; the others stay as they are",
    )
    bench.add_argument("--client-cpus", type=float, default=1.0)
    bench.add_argument("--client-gpus", type=float, default=None)
    bench.add_argument("--verbose", action="store_true")
    bench.set_defaults(func=cmd_bench)
    rep = sub.add_parser("report", help="tables and plots of a bench folder (OUT/<spec name>)")
    rep.add_argument("folder")
    rep.add_argument(
        "--copy-to",
        metavar="DEST",
        help="also copy the report, plots, spec and each finished cell's settings and numbers to DEST "
        "(e.g. experiments/results/<name> to commit them)",
    )
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mekd-fl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
