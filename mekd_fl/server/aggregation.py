"""The `aggregation` setting: which of Flower's own strategies combines the checked student updates.

Why Flower's and not ours: FedTrimmedAvg, FedMedian, Krum, MultiKrum, Bulyan and the DP clipping
wrappers are maintained and reviewed upstream; `strategies.MEKD` checks, bounds and weighs each update
first, then hands the survivors to the strategy built here (and lets it build the round's messages
for the cohort MEKD sampled, so the inner strategy always runs with fraction 1).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError

AGGREGATIONS = ("fedavg", "trimmed-mean", "median", "krum", "multikrum", "bulyan")


def cohort_size(cfg: RunConfig) -> int:
    """Clients sampled per round (as MEKD samples them: at least one)."""
    return min(cfg.num_clients, max(int(cfg.num_clients * cfg.fraction_train), 1))


def build_aggregation(cfg: RunConfig) -> Strategy:
    """The inner strategy for `cfg.aggregation`, wrapped in server-side DP clipping when dp-clip > 0."""
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1
    )
    n, f = cohort_size(cfg), cfg.num_malicious
    kind = cfg.aggregation
    if kind == "fedavg":
        inner: Strategy = FedAvg(**common)
    elif kind == "trimmed-mean":
        inner = FedTrimmedAvg(**common, beta=cfg.trim_beta)
    elif kind == "median":
        inner = FedMedian(**common)
    elif kind in ("krum", "multikrum"):
        if n < 2 * f + 3:
            raise ConfigError(
                f"aggregation={kind} with num-malicious={f} needs at least {2 * f + 3} clients per "
                f"round (Krum's n >= 2f + 3) but the cohort has {n}; accepted: num-malicious <= "
                f"{max((n - 3) // 2, 0)}, or more clients per round"
            )
        inner = (
            Krum(**common, num_malicious_nodes=f)
            if kind == "krum"
            else MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=max(1, n - f))
        )
    elif kind == "bulyan":
        if n < 4 * f + 3:
            raise ConfigError(
                f"aggregation=bulyan with num-malicious={f} needs at least {4 * f + 3} clients per "
                f"round (Bulyan's n >= 4f + 3) but the cohort has {n}; accepted: num-malicious <= "
                f"{max((n - 3) // 4, 0)}, or more clients per round"
            )
        inner = Bulyan(**common, num_malicious_nodes=f)
    else:
        raise ConfigError(f"aggregation={kind!r} is not accepted; accepted: {', '.join(AGGREGATIONS)}")
    if cfg.dp_clip > 0:
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, noise_multiplier=cfg.dp_noise, clipping_norm=cfg.dp_clip, num_sampled_clients=n
        )
    return inner
