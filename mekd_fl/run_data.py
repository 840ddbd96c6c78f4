"""The data of one run: the data set and its federated split, the same on the server and every client.

Why in one place: the server (teacher data, test set, label table) and each client (its own partition)
must derive exactly the same split from the same settings; both call `run_data(cfg)`, which is cached
per process because simulated clients share a process and would otherwise decode the data set and
partition it once per message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from mekd_fl.config import RunConfig
from mekd_fl.data import FederatedSplit, ImageDataset, load_dataset, split_federated


@dataclass(frozen=True)
class RunData:
    dataset: ImageDataset
    split: FederatedSplit

    def client_images(self, partition_id: int) -> torch.Tensor:
        """The client's unlabeled training images (uint8). Labels never leave this module for training."""
        return self.dataset.train_images[torch.as_tensor(self.split.client_train[partition_id])]

    def server_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.split.server_indices)
        return self.dataset.train_images[idx], self.dataset.train_labels[idx]


def data_key(cfg: RunConfig) -> tuple:
    """Every setting the data set and its split depend on: equal keys give the same partitions."""
    return (
        cfg.dataset,
        cfg.data_dir,
        cfg.download,
        cfg.num_clients,
        cfg.partition,
        cfg.alpha,
        cfg.classes_per_client,
        cfg.shards_per_client,
        cfg.min_partition_size,
        cfg.partition_retries,
        cfg.server_share,
        cfg.client_test_fraction,
        cfg.seed,
    )


@functools.lru_cache(maxsize=4)
def _run_data(key: tuple) -> RunData:
    (
        dataset_name,
        data_dir,
        download,
        num_clients,
        partition,
        alpha,
        k,
        shards,
        min_size,
        retries,
        share,
        test_frac,
        seed,
    ) = key
    dataset = load_dataset(dataset_name, data_dir, download)
    split = split_federated(
        np.asarray(dataset.train_labels),
        num_clients=num_clients,
        scheme=partition,
        alpha=alpha,
        classes_per_partition=k,
        shards_per_partition=shards,
        min_partition_size=min_size,
        partition_retries=retries,
        server_share=share,
        client_test_fraction=test_frac,
        seed=seed,
    )
    return RunData(dataset, split)


def run_data(cfg: RunConfig) -> RunData:
    return _run_data(data_key(cfg))
