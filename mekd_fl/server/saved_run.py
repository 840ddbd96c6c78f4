"""A run folder after the fact: its settings, its true status and its saved student.

Why: `flwr run --stream` exits 0 even when the ServerApp failed, and a killed run leaves no summary;
`mekd-fl status` reads what the run itself recorded (summary.json's "status", else its last checkpoint),
and `mekd-fl evaluate` measures the saved `student.pt` without running anything else.

A folder can be damaged (a truncated or replaced checkpoint.pt, a cut summary.json), half-written (killed
before its first checkpoint) or written by the Deployment Engine, which `mekd-fl run --resume` cannot
continue. Each case is one line and an exit code, never a traceback; files are read with
`weights_only=True`, so a pickle that would run code is refused. `inspect` judges a folder once, and both
`mekd-fl status` (its advice) and `mekd-fl run --resume` (its refusal) use that judgement, so status
never recommends a command that then fails.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.server.results import read_checkpoint
from mekd_fl.server.summary import DEPLOYMENT, RunSummary

STATUS_EXIT = {"completed": 0, "failed": 1, "unfinished": 3}


@dataclass(frozen=True)
class Outcome:
    """A run folder's state, the line `mekd-fl status` prints, and whether `mekd-fl run --resume` can
    continue it (`refusal` is None when it can, else the one-line reason it cannot).

    Why one object: status advises `--resume` exactly when `refusal` is None, and `mekd-fl run --resume`
    refuses exactly with `refusal`, so status never recommends a command that then fails.
    """

    state: str
    line: str
    refusal: str | None = None


def load_config(folder: Path) -> RunConfig:
    """The run's settings, with out-dir and run-name pointing at this folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a run folder (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a mapping of settings")
    values.update({"out-dir": str(folder.parent), "run-name": folder.name})
    return RunConfig.from_mapping(values)


def status(folder: Path) -> tuple[str, str]:
    """("completed" | "failed" | "unfinished", a line a person can read)."""
    out = inspect(folder)
    return out.state, out.line


def rerun_command(folder: Path, cfg: RunConfig) -> str:
    """A command that starts the folder's run again from scratch, under a run-name not yet taken."""
    n = 2
    while (folder.parent / f"{folder.name}-{n}").exists():
        n += 1
    new = f"{folder.name}-{n}"
    if cfg.client_data == "node-config" or _engine_of(folder) == DEPLOYMENT:
        return (
            f"start it again under Flower's Deployment Engine as it was started (mekd-fl deploy-local or flwr run), "
            f"with run-name={new}"
        )
    return (
        f"start it again: `mekd-fl run --config {shlex.quote(str(folder / 'config.json'))} "
        f"out-dir={shlex.quote(str(folder.parent))} run-name={new}`"
    )


def inspect(folder: Path) -> Outcome:
    """What the folder says about its run: summary.json when readable, else checkpoint.pt and metrics.jsonl."""
    cfg = load_config(folder)
    total = cfg.num_rounds
    summary_path, damage = folder / "summary.json", ""
    if summary_path.is_file():
        try:
            summary = RunSummary.read(summary_path)
        except ValueError as exc:
            damage = str(exc).rsplit("(", 1)[-1].rstrip(")")
        else:
            return _from_summary(folder, cfg, summary)
    rounds = _metrics_rounds(folder)
    checkpoint, problem = None, ""
    if (folder / "checkpoint.pt").is_file():
        try:
            checkpoint = read_checkpoint(folder / "checkpoint.pt")
        except ValueError as exc:
            problem = str(exc)
    done = max(rounds, checkpoint["round"] if checkpoint else -1)
    missing = f"summary.json is damaged ({damage})" if damage else "summary.json is missing"
    if done >= total and (folder / "student.pt").is_file():
        return Outcome(
            "completed",
            f"completed {total} rounds by metrics.jsonl and student.pt ({_last_accuracy(folder)}), but {missing}: "
            f"the run stopped while writing its samples and summary, or the file was removed; its failures and "
            f"query counts are not known",
            f"{folder} completed its {total} rounds, nothing to resume",
        )
    if damage:  # a summary is written only when a run ends: fewer rounds than asked means it failed
        return Outcome(
            "failed",
            f"failed after round {max(done, 0)} of {total}: {missing}, the reason is lost; "
            + rerun_command(folder, cfg),
            f"{folder} ended (its summary.json is damaged), nothing to resume",
        )
    if problem:
        return Outcome(
            "unfinished",
            f"unfinished: {problem}, so it cannot be resumed; metrics.jsonl reaches round {max(rounds, 0)} of "
            f"{total}; " + rerun_command(folder, cfg),
            f"{problem}; " + rerun_command(folder, cfg),
        )
    if checkpoint is None:
        refusal = (
            f"{folder} has no checkpoint.pt: no round was saved (stopped during setup, the teacher or the "
            f"emulator phase, or still running), so there is nothing to resume; " + rerun_command(folder, cfg)
        )
        return Outcome("unfinished", f"unfinished: {refusal}", refusal)
    line = f"unfinished: last saved round {checkpoint['round']} of {total} (still running, or killed: "
    reason = _engine_refusal(folder, cfg, checkpoint)
    if reason is None:
        return Outcome("unfinished", line + f"continue with `mekd-fl run --resume {shlex.quote(str(folder))}`)")
    refusal = f"{reason}; " + rerun_command(folder, cfg)
    return Outcome("unfinished", line + refusal + ")", refusal)


def _from_summary(folder: Path, cfg: RunConfig, summary: RunSummary) -> Outcome:
    if summary.status == "failed":
        return Outcome(
            "failed",
            f"failed after round {summary.rounds_done or 0} of {cfg.num_rounds}: {summary.error}",
            f"{folder} failed, nothing to resume",
        )
    acc = summary.student_accuracy
    failures = len(summary.failures)
    line = (
        f"completed {cfg.num_rounds} rounds: student accuracy {acc:.4f}, "
        f"{failures} recorded failure{'s' * (failures != 1)}"
        if isinstance(acc, (int, float))
        else "completed"
    )
    return Outcome("completed", line, f"{folder} is completed, nothing to resume")


def _engine_refusal(folder: Path, cfg: RunConfig, checkpoint: dict) -> str | None:
    """Why `mekd-fl run --resume` (an in-process simulation) cannot continue this run, or None."""
    if checkpoint.get("engine") == DEPLOYMENT:
        return (
            f"{folder} was run by Flower's Deployment Engine, and mekd-fl run --resume continues only "
            "simulations (mekd-fl run, flwr run's local simulation)"
        )
    if cfg.client_data == "node-config":
        return f"{folder} has client-data=node-config, which mekd-fl run --resume (in-process) cannot serve"
    return None


def _engine_of(folder: Path) -> str:
    """The engine the folder's checkpoint records ("" when none is readable)."""
    try:
        return str(read_checkpoint(folder / "checkpoint.pt").get("engine", ""))
    except (OSError, ValueError):
        return ""


def _metrics_rounds(folder: Path) -> int:
    """The last round metrics.jsonl records (-1 when none); a line cut by a kill ends the reading."""
    last = -1
    for row in _metrics_rows(folder):
        if isinstance(row.get("round"), int):
            last = max(last, row["round"])
    return last


def _metrics_rows(folder: Path) -> list[dict]:
    try:
        text = (folder / "metrics.jsonl").read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _last_accuracy(folder: Path) -> str:
    accs = [r["server/accuracy"] for r in _metrics_rows(folder) if isinstance(r.get("server/accuracy"), (int, float))]
    return f"student accuracy {accs[-1]:.4f}" if accs else "no accuracy recorded"


def resume_refusal(folder: Path) -> str | None:
    """Why `mekd-fl run --resume folder` cannot continue it (one line), or None when it can."""
    return inspect(folder).refusal


def evaluate(folder: Path) -> dict:
    """Accuracy of the saved student on the data set's test split, and its agreement with the teacher
    when the teacher's checkpoint is in the cache (it is never trained for this)."""
    from mekd_fl.device import pick_device
    from mekd_fl.models.classifier import build_model, predict_logits
    from mekd_fl.run_data import run_data
    from mekd_fl.teacher.training import TeacherRecipe, load_or_train_teacher

    cfg = load_config(folder)
    path = folder / "student.pt"
    if not path.is_file():
        raise ConfigError(f"{folder} has no student.pt (the run never finished a round)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{path} cannot be read safely ({type(exc).__name__})") from None
    data = run_data(cfg)
    ds = data.dataset
    device = pick_device(cfg.device)
    student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
    try:
        student.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{path} does not fit student-arch={cfg.student_arch} ({str(exc).splitlines()[0]})") from None
    pred = predict_logits(student.to(device), ds.test_images, device).argmax(1)
    out = {
        "folder": str(folder),
        "student-arch": cfg.student_arch,
        "test-images": len(ds.test_labels),
        "accuracy": (pred == ds.test_labels).float().mean().item(),
        "agreement": None,
    }
    server_images, server_labels = data.server_train()
    recipe = TeacherRecipe.for_run(data, cfg)
    if (cfg.resolved_cache_dir() / "teachers" / f"{recipe.key()}.pt").is_file():
        teacher, _ = load_or_train_teacher(
            recipe,
            cfg.resolved_cache_dir(),
            server_images,
            server_labels,
            ds.test_images,
            ds.test_labels,
            device,
            log=lambda line: None,
        )
        teacher_pred = predict_logits(teacher, ds.test_images, device).argmax(1)
        out["agreement"] = (pred == teacher_pred).float().mean().item()
    return out
