"""One typed run configuration: defaults, merging from Flower run-config / CLI / YAML, validation.

Why one object: every knob has one name (kebab-case in Flower run-config and YAML, snake_case in
Python), one default, one validation and one row in the README table. The defaults here are the
single source of truth; `pyproject.toml`'s `[tool.flwr.app.config]` mirrors them and a test keeps
the two identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mekd_fl.errors import ConfigError
from strategies.protocol import SCORED_SELECTIONS

# A run name becomes a folder under out-dir: one path component, no leading dot, no separators. '=' is
# allowed because the bench names its cells `axis=label__axis=label`.
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
SEED_MAX = 2**32 - 1  # numpy's seeding limit

# The settings a client needs, in kebab-case (see `RunConfig.client_dict`).
CLIENT_SETTINGS: tuple[str, ...] = (
    "seed",
    "run-name",
    "device",
    "precision",
    "dataset",
    "oracle-output",
    "emulator-steps",
    "emulator-batch-size",
    "emulator-lr",
    "emulator-width",
    "emulator",
    "wgan-n-critic",
    "wgan-gp-lambda",
    "infogan-weight",
    "emulator-fid",
    "emulator-pairing-lr",
    "emulator-pairing-weight",
    "query-source",
    "query-views",
    "query-fraction",
    "query-selection",
    "method",
    "student-arch",
    "num-rounds",
    "local-epochs",
    "batch-size",
    "lr",
    "momentum",
    "weight-decay",
    "distance",
    "temperature",
    "emulator-input",
    "weight-emulation",
    "weight-kl",
    "dkd-alpha",
    "dkd-beta",
    "dkd-warmup",
    "cdl-weight",
    "cdl-margin",
    "can-weight",
    "can-lr",
)

# The distillation methods: the names `mekd_fl/distill/` registers (tests/test_config.py keeps the two equal).
# Listed here rather than asked of the registry so that this module imports no method: the methods take
# their defaults from RunConfig, and RunConfig is the one place defaults live.
METHODS: tuple[str, ...] = ("can", "cdl", "dkd", "kd", "mekd", "supervised")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its README help text and accepted values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Field order is the order of the README table."""

    # --- run ---
    seed: int = _opt(42, "Seed for partitions, initialisation, sampling and training.")
    run_name: str = _opt("", "Name of the result folder under `out-dir` (empty: timestamp + method).")
    out_dir: str = _opt("runs", "Where result folders are written.")
    cache_dir: str = _opt("", "Teacher checkpoint cache (empty: `$MEKD_FL_CACHE` or `~/.cache/mekd-fl`).")
    device: str = _opt(
        "auto", "Torch device for server and clients: auto (cuda when present), cpu, cuda.", ("auto", "cpu", "cuda")
    )
    precision: str = _opt(
        "fp32",
        "Clients' arithmetic for the student's and the emulator's training: fp32, or bf16 (autocast: "
        "matrix products and convolutions in bfloat16, losses, weights and G(T(x)) targets in float32). "
        "bf16 is for GPUs with bfloat16 units (A100, H100); on most CPUs it is slower.",
        ("fp32", "bf16"),
    )
    # --- data ---
    dataset: str = _opt("fashion-mnist", "Data set.", ("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic"))
    data_dir: str = _opt(
        "",
        "Folder with the data set files (empty: Debian location for Fashion-MNIST, "
        "else `$MEKD_FL_DATA` or `~/.cache/mekd-fl/data`).",
    )
    download: bool = _opt(False, "Download the data set with torchvision when the files are missing (needs internet).")
    num_clients: int = _opt(10, "Number of simulated edge clients (SuperNodes).")
    partition: str = _opt(
        "dirichlet", "How the clients' share is split.", ("iid", "dirichlet", "pathological", "shard")
    )
    alpha: float = _opt(0.5, "Dirichlet concentration (smaller = more skewed); partition=dirichlet.")
    min_partition_size: int = _opt(
        10,
        "Fewest images a client may get, capped at half the average client share (and at least 1); "
        "a Dirichlet draw leaving a client with fewer is redrawn; partition=dirichlet.",
    )
    partition_retries: int = _opt(
        10,
        "Redraws allowed when a Dirichlet draw misses min-partition-size (0: one draw only); the draws "
        "follow from the seed alone; partition=dirichlet.",
    )
    classes_per_client: int = _opt(2, "Classes per client; partition=pathological.")
    shards_per_client: int = _opt(
        2,
        "Shards per client: the images are sorted by label and cut into num-clients x shards-per-client "
        "equal shards, dealt at random (FedAvg paper); partition=shard.",
    )
    server_share: float = _opt(0.5, "Fraction of the training set kept labeled on the server to train the teacher.")
    client_test_fraction: float = _opt(0.1, "Fraction of each client's images held out for federated evaluation.")
    client_data: str = _opt(
        "shard",
        "How a client finds its partition: shard (the server sends each node the image numbers of its "
        "partition; simulations) or node-config (each SuperNode cuts the partition its node-config "
        "`partition-id` / `num-partitions` names out of its own copy of the data files, by the split this "
        "run config defines; the server sends no shard; Deployment Engine, see `mekd-fl deploy-local`).",
        ("shard", "node-config"),
    )
    # --- teacher (server only) ---
    teacher_arch: str = _opt("resnet20", "Teacher architecture (CIFAR ResNet, depth 6n+2).")
    teacher_epochs: int = _opt(5, "Teacher training epochs on the server's labeled share.")
    teacher_lr: float = _opt(0.1, "Teacher SGD learning rate (x0.1 at 50% and 75% of the epochs).")
    teacher_batch_size: int = _opt(128, "Teacher training batch size.")
    oracle_output: str = _opt("probs", "What the oracle answers: probs (softmax) or logits.", ("probs", "logits"))
    oracle_top_k: int = _opt(
        0,
        "The oracle answers only the k largest probabilities, renormalised to sum to 1 "
        "(0: all classes); needs oracle-output=probs.",
    )
    oracle_decimals: int = _opt(-1, "Round the oracle's answers to this many decimals (-1: off).")
    query_budget: int = _opt(100000, "Most teacher queries (images) one client may send in a run.")
    oracle_batch_size: int = _opt(1024, "Batch size of the oracle's teacher forward passes.")
    answer_cache: bool = _opt(
        True,
        "Keep the teacher's answers on disk beside its checkpoint, so a run that sends "
        "the same queries to the same teacher (another method of a sweep) skips the "
        "forward passes; budgets are counted all the same.",
    )
    # --- emulator (clients) ---
    emulator_steps: int = _opt(200, "Generator updates of each client's emulator GAN.")
    emulator_batch_size: int = _opt(64, "Emulator GAN batch size.")
    emulator_lr: float = _opt(
        2e-4, "Emulator Adam learning rate (betas 0.5, 0.999 for dcgan and infogan; 0.5, 0.9 for wgan-gp)."
    )
    emulator_width: int = _opt(16, "Emulator channel width (generator and discriminator).")
    emulator: str = _opt(
        "dcgan",
        "Emulator GAN: dcgan, wgan-gp (critic without BatchNorm, gradient penalty) "
        "or infogan (Q head recovering the C-dim input).",
        ("dcgan", "wgan-gp", "infogan"),
    )
    wgan_n_critic: int = _opt(5, "WGAN-GP critic steps per generator step.")
    wgan_gp_lambda: float = _opt(10.0, "WGAN-GP gradient-penalty weight lambda.")
    infogan_weight: float = _opt(1.0, "InfoGAN weight of the Q head's code-reconstruction loss.")
    emulator_fid: bool = _opt(
        True,
        "Measure each emulator's domain FID against the client's images, on the client, "
        "in the features of a fixed, data-independent network (nothing is sent for it).",
    )
    federated_emulator: bool = _opt(
        False,
        "Average generators and discriminators across clients during the emulator phase instead of keeping each local.",
    )
    emulator_rounds: int = _opt(
        4, "Averaging rounds of the emulator phase when federated-emulator=true (emulator-steps are split across them)."
    )
    emulator_phase: str = _opt(
        "upfront",
        "When a client trains its emulator and queries the teacher: upfront (every client before round 1, the "
        "paper's protocol) or lazy (the first time it is sampled: a run's cost follows the clients that take "
        "part, for large populations; not with federated-emulator).",
        ("upfront", "lazy"),
    )
    emulator_pairing: str = _opt(
        "none",
        "How the emulator learns: none (the paper's unconditional GAN on z ~ N(0, I_C)) or paired (queries "
        "first, then G is trained on the client's own (T(x), x) pairs: a reconstruction term plus the GAN "
        "term, so that G inverts the teacher); paired needs query-source=local.",
        ("none", "paired"),
    )
    emulator_pairing_lr: float = _opt(
        1e-3,
        "Emulator Adam learning rate when emulator-pairing=paired (replaces emulator-lr): the reconstruction "
        "converges at Adam's usual rate, not at a GAN's.",
    )
    emulator_pairing_weight: float = _opt(
        100.0,
        "Weight of the L1 reconstruction term of G(T(x)) against x, beside the GAN term; emulator-pairing=paired.",
    )
    query_source: str = _opt(
        "local",
        "What clients send to the teacher: local (their own images, the paper), "
        "generated (emulator samples G(z): data-free) or mixed (half each).",
        ("local", "generated", "mixed"),
    )
    query_views: int = _opt(
        1, "Augmented views sent per local image (1: the image itself); all count against the query budget."
    )
    query_fraction: float = _opt(
        1.0,
        "Share of its query pool a client sends, in (0, 1]: round(query-fraction x local images x "
        "query-views) images, capped by query-budget (the x axis of the query-efficiency curve). The count "
        "is the same for every query-source: generated sends that many emulator samples, mixed half each.",
    )
    query_selection: str = _opt(
        "random",
        "Which images of the pool a client spends its queries on: random (a seeded random subset) or "
        "kcenter (greedy k-center coverage of the pool in the features of the fixed, data-independent "
        "domain-FID network: with a small budget it covers rare modes a random subset misses; reads no "
        "label and no answer, spends no query), or uncertainty (the images the current global student is "
        "least sure of, by the entropy of its softmax; the server sends the student with the query "
        "message; needs emulator-phase=lazy and fraction-train < 1, and the first cohort, which has no "
        "trained student yet, chooses at random), or hybrid (half the budget as uncertainty, the other "
        "half a random subset of the rest, so the query set stays representative; same needs). With "
        "generated samples kcenter, uncertainty and hybrid pick from as many samples as the pool holds.",
        ("random", "kcenter", "uncertainty", "hybrid"),
    )
    # --- distillation (clients) ---
    method: str = _opt(
        "mekd",
        "Distillation method, from the registry in `mekd_fl/distill/`: mekd, kd, dkd, cdl, "
        "can, or supervised (true labels: an upper bound that breaks the source-blind rule).",
    )
    student_arch: str = _opt("resnet8", "Student architecture (CIFAR ResNet, depth 6n+2).")
    num_rounds: int = _opt(8, "Federated distillation rounds.")
    local_epochs: int = _opt(2, "Local distillation epochs per round.")
    batch_size: int = _opt(64, "Distillation batch size.")
    lr: float = _opt(0.05, "Student SGD learning rate (cosine-decayed over the rounds).")
    momentum: float = _opt(0.9, "Student SGD momentum.")
    weight_decay: float = _opt(5e-4, "Student SGD weight decay.")
    distance: str = _opt("l1", "MEKD image distance d(G(S(x)), G(T(x))).", ("l1", "l2"))
    temperature: float = _opt(4.0, "KL temperature T (KL scaled by T^2).")
    emulator_input: str = _opt(
        "probs", "What G receives: probs (softmax at T=1) or logits (logits / T).", ("probs", "logits")
    )
    weight_emulation: float = _opt(1.0, "Weight of the emulation term d(G(S(x)), G(T(x))).")
    weight_kl: float = _opt(1.0, "Weight of the KL term.")
    fraction_train: float = _opt(1.0, "Fraction of clients sampled per distillation round.")
    fraction_evaluate: float = _opt(1.0, "Fraction of clients sampled for federated evaluation.")
    dkd_alpha: float = _opt(1.0, "DKD weight of the target-class term TCKD.")
    dkd_beta: float = _opt(8.0, "DKD weight of the non-target term NCKD.")
    dkd_warmup: float = _opt(20.0, "DKD linear warm-up length in local epochs (weight min(epoch / warmup, 1)).")
    cdl_weight: float = _opt(1.0, "CDL weight of the class-distance term (added to KD).")
    cdl_margin: float = _opt(0.5, "CDL margin between class centres of the student's outputs.")
    can_weight: float = _opt(1.0, "CAN weight of the student's adversarial term (added to KD).")
    can_lr: float = _opt(1e-4, "CAN discriminator Adam learning rate.")
    # --- aggregation and robustness (server) ---
    aggregation: str = _opt(
        "fedavg",
        "How the server combines the validated student updates; all but fedavg are "
        "Flower's robust strategies (FedTrimmedAvg, FedMedian, Krum, MultiKrum, "
        "Bulyan).",
        ("fedavg", "trimmed-mean", "median", "krum", "multikrum", "bulyan"),
    )
    trim_beta: float = _opt(
        0.2, "Fraction of the updates cut from each end, per coordinate, in [0, 0.5); aggregation=trimmed-mean."
    )
    num_malicious: int = _opt(0, "Attacking clients assumed by aggregation=krum, multikrum and bulyan.")
    dp_clip: float = _opt(
        0.0,
        "Central differential privacy: with a value > 0 the aggregation is wrapped in "
        "Flower's DifferentialPrivacyServerSideFixedClipping with this clipping norm "
        "(0: off).",
    )
    dp_noise: float = _opt(0.0, "Differential-privacy noise multiplier (needs dp-clip > 0 when > 0).")
    max_update_norm: float = _opt(
        0.0,
        "L2 bound on a client's update (its weights minus the global ones); "
        "longer updates are scaled down to it (0: off).",
    )
    norm_outlier_factor: float = _opt(
        2.0, "Updates longer than this factor times the round's median update length are scaled down to it (0: off)."
    )
    min_reply_fraction: float = _opt(
        0.5,
        "Fewest successful replies a phase or round accepts, as a fraction of "
        "the clients asked (always at least one); fewer ends the run with an "
        "error.",
    )
    reply_timeout: float = _opt(600.0, "Seconds the server waits for the replies of one phase or round.")
    # --- plots ---
    num_samples: int = _opt(8, "Images shown in the emulator-samples plot (G(T(x)) beside G(S(x))).")
    fidelity_images: int = _opt(
        256,
        "Query images of the first client on which the server measures the emulator's fidelity after the run "
        "(the teacher re-classifies G(T(x)); summary and reports only, never sent to a client; 0: off).",
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        """All setting names in kebab-case, in table order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, validate: bool = True) -> RunConfig:
        """Build from kebab- or snake-case keys (Flower run-config, YAML, CLI) over the defaults.

        Unknown keys are an error rather than ignored: a typo must not silently run the default.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown setting '{raw_key}'; accepted: {', '.join(cls.keys())}")
            kwargs[key] = _coerce(raw_key, value, known[key].default)
        cfg = cls(**kwargs)
        if validate:
            cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, the form written to `config.json` and sent to clients."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def client_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of only the settings in `CLIENT_SETTINGS`: what a client is sent.

        Why an allow-list: a client is not trusted with the server's side of a run. It never receives
        the teacher's settings (teacher-*), the size of the server's labeled share (server-share), server
        paths (cache-dir, out-dir, data-dir), partition settings (its partition arrives as its own
        shard), budgets (query-budget: the server counts them) or the robustness and privacy settings
        of the aggregation. A new setting stays on the server until it is added here on purpose.
        """
        values = self.to_dict()
        return {key: values[key] for key in CLIENT_SETTINGS}

    # ------------------------------------------------------------------ validation
    def validate(self, client: bool = False) -> None:
        """Reject bad settings with one line naming the setting and what is accepted.

        `client=True` (an edge device checking the settings it was sent) skips the checks of combinations
        with server settings a client is never sent (emulator-phase, fraction-train).

        Only cheap checks live here (no data decoding) so a run fails in well under a second; the
        checks that need the machine (device, writable folders) are in `mekd_fl.preflight`.
        """
        for f in dataclasses.fields(self):
            _check_type(f.name.replace("_", "-"), getattr(self, f.name), f.default)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{f.name.replace('_', '-')}={value!r} is not accepted; accepted: {', '.join(choices)}"
                )
        positive_ints = (
            "num_clients",
            "num_rounds",
            "local_epochs",
            "batch_size",
            "teacher_batch_size",
            "emulator_batch_size",
            "emulator_width",
            "oracle_batch_size",
            "query_budget",
            "wgan_n_critic",
            "emulator_rounds",
            "query_views",
            "classes_per_client",
            "shards_per_client",
            "min_partition_size",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be an integer >= 1")
        for name in (
            "teacher_epochs",
            "emulator_steps",
            "num_samples",
            "fidelity_images",
            "num_malicious",
            "oracle_top_k",
            "partition_retries",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be an integer >= 0")
        if self.emulator_phase == "lazy" and self.federated_emulator:
            raise ConfigError(
                "emulator-phase=lazy is not accepted with federated-emulator=true (averaging emulators needs "
                "every client at once); accepted: emulator-phase=upfront, or federated-emulator=false"
            )
        if (
            not client
            and self.query_selection in SCORED_SELECTIONS
            and (self.emulator_phase != "lazy" or self.fraction_train >= 1)
        ):
            raise ConfigError(
                f"query-selection={self.query_selection} is not accepted with "
                + ("emulator-phase=upfront" if self.emulator_phase != "lazy" else "fraction-train=1")
                + " (every client would query before any round has trained the student that scores its "
                "images); accepted: emulator-phase=lazy with fraction-train < 1, or query-selection=random "
                "or kcenter"
            )
        if self.emulator_pairing == "paired" and self.query_source != "local":
            raise ConfigError(
                f"emulator-pairing=paired is not accepted with query-source={self.query_source} (the pairs are "
                "the client's queries with their answers, sent before G exists); accepted: query-source=local, "
                "or emulator-pairing=none"
            )
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0 (Dirichlet concentration; e.g. 0.1 skewed, 100 ~ iid)")
        for name in (
            "lr",
            "teacher_lr",
            "emulator_lr",
            "temperature",
            "can_lr",
            "reply_timeout",
            "emulator_pairing_lr",
            "emulator_pairing_weight",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        for name in (
            "weight_emulation",
            "weight_kl",
            "weight_decay",
            "momentum",
            "wgan_gp_lambda",
            "infogan_weight",
            "dkd_alpha",
            "dkd_beta",
            "dkd_warmup",
            "cdl_weight",
            "cdl_margin",
            "can_weight",
            "dp_clip",
            "dp_noise",
            "max_update_norm",
            "norm_outlier_factor",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        for name in ("fraction_train", "fraction_evaluate", "query_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be in (0, 1]")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed={self.seed} must be an integer in [0, {SEED_MAX}]")
        if self.run_name and not RUN_NAME_PATTERN.match(self.run_name):
            raise ConfigError(
                f"run-name={self.run_name!r} is not accepted; accepted: empty, or 1 to 128 letters, "
                f"digits, '.', '_', '-', '=' starting with a letter or digit (one folder name)"
            )
        if self.oracle_decimals < -1:
            raise ConfigError(f"oracle-decimals={self.oracle_decimals} must be an integer >= -1 (-1: off)")
        if self.oracle_top_k > 0 and self.oracle_output != "probs":
            raise ConfigError(
                f"oracle-top-k={self.oracle_top_k} needs oracle-output=probs "
                f"(oracle-output={self.oracle_output}); accepted: oracle-top-k=0 with logits"
            )
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta={self.trim_beta} must be in [0, 0.5)")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise ConfigError(
                f"dp-noise={self.dp_noise} needs dp-clip > 0 (the clipping norm the noise is "
                f"scaled to); accepted: dp-noise=0 or dp-clip > 0"
            )
        if not 0 <= self.min_reply_fraction <= 1:
            raise ConfigError(f"min-reply-fraction={self.min_reply_fraction} must be in [0, 1]")
        if not 0 <= self.server_share < 1:
            raise ConfigError(f"server-share={self.server_share} must be in [0, 1)")
        if not 0 <= self.client_test_fraction < 1:
            raise ConfigError(f"client-test-fraction={self.client_test_fraction} must be in [0, 1)")
        if self.server_share == 0 and self.teacher_epochs > 0:
            raise ConfigError(
                "server-share=0 leaves no labeled data to train the teacher; "
                "accepted: server-share in (0, 1) when teacher-epochs > 0"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not accepted; accepted: {', '.join(METHODS)}")
        # Architectures are checked by the module that owns their list.
        from mekd_fl.models.resnet import parse_depth

        parse_depth(self.teacher_arch, setting="teacher-arch")
        parse_depth(self.student_arch, setting="student-arch")

    # ------------------------------------------------------------------ derived paths
    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("MEKD_FL_CACHE") or str(Path.home() / ".cache" / "mekd-fl")
        return Path(base).expanduser()


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Turn CLI/TOML/YAML values into the field's type, with a one-line error when impossible."""
    target = type(default)
    if target in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}; accepted: a number, not true/false")
    if target in (int, float) and not _finite_or_not_number(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if isinstance(value, target):
        return value
    try:
        if target is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}")


def _finite_or_not_number(value: Any) -> bool:
    """False only for a value that reads as an infinite or NaN number (float, or a string like 'inf')."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return True  # not a number at all: the type conversion reports it
    return math.isfinite(number)


def _check_type(key: str, value: Any, default: Any) -> None:
    """Refuse a value of the wrong type, also when a RunConfig was built directly rather than by from_mapping."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a valid bool; accepted: true, false")
    elif isinstance(default, (int, float)):
        integer = isinstance(default, int)
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise ConfigError(
                f"{key}={value!r} is not a valid {type(default).__name__}; accepted: {kind}, not true/false"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} is not a valid str")


def default_flower_config() -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table that pyproject.toml must hold (checked by a test)."""
    return RunConfig().to_dict()


def settings_table() -> str:
    """The README's configuration table, generated from the fields (`python -m mekd_fl.config`)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        default = json.dumps(f.default)
        rows.append(f"| `{f.name.replace('_', '-')}` | `{default}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
