"""A run folder after the fact: its settings, its true status and its saved student.

Why: `flwr run --stream` exits 0 even when the ServerApp failed, and a killed run leaves no summary;
`mekd-fl status` reads what the run itself recorded (summary.json's "status", else its last checkpoint),
and `mekd-fl evaluate` measures the saved `student.pt` without running anything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.server.summary import RunSummary

STATUS_EXIT = {"completed": 0, "failed": 1, "unfinished": 3}


def load_config(folder: Path) -> RunConfig:
    """The run's settings, with out-dir and run-name pointing at this folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a run folder (no config.json)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg})") from None
    values.update({"out-dir": str(folder.parent), "run-name": folder.name})
    return RunConfig.from_mapping(values)


def status(folder: Path) -> tuple[str, str]:
    """("completed" | "failed" | "unfinished", a line a person can read)."""
    cfg = load_config(folder)
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        try:
            summary = RunSummary.read(summary_path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if summary.status == "failed":
            return (
                "failed",
                f"failed after round {summary.rounds_done or 0} of {cfg.num_rounds}: {summary.error}",
            )
        acc = summary.student_accuracy
        failures = len(summary.failures)
        return "completed", (
            f"completed {cfg.num_rounds} rounds: student accuracy {acc:.4f}, "
            f"{failures} recorded failure{'s' * (failures != 1)}"
            if acc is not None
            else "completed"
        )
    done = 0
    if (folder / "checkpoint.pt").is_file():
        done = int(torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["round"])
    return "unfinished", (
        f"unfinished: last saved round {done} of {cfg.num_rounds} (still running, or killed: "
        f"continue with `mekd-fl run --resume {folder}`)"
    )


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
