"""The result folder of one run: resolved config, per-round metrics, checkpoints, summary and plots.

Why a class: a run writes to its folder at several moments (partition at start, one JSON line and one
checkpoint per round, plots and summary at the end) and must never clobber an earlier run's files; the
folder is claimed once, atomically, and refused if it already exists. Only `reopen` (a resumed run)
writes into an existing folder, and it keeps every round up to the last checkpoint.

Files that hold weights are written to a temporary name and renamed, and hold only tensors and plain
containers, so `torch.load(path, weights_only=True)` reads them: `student.pt` (the latest global
student's state dict) and `checkpoint.pt` (the round, that student and the strategy's state).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mekd_fl import plots
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.plots import MAX_BARS as MAX_BARS  # re-exported: callers and tests read it here


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def read_checkpoint(path: Path) -> dict:
    """A checkpoint.pt, read with `weights_only=True` (a pickle that would run code is refused, never
    executed); raises ValueError with one line when the file is damaged, unsafe or not a checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many kinds for a damaged or unsafe file)
        raise ValueError(f"{path} cannot be read safely ({type(exc).__name__}: damaged or not weights only)") from None
    if (
        not isinstance(checkpoint, dict)
        or not {"round", "student", "strategy"} <= set(checkpoint)
        or not isinstance(checkpoint["round"], int)
    ):
        raise ValueError(f"{path} is not a mekd-fl checkpoint")
    return checkpoint


def default_run_name(cfg: RunConfig) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{cfg.dataset}-{cfg.partition}"


class RunResults:
    """Writes `config.json`, `partition.json`, `metrics.jsonl`, `summary.json` and PNG plots."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metrics_path = folder / "metrics.jsonl"
        self.rounds: list[dict] = []

    @classmethod
    def claim(cls, cfg: RunConfig) -> RunResults:
        """Create the run's folder; refuse one that exists so no earlier result is overwritten.

        The folder appears whole, with its config.json, by a rename: a run killed while claiming
        leaves either nothing or a folder that says which settings it was run with.
        """
        name = cfg.run_name or default_run_name(cfg)
        folder = Path(cfg.out_dir) / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        refused = ConfigError(
            f"run-name={name!r}: {folder} already exists; choose another run-name (results are never overwritten)"
        )
        if folder.exists():
            raise refused
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        (staging / "config.json").write_text(json.dumps(_jsonable(cfg.to_dict()), indent=2) + "\n")
        try:
            os.rename(staging, folder)  # fails on a non-empty folder that appeared meanwhile
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise refused from None
        return cls(folder)

    @classmethod
    def reopen(cls, folder: Path) -> tuple[RunResults, dict]:
        """An unfinished run's folder and its last checkpoint; metrics after that round are dropped."""
        results = cls(folder)
        checkpoint = results.load_checkpoint()
        last = checkpoint["round"]
        rows = []
        if results.metrics_path.exists():
            for line in results.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
                if row.get("round", 0) <= last:
                    rows.append(row)
        results.rounds = rows
        tmp = results.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, results.metrics_path)
        return results, checkpoint

    def save_checkpoint(
        self, server_round: int, student: dict[str, torch.Tensor], strategy_state: dict, *, engine: str = ""
    ) -> None:
        """The global student after `server_round` (student.pt) and what resuming needs (checkpoint.pt):
        the round, that student, the strategy's state, and the engine that ran it (only a simulation
        can be continued by `mekd-fl run --resume`)."""
        student = {k: v.detach().cpu().clone() for k, v in student.items()}
        self._save_torch("student.pt", student)
        payload = {"round": int(server_round), "student": student, "strategy": _jsonable(strategy_state)}
        self._save_torch("checkpoint.pt", {**payload, "engine": engine})

    def load_checkpoint(self) -> dict:
        path = self.folder / "checkpoint.pt"
        if not path.is_file():
            raise ConfigError(
                f"--resume: {self.folder} has no checkpoint.pt (the run never finished a round); "
                f"start it again under a new run-name"
            )
        try:
            return read_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"--resume: {exc}; start the run again under a new run-name") from None

    def _save_torch(self, name: str, payload: Any) -> Path:
        path = self.folder / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    def write_jsonl(self, name: str, rows: list[dict]) -> Path:
        path = self.folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in rows))
        os.replace(tmp, path)
        return path

    def write_json(self, name: str, payload: Any) -> Path:
        path = self.folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def append_round(self, record: dict) -> None:
        self.rounds.append(record)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")

    # ------------------------------------------------------------------ plots (drawn by mekd_fl.plots)
    def plot_accuracy(self, teacher_accuracy: float | None, title: str) -> Path:
        return plots.run_accuracy(self.rounds, teacher_accuracy, title, self.folder / "accuracy.png")

    def plot_label_distribution(self, counts: np.ndarray, class_names: list[str], title: str) -> Path:
        return plots.label_distribution(counts, class_names, title, self.folder / "label_distribution.png")

    def plot_samples(self, samples: dict[str, np.ndarray]) -> Path:
        """Rows: real x, G(T(x)), G(S(x)); one column per image."""
        return plots.emulator_samples(samples, self.folder / "emulator_samples.png")
