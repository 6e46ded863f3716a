"""Everything a run needs before training starts: data shards, the model, its FLOPs, replicas."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dlion.config import ExperimentConfig
from dlion.data import Dataset, load_dataset, partition
from dlion.models import build_model, train_flops_per_sample
from dlion.replica import Replica


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    shards: list[np.ndarray]  # train indices per worker
    flops_per_sample: int  # one training step (forward + backward) per sample
    x_eval: torch.Tensor
    y_eval: torch.Tensor


@functools.lru_cache(maxsize=8)
def cached_dataset(
    name: str,
    path: str | None,
    seed: int,
    test_fraction: float,
    num_samples: int | None,
    num_features: int,
    num_classes: int,
) -> Dataset:
    # A bench runs many (strategy, seed) pairs on one dataset; load it once per process.
    return load_dataset(
        name,
        path=path,
        seed=seed,
        test_fraction=test_fraction,
        num_samples=num_samples,
        num_features=num_features,
        num_classes=num_classes,
    )


def prepare(cfg: ExperimentConfig, num_workers: int) -> Prepared:
    d = cfg.data
    # The dataset split is fixed (seed 0) so seeds vary training, not the test set.
    dataset = cached_dataset(
        d.name, d.path, 0, d.test_fraction, d.num_samples, d.num_features, d.num_classes
    )
    shards = partition(
        dataset.y_train.numpy(),
        num_workers,
        d.partition,
        seed=cfg.train.seed,
        alpha=d.alpha,
        shards_per_part=d.shards_per_worker,
    )
    model = make_model(cfg, dataset)
    flops = train_flops_per_sample(model, dataset.input_shape)
    x_eval, y_eval = dataset.x_test, dataset.y_test
    limit = cfg.evaluation.max_test_samples
    if limit is not None and limit < len(x_eval):
        x_eval, y_eval = x_eval[:limit], y_eval[:limit]
    return Prepared(dataset, shards, flops, x_eval, y_eval)


def make_model(cfg: ExperimentConfig, dataset: Dataset) -> torch.nn.Module:
    m = cfg.model
    # Every replica starts from the same initialization, as in synchronous data parallelism.
    return build_model(
        m.name,
        dataset.input_shape,
        dataset.num_classes,
        hidden=m.hidden,
        channels=m.channels,
        seed=cfg.train.seed,
    )


def make_replica(cfg: ExperimentConfig, prep: Prepared, rank: int) -> Replica:
    idx = torch.from_numpy(np.asarray(prep.shards[rank], dtype=np.int64))
    t = cfg.train
    return Replica(
        make_model(cfg, prep.dataset),
        prep.dataset.x_train[idx],
        prep.dataset.y_train[idx],
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        seed=t.seed * 1000 + rank,
    )
