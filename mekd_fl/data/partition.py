"""Split sample indices among simulated clients with flwr-datasets' partitioners.

Using Flower's partitioners (rather than hand-written sampling) keeps the
non-IID settings comparable with other Flower-based work. They operate on a
Hugging Face dataset, so the labels are wrapped together with their row index
and the partitions are read back as index arrays. They are imported when a split is cut, not with the
module: flwr-datasets brings Hugging Face `datasets` and matplotlib (about 1.5 s), and a ClientApp that
only reads its own shard, started afresh for every message under the Deployment Engine, never cuts one.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from mekd_fl.errors import ConfigError

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

PARTITIONS = ("iid", "dirichlet", "pathological", "shard")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
    seed: int = 42,
    min_partition_size: int = 10,
    partition_retries: int = 10,
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into ``num_partitions`` sorted, disjoint, non-empty index arrays.

    - ``iid``: equal shares (sizes differ by at most one) of a seeded shuffle.
    - ``dirichlet``: each class is split among partitions by proportions drawn
      from Dir(alpha); small alpha gives strong label skew. A draw that leaves
      some partition with fewer than ``min_partition_size`` samples (capped at
      half the average size, at least 1) is redrawn, at most
      ``partition_retries`` times; all draws come from one generator seeded
      with ``seed``, so the result depends on the seed alone.
    - ``pathological``: each partition holds exactly ``classes_per_partition``
      classes. Classes are assigned deterministically (partition i gets classes
      i, i+1, ... mod C) so each class is shared by the same number of
      partitions; the seed still decides which samples of a class go where.
      With fewer than C - k + 1 partitions some classes go to nobody, and those
      samples are left out (a warning says which).
    - ``shard`` (FedAvg paper): the samples are sorted by label and cut into
      ``num_partitions * shards_per_partition`` equal shards of consecutive
      samples; each partition gets ``shards_per_partition`` shards chosen at
      random. The last ``len(labels) % (num_partitions * shards_per_partition)``
      samples in label order fit no shard and are left out (a warning says so).

    Every scheme is a deterministic function of ``seed``.
    """
    labels = np.asarray(labels)
    _check_settings(
        labels,
        num_partitions,
        scheme,
        alpha,
        classes_per_partition,
        shards_per_partition,
        min_partition_size,
        partition_retries,
    )
    # Shuffle before partitioning: IidPartitioner takes contiguous shards and
    # PathologicalPartitioner splits each class in dataset order (ShardPartitioner
    # sorts by label, a stable sort), so without it the seed would not change
    # which samples a partition gets.
    import datasets

    table = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))}).shuffle(seed=seed)
    if scheme == "dirichlet":
        return _dirichlet_parts(table, labels, num_partitions, alpha, min_partition_size, partition_retries, seed)
    if scheme == "iid":
        # IidPartitioner's contiguous shards of the shuffled table, cut in one numpy call: the same
        # partitions (tests/test_partition.py compares them), where reading 10,000 partitions back one
        # by one through `datasets` took 14 s in every process that builds the split.
        return [
            np.sort(part) for part in np.array_split(np.asarray(table.with_format("numpy")["idx"][:]), num_partitions)
        ]
    partitioner = _make_partitioner(num_partitions, scheme, classes_per_partition, shards_per_partition, seed)
    partitioner.dataset = table
    with warnings.catch_warnings():
        # The pathological partitioner names unused classes in terms of its own arguments
        # (_warn_unused_classes says it in ours).
        warnings.simplefilter("ignore")
        try:
            parts = _read_parts(partitioner, num_partitions)
        except ValueError as err:
            raise ConfigError(_unmet_error(scheme, labels, num_partitions, classes_per_partition)) from err
    if scheme == "pathological":
        _warn_unused_classes(labels, parts, num_partitions, classes_per_partition)
    if scheme == "shard":
        _warn_unsharded(labels, num_partitions, shards_per_partition)
    return parts


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition class histogram, shape (len(parts), num_classes), int64."""
    labels = np.asarray(labels)
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in zip(counts, parts):
        row += np.bincount(labels[part], minlength=num_classes)[:num_classes]
    return counts


def _check_settings(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    shards_per_partition: int,
    min_partition_size: int,
    partition_retries: int,
) -> None:
    """Reject settings no partition can satisfy, with one line naming the setting and what is accepted."""
    if scheme not in PARTITIONS:
        raise ConfigError(f"partition={scheme!r} is not known; accepted: {', '.join(PARTITIONS)}")
    if num_partitions < 1:
        raise ConfigError(f"num-clients={num_partitions} must be at least 1")
    if num_partitions > len(labels):
        raise ConfigError(f"num-clients={num_partitions} exceeds the {len(labels)} samples available to clients")
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError(
                f"alpha={alpha} must be > 0 (small, e.g. 0.1, is strongly non-IID; large, e.g. 100, is near IID)"
            )
        if min_partition_size < 1:
            raise ConfigError(f"min-partition-size={min_partition_size} must be an integer >= 1")
        if partition_retries < 0:
            raise ConfigError(f"partition-retries={partition_retries} must be an integer >= 0")
    if scheme == "pathological":
        num_classes = len(np.unique(labels))
        if not 1 <= classes_per_partition <= num_classes:
            raise ConfigError(
                f"classes-per-client={classes_per_partition} must be in [1, {num_classes}] (the number of classes)"
            )
    if scheme == "shard" and not 1 <= shards_per_partition <= len(labels) // num_partitions:
        raise ConfigError(
            f"shards-per-client={shards_per_partition} must be in [1, {len(labels) // num_partitions}] "
            f"(num-clients={num_partitions} x shards-per-client shards cannot outnumber the {len(labels)} samples)"
        )


def _make_partitioner(
    num_partitions: int, scheme: str, classes_per_partition: int, shards: int, seed: int
) -> Partitioner:
    """The flwr-datasets partitioner for ``iid``, ``pathological`` or ``shard`` (settings already checked)."""
    from flwr_datasets.partitioner import IidPartitioner, PathologicalPartitioner, ShardPartitioner

    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "shard":
        # The shard size follows from the data: len // (num_partitions * shards), and the incomplete
        # last shard is dropped, so every client gets exactly ``shards`` equal shards.
        return ShardPartitioner(num_partitions, partition_by="label", num_shards_per_partition=shards, seed=seed)
    return PathologicalPartitioner(
        num_partitions,
        partition_by="label",
        num_classes_per_partition=classes_per_partition,
        class_assignment_mode="deterministic",
        seed=seed,
    )


def _read_parts(partitioner: Partitioner, num_partitions: int, min_size: int = 0) -> list[np.ndarray] | None:
    """Each partition's sorted row indices, or None as soon as one has fewer than ``min_size`` rows."""
    parts = []
    for i in range(num_partitions):
        # ``[:]`` reads the column as one numpy batch; iterating a datasets Column goes row by row.
        part = np.sort(partitioner.load_partition(i).with_format("numpy")["idx"][:])
        if len(part) < min_size:
            return None
        parts.append(part)
    return parts


def _dirichlet_parts(
    table: datasets.Dataset,
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    min_partition_size: int,
    retries: int,
    seed: int,
) -> list[np.ndarray]:
    """Draw Dir(alpha) partitions until every one has the minimum size: 1 + ``retries`` draws at most.

    flwr-datasets' DirichletPartitioner redraws at most 10 times, a number fixed in its code, so the
    redraws happen here instead: each partitioner is asked for one draw (min_partition_size=0 accepts
    any) and the minimum is checked on what it returns. The partitioners share one generator,
    seeded with ``seed``: numpy's default_rng hands back a Generator it is given, and shuffle=False
    keeps the generator for the Dirichlet draws alone. The k-th draw is therefore exactly the k-th
    draw of flwr-datasets' own loop with that seed, and retries=10 accepts the same draw it did.
    """
    # The requested minimum can be unreachable on small data (tests, synthetic,
    # many clients): asking for at most half the average size keeps resampling
    # likely to succeed, and at least 1 keeps every client non-empty.
    min_size = max(1, min(min_partition_size, len(labels) // (num_partitions * 2)))
    from flwr_datasets.partitioner import DirichletPartitioner

    rng = np.random.default_rng(seed)
    for _ in range(retries + 1):
        # self_balancing=False: balancing zeroes later classes' shares for partitions that are
        # already above average size, so the skew would depend on class order and be milder
        # than Dir(alpha) says. Unequal client sizes are part of the non-IID setting.
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=0,
            self_balancing=False,
            shuffle=False,
            seed=rng,  # type: ignore[arg-type]  # a Generator: see the docstring
        )
        partitioner.dataset = table
        parts = _read_parts(partitioner, num_partitions, min_size)
        if parts is not None:
            return parts
    raise ConfigError(
        f"alpha={alpha} with num-clients={num_partitions}: {retries + 1} Dirichlet draws (partition-retries={retries}) "
        f"all left some client with fewer than {min_size} of the {len(labels)} samples "
        f"(min-partition-size={min_partition_size}, capped at half the average); use a larger alpha, fewer "
        f"num-clients, a smaller min-partition-size or more partition-retries"
    )


def _unmet_error(scheme: str, labels: np.ndarray, num_partitions: int, classes_per_partition: int) -> str:
    """One-line explanation for a partitioner that could not satisfy its constraints."""
    if scheme == "pathological":
        return (
            f"classes-per-client={classes_per_partition} with num-clients={num_partitions}: some class has fewer "
            f"samples than clients that need it; use fewer clients or fewer classes per client"
        )
    return f"partition={scheme} with num-clients={num_partitions} cannot split the {len(labels)} samples"


def _warn_unsharded(labels: np.ndarray, num_partitions: int, shards: int) -> None:
    left = len(labels) % (num_partitions * shards)
    if left:
        warnings.warn(
            f"partition=shard with num-clients={num_partitions} and shards-per-client={shards} cuts "
            f"{num_partitions * shards} shards of {len(labels) // (num_partitions * shards)} samples; the last "
            f"{left} samples in label order are unused",
            stacklevel=3,
        )


def _warn_unused_classes(labels: np.ndarray, parts: list[np.ndarray], num_partitions: int, k: int) -> None:
    unused = np.setdiff1d(np.unique(labels), labels[np.concatenate(parts)])
    if unused.size:
        warnings.warn(
            f"partition=pathological with num-clients={num_partitions} and classes-per-client={k} gives classes "
            f"{unused.tolist()} to no client; their {int(np.isin(labels, unused).sum())} samples are unused",
            stacklevel=3,
        )
