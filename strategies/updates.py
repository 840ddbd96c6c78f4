"""What the server does to a client's update before it can touch the global model.

Why a module of its own: every number a client sends is hostile until checked, and the same checks
guard the student (each round) and the federated emulator (each averaging round). Plain numpy, no
Flower, so each check is tested on its own.

An update is checked *after* conversion to the global model's dtypes (a float64 1e40 becomes inf in
float32 and is refused), its keys, shapes and dtype kinds must equal the reference, BatchNorm
statistics must be possible (running_var >= 0, num_batches_tracked >= 0), and its distance from the
reference can be bounded (absolute `max_norm`, and `outlier_factor` times the round's median).
Weights (`num-examples`) are capped by what the server knows about the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]

# Kinds a reference dtype accepts: floats only from floats, integers only from integers.
_ACCEPTED_KINDS = {"f": "f", "i": "iu", "u": "iu", "b": "b"}


def sanitize(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> tuple[Arrays | None, str | None]:
    """The update converted to the reference's dtypes, or (None, why it is refused)."""
    expected, got = set(reference), set(arrays)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        return None, f"keys differ from the global model (missing {missing}, unexpected {extra})"
    clean: Arrays = {}
    for key, ref in reference.items():
        value = np.asarray(arrays[key])
        ref = np.asarray(ref)
        if value.shape != ref.shape:
            return None, f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype.kind not in _ACCEPTED_KINDS.get(ref.dtype.kind, ""):
            return None, f"'{key}' has dtype {value.dtype}, expected {ref.dtype}"
        with np.errstate(over="ignore", invalid="ignore"):
            if ref.dtype.kind in "iu" and value.dtype.kind in "iu":
                info = np.iinfo(ref.dtype)
                if value.size and (value.min() < info.min or value.max() > info.max):
                    return None, f"'{key}' does not fit {ref.dtype}"
            cast = value.astype(ref.dtype)
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():
            return None, f"'{key}' contains NaN or inf (in {ref.dtype})"
        if key.endswith("running_var") and cast.size and cast.min() < 0:
            return None, f"'{key}' is negative (a variance)"
        if key.endswith("num_batches_tracked") and cast.size and cast.min() < 0:
            return None, f"'{key}' is negative (a counter)"
        clean[key] = cast
    return clean, None


def like_reference(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Arrays:
    """An aggregate in the reference's dtypes: an average of integer counters (BatchNorm's
    num_batches_tracked) comes back as a float from most aggregators and is rounded back here."""
    out: Arrays = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        ref = reference.get(key)
        if ref is not None and np.asarray(ref).dtype.kind in "iu" and value.dtype.kind == "f":
            if np.isfinite(value).all():
                value = np.asarray(np.rint(value)).astype(np.asarray(ref).dtype)
        out[key] = np.asarray(value)
    return out


def distance(update: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - center) over the floating-point entries (computed in float64)."""
    total = 0.0
    for key, value in update.items():
        if value.dtype.kind == "f":
            diff = value.astype(np.float64) - np.asarray(center[key], dtype=np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def scale_towards(update: Arrays, center: Mapping[str, np.ndarray], factor: float) -> Arrays:
    """center + factor * (update - center) for floating-point entries; others unchanged."""
    out: Arrays = {}
    for key, value in update.items():
        if value.dtype.kind == "f":
            c = np.asarray(center[key], dtype=np.float64)
            out[key] = np.asarray(c + factor * (value.astype(np.float64) - c)).astype(value.dtype)
        else:
            out[key] = value
    return out


def median_center(updates: list[Arrays]) -> Arrays:
    """Coordinate-wise median of the updates (the center when there is no global model yet)."""
    return {
        k: np.asarray(np.median(np.stack([u[k] for u in updates]), axis=0)).astype(updates[0][k].dtype)
        for k in updates[0]
    }


def bound_norms(
    updates: list[Arrays],
    center: Mapping[str, np.ndarray] | None,
    *,
    max_norm: float = 0.0,
    outlier_factor: float = 0.0,
    norms: list[float] | None = None,
) -> tuple[list[Arrays], list[tuple[int, float, float]]]:
    """Scale updates whose distance from `center` exceeds the bound down onto it.

    The bound is `max_norm` (absolute, 0 = off) and/or `outlier_factor` times the lower median of the
    round's distances (0 = off); the lower median, so that with two clients an attacker cannot lift
    the bound by its own length. Returns the bounded updates and (index, norm, bound) of each scaled one.
    `norms`: the updates' distances from `center` when the caller has them already.
    """
    if not updates or (max_norm <= 0 and outlier_factor <= 0):
        return updates, []
    center = center if center is not None else median_center(updates)
    norms = norms if norms is not None and len(norms) == len(updates) else [distance(u, center) for u in updates]
    bounds = []
    if max_norm > 0:
        bounds.append(max_norm)
    if outlier_factor > 0 and len(updates) >= 2:
        lower_median = sorted(norms)[(len(norms) - 1) // 2]
        if lower_median > 0:
            bounds.append(outlier_factor * lower_median)
    if not bounds:
        return updates, []
    bound = min(bounds)
    out, scaled = [], []
    for i, (update, norm) in enumerate(zip(updates, norms)):
        if norm > bound:
            out.append(scale_towards(update, center, bound / norm))
            scaled.append((i, norm, bound))
        else:
            out.append(update)
    return out, scaled


def example_weight(value: object, cap: float | None) -> tuple[float | None, str | None]:
    """A reported `num-examples` as a weight capped at what the server knows, or (None, why refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"is {value!r}, not a positive number"
    if not math.isfinite(value) or value <= 0:
        return None, f"is {value!r}, not a positive number"
    weight = float(value)
    if cap is not None:
        weight = min(weight, float(cap))
    return weight, None


def clean_metrics(values: Mapping[str, object], limit: int) -> dict[str, float | int]:
    """Finite scalar metrics only (lists, strings, bools, NaN are dropped), at most `limit` of them."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if len(out) >= limit:
            break
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[str(key)] = value
    return out
