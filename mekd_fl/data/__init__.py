"""Datasets, client partitions and the server/client split of the training data."""

from mekd_fl.data.datasets import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    ImageDataset,
    check_dataset_available,
    class_names,
    load_dataset,
)
from mekd_fl.data.federated import FederatedSplit, split_federated
from mekd_fl.data.partition import PARTITIONS, label_counts, partition_indices

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "PARTITIONS",
    "FederatedSplit",
    "ImageDataset",
    "check_dataset_available",
    "class_names",
    "label_counts",
    "load_dataset",
    "partition_indices",
    "split_federated",
]
