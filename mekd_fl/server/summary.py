"""The typed summary of a run (`summary.json`): one definition that the ServerApp writes and tools read.

Why typed: the benchmark reports, the comparison table, `mekd-fl status` and the scaling benchmark all
read the summary back; with one dataclass they read fields that exist, with their types, instead of
string keys of a dict built in a 230-line function. The JSON keys stay kebab-case, as every result
file of the project (and the committed results) has them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The engines a run folder records (`RunSummary.engine`, checkpoint.pt's "engine"): Flower's simulation
#: runtime (`mekd-fl run`, `flwr run`'s local simulation) or its Deployment Engine (SuperLink and
#: SuperNodes: `mekd-fl deploy-local`, real hosts). Only a simulation can be continued by
#: `mekd-fl run --resume`; "" is a folder written before the field existed.
SIMULATION, DEPLOYMENT = "simulation", "deployment"


@dataclass
class RunSummary:
    """What a run did and reached. `status` is "completed" or "failed" (with `error`)."""

    status: str
    method: str
    dataset: str
    partition: str
    alpha: float
    num_clients: int
    num_rounds: int
    rounds_done: int
    seed: int
    teacher_arch: str
    student_arch: str
    aggregation: str
    teacher_accuracy: float | None = None
    teacher_cached: bool | None = None
    #: `weights_digest` of the teacher: cells compared in a report must share it (None: written before it).
    teacher_digest: str | None = None
    student_accuracy: float | None = None
    student_best_accuracy: float | None = None
    student_agreement: float | None = None
    client_test_accuracy: float | None = None
    student: str | None = None
    queries_used: dict[str, int] = field(default_factory=dict)
    queries_total: int = 0
    rejected_updates: list[dict] = field(default_factory=list)
    clipped_updates: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    emulator: dict = field(default_factory=dict)
    emulator_kind: str = ""
    federated_emulator: bool = False
    emulator_phase: str = "upfront"
    emulator_pairing: str = "none"
    clients_prepared: int = 0
    emulator_fid_mean: float | None = None
    query_source: str = "local"
    query_views: int = 1
    query_fraction: float = 1.0
    query_selection: str = "random"
    source_blind: bool = True  # False for the supervised reference: it reads the clients' true labels
    resumed: bool = False
    #: Which Flower engine ran it: SIMULATION or DEPLOYMENT ("" in summaries written before the field).
    engine: str = ""
    wall_seconds: float = 0.0
    #: Seconds spent in the server-driven phases and the rounds (`emulator`, `query`, `rounds`).
    phase_seconds: dict[str, float] = field(default_factory=dict)
    #: When each step ended, in seconds since the run began: folder-ready, teacher-loaded, strategy-start,
    #: round-0 (the upfront phases are before it), round-1, ..., samples-done.
    timeline: dict[str, float] = field(default_factory=dict)
    folder: str = ""
    error: str | None = None
    #: The emulator's fidelity after the run (`mekd_fl.fidelity`), empty when not measured.
    fidelity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: kebab-case keys; `error` only when failed; fidelity as `fidelity-<key>` entries."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "error" and value is None:
                continue
            if f.name == "fidelity":
                out.update({f"fidelity-{k}": v for k, v in value.items()})
                continue
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSummary:
        """Read the JSON form back; unknown keys (a newer or older writer) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in values.items() if k.replace("-", "_") in names}
        kwargs["fidelity"] = {k[len("fidelity-") :]: v for k, v in values.items() if k.startswith("fidelity-")}
        kwargs.setdefault("status", "completed")  # written before "status" existed: only completed runs wrote one
        for f in dataclasses.fields(cls):  # a summary without a required field can still be shown
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs[f.name] = None
        return cls(**kwargs)

    @classmethod
    def read(cls, path: Path | str) -> RunSummary:
        """A summary.json; raises ValueError (one line) when it is not a readable summary."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable summary.json ({type(exc).__name__})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: not a readable summary.json (not an object)")
        if values.get("status", "completed") not in ("completed", "failed"):
            raise ValueError(f"{path}: not a readable summary.json (no run status)")
        return cls.from_dict(values)
