"""Split sample indices among simulated clients with flwr-datasets' partitioners.

Using Flower's partitioners (rather than hand-written sampling) keeps the
non-IID settings comparable with other Flower-based work. They operate on a
Hugging Face dataset, so the labels are wrapped together with their row index
and the partitions are read back as index arrays.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner

from mekd_fl.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "pathological")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 42,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into ``num_partitions`` sorted, disjoint, non-empty index arrays.

    - ``iid``: equal shares (sizes differ by at most one) of a seeded shuffle.
    - ``dirichlet``: each class is split among partitions by proportions drawn
      from Dir(alpha); small alpha gives strong label skew.
    - ``pathological``: each partition holds exactly ``classes_per_partition``
      classes. Classes are assigned deterministically (partition i gets classes
      i, i+1, ... mod C) so each class is shared by the same number of
      partitions; the seed still decides which samples of a class go where.
      With fewer than C - k + 1 partitions some classes go to nobody, and those
      samples are left out (a warning says which).

    Every scheme is a deterministic function of ``seed``.
    """
    labels = np.asarray(labels)
    partitioner = _make_partitioner(
        labels, num_partitions, scheme, alpha, classes_per_partition, min_partition_size, seed
    )
    # Shuffle before partitioning: IidPartitioner takes contiguous shards and
    # PathologicalPartitioner splits each class in dataset order, so without it
    # the seed would not change which samples a partition gets.
    table = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    partitioner.dataset = table.shuffle(seed=seed)
    with warnings.catch_warnings():
        # The Dirichlet partitioner warns on every resampling attempt (a final failure becomes a
        # ConfigError below), and the pathological one names unused classes in terms of its own
        # arguments (_warn_unused_classes says it in ours).
        warnings.simplefilter("ignore")
        try:
            # ``[:]`` reads the column as one numpy batch; iterating a datasets Column goes row by row.
            parts = [
                np.sort(partitioner.load_partition(i).with_format("numpy")["idx"][:]) for i in range(num_partitions)
            ]
        except ValueError as err:
            raise ConfigError(_unmet_error(scheme, labels, num_partitions, alpha, classes_per_partition)) from err
    if scheme == "pathological":
        _warn_unused_classes(labels, parts, num_partitions, classes_per_partition)
    return parts


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition class histogram, shape (len(parts), num_classes), int64."""
    labels = np.asarray(labels)
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in zip(counts, parts):
        row += np.bincount(labels[part], minlength=num_classes)[:num_classes]
    return counts


def _make_partitioner(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> Partitioner:
    """Validate the settings and build the flwr-datasets partitioner for ``scheme``."""
    if scheme not in PARTITIONS:
        raise ConfigError(f"partition={scheme!r} is not known; accepted: {', '.join(PARTITIONS)}")
    if num_partitions < 1:
        raise ConfigError(f"num-clients={num_partitions} must be at least 1")
    if num_partitions > len(labels):
        raise ConfigError(f"num-clients={num_partitions} exceeds the {len(labels)} samples available to clients")
    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError(
                f"alpha={alpha} must be > 0 (small, e.g. 0.1, is strongly non-IID; large, e.g. 100, is near IID)"
            )
        # The requested minimum can be unreachable on small data (tests, synthetic,
        # many clients): asking for at most half the average size keeps resampling
        # likely to succeed, and at least 1 keeps every client non-empty.
        min_size = max(1, min(min_partition_size, len(labels) // (num_partitions * 2)))
        # self_balancing=False: balancing zeroes later classes' shares for partitions that are
        # already above average size, so the skew would depend on class order and be milder
        # than Dir(alpha) says. Unequal client sizes are part of the non-IID setting.
        return DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
    num_classes = len(np.unique(labels))
    if not 1 <= classes_per_partition <= num_classes:
        raise ConfigError(
            f"classes-per-client={classes_per_partition} must be in [1, {num_classes}] (the number of classes)"
        )
    return PathologicalPartitioner(
        num_partitions,
        partition_by="label",
        num_classes_per_partition=classes_per_partition,
        class_assignment_mode="deterministic",
        seed=seed,
    )


def _unmet_error(scheme: str, labels: np.ndarray, num_partitions: int, alpha: float, classes_per_partition: int) -> str:
    """One-line explanation for a partitioner that could not satisfy its constraints."""
    if scheme == "dirichlet":
        return (
            f"alpha={alpha} with num-clients={num_partitions}: 10 Dirichlet draws all left some client with "
            f"too few of the {len(labels)} samples; use a larger alpha or fewer clients"
        )
    return (
        f"classes-per-client={classes_per_partition} with num-clients={num_partitions}: some class has fewer "
        f"samples than clients that need it; use fewer clients or fewer classes per client"
    )


def _warn_unused_classes(labels: np.ndarray, parts: list[np.ndarray], num_partitions: int, k: int) -> None:
    unused = np.setdiff1d(np.unique(labels), labels[np.concatenate(parts)])
    if unused.size:
        warnings.warn(
            f"partition=pathological with num-clients={num_partitions} and classes-per-client={k} gives classes "
            f"{unused.tolist()} to no client; their {int(np.isin(labels, unused).sum())} samples are unused",
            stacklevel=3,
        )
