"""Datasets, file readers and worker partitioning."""

from dlion.data.datasets import DATASET_NAMES, Dataset, cache_dir, load_dataset
from dlion.data.partition import PARTITION_SCHEMES, partition
from dlion.data.readers import read_cifar10_batch, read_idx, read_npz

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "partition",
    "read_cifar10_batch",
    "read_idx",
    "read_npz",
]
