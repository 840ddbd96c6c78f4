"""What the server does to a client's update before it can touch the global model.

Why a module of its own: every number a client sends is hostile until checked, and the same checks
guard the student (each round) and the federated emulator (each averaging round). Plain numpy, no
Flower, so each check is tested on its own.

An update is checked *after* conversion to the global model's dtypes (a float64 1e40 becomes inf in
float32 and is refused), its keys, shapes and dtype kinds must equal the reference, BatchNorm
statistics must be possible (running_var >= 0, num_batches_tracked >= 0), and its distance from the
reference can be bounded (absolute `max_norm`, and `outlier_factor` times the round's median).
Integer entries (BatchNorm's num_batches_tracked) are bounded so that they survive averaging: an
aggregator averages them in float64 and casts back, so a value float64 cannot hold exactly (beyond
2**52) could come back as another number, and 2**63-1 comes back as -2**63. Weights (`num-examples`)
are capped by what the server knows about the client; metrics are finite scalars within their known range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]

# Kinds a reference dtype accepts: floats only from floats, integers only from integers.
_ACCEPTED_KINDS = {"f": "f", "i": "iu", "u": "iu", "b": "b"}

#: Largest magnitude of an integer entry: every integer up to 2**53 is exact in float64, and a
#: weighted mean of values within +-2**52 stays within it, so the cast back to int64 cannot wrap.
MAX_INT_ENTRY = 2**52
#: Largest change of an integer entry against the reference in one update. num_batches_tracked grows by
#: one per local step; no round takes 2**31 steps, and the bound is far from any honest count.
MAX_INT_STEP = 2**31
#: How far below 0 a loss may be reported: a KL divergence of two equal distributions computed in
#: float32 can come out a rounding error below zero.
LOSS_TOLERANCE = 1e-6


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
        if cast.dtype.kind in "iu" and cast.size:
            why = _integer_bounds(key, cast, ref)
            if why:
                return None, why
        clean[key] = cast
    return clean, None


def _integer_bounds(key: str, value: np.ndarray, ref: np.ndarray) -> str | None:
    """Why an integer entry cannot be averaged safely (None when it can): beyond +-MAX_INT_ENTRY, or
    more than MAX_INT_STEP away from the reference (a counter cannot jump by billions in a round)."""
    if value.max() > MAX_INT_ENTRY or (value.dtype.kind == "i" and value.min() < -MAX_INT_ENTRY):
        return f"'{key}' is beyond +-2**52 (an integer that float64 averaging cannot hold exactly)"
    if ref.dtype.kind in "iu" and ref.size:
        step = np.abs(value.astype(np.float64) - ref.astype(np.float64))
        if step.max() > MAX_INT_STEP:
            return f"'{key}' moved by {step.max():.0f} from the global model, more than 2**31"
    return None


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


def norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the floating-point entries (computed in float64)."""
    total = 0.0
    for value in update.values():
        if value.dtype.kind == "f":
            flat = value.astype(np.float64).ravel()
            total += float(np.dot(flat, flat))
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
    """Finite scalar metrics only (lists, strings, bools, NaN are dropped), at most `limit` of them.

    Lenient, for metrics that are only shown (emulator losses); metrics that are averaged into the
    run's results go through `check_metrics`, which refuses instead of dropping."""
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


def metric_range(key: str) -> tuple[float, float] | None:
    """The range a metric must lie in, by the last part of its name, or None when it is not known:
    accuracy and agreement are fractions, losses are not negative (within LOSS_TOLERANCE)."""
    name = key.rsplit("-", 1)[-1]
    if name in ("accuracy", "agreement"):
        return 0.0, 1.0
    if name == "loss":
        return -LOSS_TOLERANCE, math.inf
    return None


def check_metrics(
    values: Mapping[str, object], limit: int, ignored: tuple[str, ...] = ()
) -> tuple[dict[str, float | int], str | None]:
    """Metrics that may be averaged into a round's results, or ({}, why they are refused).

    Every value must be a finite int or float, within `metric_range` when its range is known, and there
    may be at most `limit` of them. Refused, not dropped: dropping one client's key would drop it from the
    whole round (the round keeps only the metrics all replies share). `ignored` keys (a label the server
    never reads) are left out unchecked."""
    if len(values) > limit:
        return {}, f"{len(values)} metrics, more than {limit}"
    out: dict[str, float | int] = {}
    for key, value in values.items():
        key = str(key)
        if key in ignored:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return {}, f"metric '{key}' is {short_repr(value)}, not a number"
        if not math.isfinite(value):
            return {}, f"metric '{key}' is {value!r}, not finite"
        bounds = metric_range(key)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            return {}, f"metric '{key}'={value!r} is outside [{max(bounds[0], 0):g}, {bounds[1]:g}]"
        out[key] = value
    return out, None


def short_repr(value: object, limit: int = 40) -> str:
    """A value's repr, cut to `limit` characters (a client's list can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
