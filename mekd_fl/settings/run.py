"""The run's own settings, each declared once, in the order of the configuration table.

The distillation methods' hyperparameters are not here: each method declares its own in its file
(`mekd_fl/distill/<method>.py`) and `mekd_fl.config.all_settings` puts them after `fraction-evaluate`.
Who receives a setting is its audience: SERVER settings never leave the server (teacher, budgets, paths,
partitioning, aggregation); CLIENT and BOTH ones are sent to every client.
"""

from __future__ import annotations

import re
from typing import Any

from mekd_fl.errors import ConfigError
from mekd_fl.settings.methods import method_names
from mekd_fl.settings.schema import Setting

SERVER, CLIENT, BOTH = "server", "client", "both"

# A run name becomes a folder under out-dir: one path component, no leading dot, no separators. '=' is
# allowed because the bench names its cells `axis=label__axis=label`.
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
SEED_MAX = 2**32 - 1  # numpy's seeding limit

#: The query selections that score a client's images with the current global student: the server sends
#: the student with the query message, so they need clients that query after a round has trained it.
#: Declared beside `query-selection` (Flower-free); `mekd_fl.queries` and the server read it from here.
SCORED_SELECTIONS: tuple[str, ...] = ("uncertainty", "hybrid")


def _folder_name(setting: Setting, value: Any) -> None:
    if value and not RUN_NAME_PATTERN.match(value):
        raise ConfigError(
            f"{setting.name}={value!r} is not accepted; accepted: empty, or 1 to 128 letters, "
            f"digits, '.', '_', '-', '=' starting with a letter or digit (one folder name)"
        )


def _architecture(setting: Setting, value: Any) -> None:
    """Architectures are checked by the module that owns their list (imported here, when a run is checked)."""
    from mekd_fl.models.resnet import parse_depth

    parse_depth(value, setting=setting.name)


RUN_SETTINGS: tuple[Setting, ...] = (
    # --- run ---
    Setting("seed", 42, "Seed for partitions, initialisation, sampling and training.", BOTH, within=f"[0, {SEED_MAX}]"),
    Setting(
        "run-name",
        "",
        "Name of the result folder under `out-dir` (empty: timestamp + method).",
        BOTH,
        rule=_folder_name,
        edge=False,
    ),
    Setting("out-dir", "runs", "Where result folders are written.", SERVER),
    Setting("cache-dir", "", "Teacher checkpoint cache (empty: `$MEKD_FL_CACHE` or `~/.cache/mekd-fl`).", SERVER),
    Setting(
        "device",
        "auto",
        "Torch device for server and clients: auto (cuda when present), cpu, cuda.",
        BOTH,
        choices=("auto", "cpu", "cuda"),
    ),
    Setting(
        "precision",
        "fp32",
        "Clients' arithmetic for the student's and the emulator's training: fp32, or bf16 (autocast: "
        "matrix products and convolutions in bfloat16, losses, weights and G(T(x)) targets in float32). "
        "bf16 is for GPUs with bfloat16 units (A100, H100); on most CPUs it is slower.",
        CLIENT,
        choices=("fp32", "bf16"),
    ),
    # --- data ---
    Setting(
        "dataset",
        "fashion-mnist",
        "Data set.",
        BOTH,
        choices=("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic"),
        edge=False,
    ),
    Setting(
        "data-dir",
        "",
        "Folder with the data set files (empty: Debian location for Fashion-MNIST, "
        "else `$MEKD_FL_DATA` or `~/.cache/mekd-fl/data`).",
        SERVER,
    ),
    Setting(
        "download", False, "Download the data set with torchvision when the files are missing (needs internet).", SERVER
    ),
    Setting("num-clients", 10, "Number of simulated edge clients (SuperNodes).", SERVER, within=">= 1"),
    Setting(
        "partition",
        "dirichlet",
        "How the clients' share is split.",
        SERVER,
        choices=("iid", "dirichlet", "pathological", "shard"),
    ),
    Setting(
        "alpha",
        0.5,
        "Dirichlet concentration (smaller = more skewed); partition=dirichlet.",
        SERVER,
        within="> 0",
        note="(Dirichlet concentration; e.g. 0.1 skewed, 100 ~ iid)",
    ),
    Setting(
        "min-partition-size",
        10,
        "Fewest images a client may get, capped at half the average client share (and at least 1); "
        "a Dirichlet draw leaving a client with fewer is redrawn; partition=dirichlet.",
        SERVER,
        within=">= 1",
    ),
    Setting(
        "partition-retries",
        10,
        "Redraws allowed when a Dirichlet draw misses min-partition-size (0: one draw only); the draws "
        "follow from the seed alone; partition=dirichlet.",
        SERVER,
        within=">= 0",
    ),
    Setting("classes-per-client", 2, "Classes per client; partition=pathological.", SERVER, within=">= 1"),
    Setting(
        "shards-per-client",
        2,
        "Shards per client: the images are sorted by label and cut into num-clients x shards-per-client "
        "equal shards, dealt at random (FedAvg paper); partition=shard.",
        SERVER,
        within=">= 1",
    ),
    Setting(
        "server-share",
        0.5,
        "Fraction of the training set kept labeled on the server to train the teacher.",
        SERVER,
        within="[0, 1)",
    ),
    Setting(
        "client-test-fraction",
        0.1,
        "Fraction of each client's images held out for federated evaluation.",
        SERVER,
        within="[0, 1)",
    ),
    Setting(
        "client-data",
        "shard",
        "How a client finds its partition: shard (the server sends each node the image numbers of its "
        "partition; simulations) or node-config (each SuperNode cuts the partition its node-config "
        "`partition-id` / `num-partitions` names out of its own copy of the data files, by the split this "
        "run config defines; the server sends no shard; Deployment Engine, see `mekd-fl deploy-local`).",
        SERVER,
        choices=("shard", "node-config"),
    ),
    # --- teacher (server only) ---
    Setting("teacher-arch", "resnet20", "Teacher architecture (CIFAR ResNet, depth 6n+2).", SERVER, rule=_architecture),
    Setting("teacher-epochs", 5, "Teacher training epochs on the server's labeled share.", SERVER, within=">= 0"),
    Setting("teacher-lr", 0.1, "Teacher SGD learning rate (x0.1 at 50% and 75% of the epochs).", SERVER, within="> 0"),
    Setting("teacher-batch-size", 128, "Teacher training batch size.", SERVER, within=">= 1"),
    Setting(
        "oracle-output",
        "probs",
        "What the oracle answers: probs (softmax) or logits.",
        BOTH,
        choices=("probs", "logits"),
        distill=True,
    ),
    Setting(
        "oracle-top-k",
        0,
        "The oracle answers only the k largest probabilities, renormalised to sum to 1 "
        "(0: all classes); needs oracle-output=probs.",
        SERVER,
        within=">= 0",
    ),
    Setting(
        "oracle-decimals",
        -1,
        "Round the oracle's answers to this many decimals (-1: off).",
        SERVER,
        within=">= -1",
        note="(-1: off)",
    ),
    Setting(
        "query-budget", 100000, "Most teacher queries (images) one client may send in a run.", SERVER, within=">= 1"
    ),
    Setting("oracle-batch-size", 1024, "Batch size of the oracle's teacher forward passes.", SERVER, within=">= 1"),
    Setting(
        "answer-cache",
        True,
        "Keep the teacher's answers on disk beside its checkpoint, so a run that sends "
        "the same queries to the same teacher (another method of a sweep) skips the "
        "forward passes; budgets are counted all the same.",
        SERVER,
    ),
    # --- emulator (clients) ---
    Setting("emulator-steps", 150, "Generator updates of each client's emulator.", BOTH, within=">= 0"),
    Setting("emulator-batch-size", 32, "Emulator batch size.", CLIENT, within=">= 1"),
    Setting(
        "emulator-lr",
        2e-4,
        "Emulator Adam learning rate (betas 0.5, 0.999 for dcgan and infogan; 0.5, 0.9 for wgan-gp).",
        CLIENT,
        within="> 0",
    ),
    Setting("emulator-width", 8, "Emulator channel width (generator and discriminator).", BOTH, within=">= 1"),
    Setting(
        "emulator",
        "dcgan",
        "Emulator GAN: dcgan, wgan-gp (critic without BatchNorm, gradient penalty) "
        "or infogan (Q head recovering the C-dim input).",
        BOTH,
        choices=("dcgan", "wgan-gp", "infogan"),
    ),
    Setting("wgan-n-critic", 5, "WGAN-GP critic steps per generator step.", CLIENT, within=">= 1"),
    Setting("wgan-gp-lambda", 10.0, "WGAN-GP gradient-penalty weight lambda.", CLIENT, within=">= 0"),
    Setting("infogan-weight", 1.0, "InfoGAN weight of the Q head's code-reconstruction loss.", CLIENT, within=">= 0"),
    Setting(
        "emulator-fid",
        True,
        "Measure each emulator's domain FID against the client's images, on the client, "
        "in the features of a fixed, data-independent network (nothing is sent for it).",
        BOTH,
        edge=False,
    ),
    Setting(
        "federated-emulator",
        False,
        "Average generators and discriminators across clients during the emulator phase instead of keeping each local.",
        SERVER,
    ),
    Setting(
        "emulator-rounds",
        4,
        "Averaging rounds of the emulator phase when federated-emulator=true (emulator-steps are split across them).",
        SERVER,
        within=">= 1",
    ),
    Setting(
        "emulator-phase",
        "upfront",
        "When a client trains its emulator and queries the teacher: upfront (every client before round 1, the "
        "paper's protocol) or lazy (the first time it is sampled: a run's cost follows the clients that take "
        "part, for large populations; not with federated-emulator).",
        SERVER,
        choices=("upfront", "lazy"),
    ),
    Setting(
        "emulator-pairing",
        "auto",
        "How the emulator learns: none (the paper's unconditional GAN on z ~ N(0, I_C)), paired (queries "
        "first, then G is fitted to the client's own (T(x), x) pairs, so that G inverts the teacher; needs "
        "query-source=local) or auto (paired with query-source=local and federated-emulator=false, else none).",
        SERVER,
        choices=("auto", "none", "paired"),
    ),
    Setting(
        "emulator-pairing-gan",
        False,
        "Paired emulator: also train G against a discriminator (the GAN term beside the L1 reconstruction); "
        "false fits G by the reconstruction alone, with no discriminator: cheaper per step and steadier.",
        CLIENT,
    ),
    Setting(
        "emulator-pairing-lr",
        3e-3,
        "Emulator Adam learning rate when emulator-pairing=paired (replaces emulator-lr): the reconstruction "
        "converges at Adam's usual rate, not at a GAN's.",
        CLIENT,
        within="> 0",
    ),
    Setting(
        "emulator-pairing-weight",
        100.0,
        "Weight of the L1 reconstruction term of G(T(x)) against x (paired emulator); with emulator-pairing-gan=true, "
        "its weight against the GAN term.",
        CLIENT,
        within="> 0",
    ),
    Setting(
        "query-source",
        "local",
        "What clients send to the teacher: local (their own images, the paper), "
        "generated (emulator samples G(z): data-free) or mixed (half each).",
        BOTH,
        choices=("local", "generated", "mixed"),
    ),
    Setting(
        "query-views",
        1,
        "Augmented views sent per local image (1: the image itself); all count against the query budget.",
        BOTH,
        within=">= 1",
    ),
    Setting(
        "query-fraction",
        1.0,
        "Share of its query pool a client sends, in (0, 1]: round(query-fraction x local images x "
        "query-views) images, capped by query-budget (the x axis of the query-efficiency curve). The count "
        "is the same for every query-source: generated sends that many emulator samples, mixed half each.",
        BOTH,
        within="(0, 1]",
    ),
    Setting(
        "query-selection",
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
        BOTH,
        choices=("random", "kcenter", *SCORED_SELECTIONS),
    ),
    # --- distillation (clients) ---
    Setting(
        "method",
        "mekd",
        "Distillation method, from the registry in `mekd_fl/distill/` (each declares its own settings below); "
        "supervised trains on the true labels: an upper bound that breaks the source-blind rule.",
        BOTH,
        choices=method_names,
    ),
    Setting(
        "student-arch",
        "resnet8",
        "Student architecture (CIFAR ResNet, depth 6n+2).",
        BOTH,
        rule=_architecture,
        edge=False,
    ),
    Setting("num-rounds", 8, "Federated distillation rounds.", BOTH, within=">= 1"),
    Setting("local-epochs", 2, "Local distillation epochs per round.", CLIENT, within=">= 1"),
    Setting("batch-size", 64, "Distillation batch size.", CLIENT, within=">= 1"),
    Setting("lr", 0.05, "Student SGD learning rate (cosine-decayed over the rounds).", CLIENT, within="> 0"),
    Setting("momentum", 0.9, "Student SGD momentum.", CLIENT, within=">= 0"),
    Setting("weight-decay", 5e-4, "Student SGD weight decay.", CLIENT, within=">= 0"),
    Setting("temperature", 4.0, "KL temperature T (KL scaled by T^2).", CLIENT, within="> 0", distill=True),
    Setting("fraction-train", 1.0, "Fraction of clients sampled per distillation round.", SERVER, within="(0, 1]"),
    Setting("fraction-evaluate", 1.0, "Fraction of clients sampled for federated evaluation.", SERVER, within="(0, 1]"),
    # (the registered methods' own settings go here: see mekd_fl.config.all_settings)
    # --- aggregation and robustness (server) ---
    Setting(
        "aggregation",
        "fedavg",
        "How the server combines the validated student updates; all but fedavg are "
        "Flower's robust strategies (FedTrimmedAvg, FedMedian, Krum, MultiKrum, "
        "Bulyan).",
        SERVER,
        choices=("fedavg", "trimmed-mean", "median", "krum", "multikrum", "bulyan"),
    ),
    Setting(
        "trim-beta",
        0.2,
        "Fraction of the updates cut from each end, per coordinate, in [0, 0.5); aggregation=trimmed-mean.",
        SERVER,
        within="[0, 0.5)",
    ),
    Setting(
        "num-malicious",
        0,
        "Attacking clients assumed by aggregation=krum, multikrum and bulyan.",
        SERVER,
        within=">= 0",
    ),
    Setting(
        "dp-clip",
        0.0,
        "Central differential privacy: with a value > 0 the aggregation is wrapped in "
        "Flower's DifferentialPrivacyServerSideFixedClipping with this clipping norm "
        "(0: off).",
        SERVER,
        within=">= 0",
    ),
    Setting(
        "dp-noise", 0.0, "Differential-privacy noise multiplier (needs dp-clip > 0 when > 0).", SERVER, within=">= 0"
    ),
    Setting(
        "max-update-norm",
        0.0,
        "L2 bound on a client's update (its weights minus the global ones); "
        "longer updates are scaled down to it (0: off).",
        SERVER,
        within=">= 0",
    ),
    Setting(
        "norm-outlier-factor",
        2.0,
        "Updates longer than this factor times the round's median update length are scaled down to it (0: off).",
        SERVER,
        within=">= 0",
    ),
    Setting(
        "min-reply-fraction",
        0.5,
        "Fewest successful replies a phase or round accepts, as a fraction of "
        "the clients asked (always at least one); fewer ends the run with an "
        "error.",
        SERVER,
        within="[0, 1]",
    ),
    Setting(
        "reply-timeout", 600.0, "Seconds the server waits for the replies of one phase or round.", SERVER, within="> 0"
    ),
    # --- plots ---
    Setting(
        "num-samples", 8, "Images shown in the emulator-samples plot (G(T(x)) beside G(S(x))).", SERVER, within=">= 0"
    ),
    Setting(
        "fidelity-images",
        256,
        "Query images of the client holding the most answers, on which the server measures the emulator's "
        "fidelity after the run (the teacher re-classifies G(T(x)); summary and reports only, never sent to a "
        "client; 0: off).",
        SERVER,
        within=">= 0",
    ),
)

#: The registered methods' settings follow this one in the table (and in RunConfig, pyproject, client_dict).
METHOD_SETTINGS_AFTER = "fraction-evaluate"


def run_setting(name: str) -> Setting:
    """The declaration of one of the run's own settings (for modules that implement its accepted values)."""
    for s in RUN_SETTINGS:
        if s.name == name:
            return s
    raise KeyError(name)
