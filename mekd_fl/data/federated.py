"""Divide a training set between the server (labeled teacher data) and the clients.

In source-blind distillation the server trains the teacher on labeled data it
owns, while clients hold unlabeled images whose distribution may differ. This
module decides, once per run and deterministically for a seed, which training
rows end up where; everything downstream works with these index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mekd_fl.data.partition import label_counts, partition_indices
from mekd_fl.errors import ConfigError

# Beyond this many classes a full count table is too wide to read; show a digest instead.
_MAX_TABLE_CLASSES = 20


@dataclass(frozen=True)
class FederatedSplit:
    """Index arrays into ``dataset.train_*``; the four groups are pairwise disjoint."""

    server_indices: np.ndarray  # kept labeled on the server (teacher training data)
    client_train: list[np.ndarray]  # per client: its unlabeled images
    client_test: list[np.ndarray]  # per client: held out, for federated evaluation only
    label_counts: np.ndarray  # (num_clients, C): counts of client_train + client_test labels

    def summary_table(self, class_names: list[str] | None = None) -> str:
        """Per-client sizes and label counts, printed at start so the non-IID-ness is visible.

        ``class_names`` gives one column title per class (default ``c0``, ``c1``, ...).
        """
        num_classes = self.label_counts.shape[1]
        names = class_names or [f"c{i}" for i in range(num_classes)]
        head = ["client", "train", "test"]
        rows = [
            [str(i), str(len(tr)), str(len(te))] for i, (tr, te) in enumerate(zip(self.client_train, self.client_test))
        ]
        if num_classes <= _MAX_TABLE_CLASSES:
            head += names
            for row, counts in zip(rows, self.label_counts):
                row += [str(int(n)) for n in counts]
        else:
            head += ["classes", "largest classes"]
            for row, counts in zip(rows, self.label_counts):
                top = np.argsort(-counts, kind="stable")[:3]
                row += [
                    str(int((counts > 0).sum())),
                    " ".join(f"{names[c]}:{int(counts[c])}" for c in top if counts[c]),
                ]
        widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [head, *rows]]
        lines.append(f"server: {len(self.server_indices)} labeled images (teacher data)")
        return "\n".join(lines)


def split_federated(
    labels: np.ndarray,
    *,
    num_clients: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    server_share: float,
    client_test_fraction: float,
    seed: int,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    partition_retries: int = 10,
) -> FederatedSplit:
    """Split train rows into server data and per-client train/test parts.

    A stratified random ``server_share`` of every class goes to the server, so the
    teacher sees the global label distribution. The rest is partitioned among
    clients (see ``partition_indices``); each client's part is shuffled and its
    last ``client_test_fraction`` held out, keeping at least one training image.
    """
    if not 0 <= server_share < 1:
        raise ConfigError(f"server-share={server_share} must be in [0, 1)")
    if not 0 <= client_test_fraction < 1:
        raise ConfigError(f"client-test-fraction={client_test_fraction} must be in [0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)

    to_server = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        to_server[rng.permutation(members)[: int(round(server_share * len(members)))]] = True
    server, pool = np.flatnonzero(to_server), np.flatnonzero(~to_server)  # pool is sorted, so parts stay sorted

    parts = [
        pool[p]
        for p in partition_indices(
            labels[pool],
            num_clients,
            scheme,
            alpha=alpha,
            classes_per_partition=classes_per_partition,
            shards_per_partition=shards_per_partition,
            seed=seed,
            min_partition_size=min_partition_size,
            partition_retries=partition_retries,
        )
    ]
    client_train, client_test = [], []
    for part in parts:
        shuffled = rng.permutation(part)
        n_test = min(int(round(client_test_fraction * len(part))), len(part) - 1)
        client_train.append(np.sort(shuffled[: len(part) - n_test]))
        client_test.append(np.sort(shuffled[len(part) - n_test :]))

    num_classes = int(labels.max()) + 1  # labels is non-empty: partition_indices rejected an empty pool
    return FederatedSplit(server, client_train, client_test, label_counts(labels, parts, num_classes))
