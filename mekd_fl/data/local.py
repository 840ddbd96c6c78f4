"""What one edge device holds: its own images (and, for evaluation only, its held-out labels).

Why its own type: a client must not need the federation's split settings (the server's share, the
partitioner, the other clients) to find its data. In a simulation the server hands each node its
`shard` (indices into the shared data set files, see `strategies.protocol.SHARD`), and the node
cuts its own images out of the files it reads itself; a real device would fill `LocalData` from its
own storage instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mekd_fl.data.datasets import load_dataset


@dataclass(frozen=True)
class LocalData:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor  # uint8 (N, C, H, W): the device's training images, used unlabeled
    labels: torch.Tensor  # their true labels: read only by the `supervised` reference method
    test_images: torch.Tensor  # held out for federated evaluation
    test_labels: torch.Tensor


def shard_data(dataset: str, data_dir: str, train_index: np.ndarray, test_index: np.ndarray) -> LocalData:
    """A simulated node's data: its shard of the data set files (decoded once per process)."""
    ds = load_dataset(dataset, data_dir)
    n = len(ds.train_labels)
    for name, index in (("train", train_index), ("test", test_index)):
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu" or (index.size and (index.min() < 0 or index.max() >= n)):
            raise ValueError(f"shard {name} index is not a list of image numbers in [0, {n})")
    train = torch.as_tensor(np.asarray(train_index, dtype=np.int64))
    test = torch.as_tensor(np.asarray(test_index, dtype=np.int64))
    return LocalData(
        ds.name,
        ds.num_classes,
        ds.image_shape,
        ds.mean,
        ds.std,
        ds.train_images[train],
        ds.train_labels[train],
        ds.train_images[test],
        ds.train_labels[test],
    )
