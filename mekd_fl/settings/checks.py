"""The rules that read two or more settings, each a small named function.

A rule a single value can break is declared on its `Setting` (choices, `within`, `rule`); what is left
here are combinations. Each check names the settings it reads, so a selection that lacks one (an edge
device, which is never sent the server's settings) skips the check rather than judging defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mekd_fl.errors import ConfigError
from mekd_fl.settings.run import SCORED_SELECTIONS


@dataclass(frozen=True)
class Check:
    """A rule over `reads` (kebab-case names); `rule(values)` raises a one-line ConfigError."""

    reads: tuple[str, ...]
    rule: Callable[[Any], None]


def lazy_phases_need_local_emulators(v: Any) -> None:
    if v.emulator_phase == "lazy" and v.federated_emulator:
        raise ConfigError(
            "emulator-phase=lazy is not accepted with federated-emulator=true (averaging emulators needs "
            "every client at once); accepted: emulator-phase=upfront, or federated-emulator=false"
        )


def scored_selections_need_a_trained_student(v: Any) -> None:
    if v.query_selection in SCORED_SELECTIONS and (v.emulator_phase != "lazy" or v.fraction_train >= 1):
        raise ConfigError(
            f"query-selection={v.query_selection} is not accepted with "
            + ("emulator-phase=upfront" if v.emulator_phase != "lazy" else "fraction-train=1")
            + " (every client would query before any round has trained the student that scores its "
            "images); accepted: emulator-phase=lazy with fraction-train < 1, or query-selection=random "
            "or kcenter"
        )


def pairing_needs_local_queries(v: Any) -> None:
    if v.emulator_pairing == "paired" and v.query_source != "local":
        raise ConfigError(
            f"emulator-pairing=paired is not accepted with query-source={v.query_source} (the pairs are "
            "the client's queries with their answers, sent before G exists); accepted: query-source=local, "
            "or emulator-pairing=none"
        )


def resolved_pairing(v: Any) -> str:
    """emulator-pairing with auto resolved: paired where the queries are the client's own images
    (query-source=local: only then are there (answer, image) pairs before G is trained) and each G stays
    on its client (a federated average of paired Gs would carry other clients' answers to every client)."""
    if v.emulator_pairing != "auto":
        return v.emulator_pairing
    return "paired" if v.query_source == "local" and not v.federated_emulator else "none"


def synthetic_pairs_need_a_paired_emulator(v: Any) -> None:
    if v.weight_synthetic > 0 and resolved_pairing(v) != "paired":
        raise ConfigError(
            f"weight-synthetic={v.weight_synthetic:g} needs a paired emulator (an unpaired G(p') does not show "
            f"the class p' names), and emulator-pairing={v.emulator_pairing} with query-source={v.query_source} "
            f"and federated-emulator={v.federated_emulator} gives none; accepted: weight-synthetic=0, or "
            "emulator-pairing=paired, or auto with query-source=local and federated-emulator=false"
        )


def top_k_needs_probabilities(v: Any) -> None:
    if v.oracle_top_k > 0 and v.oracle_output != "probs":
        raise ConfigError(
            f"oracle-top-k={v.oracle_top_k} needs oracle-output=probs "
            f"(oracle-output={v.oracle_output}); accepted: oracle-top-k=0 with logits"
        )


def dp_noise_needs_clipping(v: Any) -> None:
    if v.dp_noise > 0 and v.dp_clip == 0:
        raise ConfigError(
            f"dp-noise={v.dp_noise} needs dp-clip > 0 (the clipping norm the noise is "
            f"scaled to); accepted: dp-noise=0 or dp-clip > 0"
        )


def teacher_needs_labeled_data(v: Any) -> None:
    if v.server_share == 0 and v.teacher_epochs > 0:
        raise ConfigError(
            "server-share=0 leaves no labeled data to train the teacher; "
            "accepted: server-share in (0, 1) when teacher-epochs > 0"
        )


CHECKS: tuple[Check, ...] = (
    Check(("emulator-phase", "federated-emulator"), lazy_phases_need_local_emulators),
    Check(("query-selection", "emulator-phase", "fraction-train"), scored_selections_need_a_trained_student),
    Check(("emulator-pairing", "query-source"), pairing_needs_local_queries),
    Check(
        ("weight-synthetic", "emulator-pairing", "query-source", "federated-emulator"),
        synthetic_pairs_need_a_paired_emulator,
    ),
    Check(("oracle-top-k", "oracle-output"), top_k_needs_probabilities),
    Check(("dp-noise", "dp-clip"), dp_noise_needs_clipping),
    Check(("server-share", "teacher-epochs"), teacher_needs_labeled_data),
)
