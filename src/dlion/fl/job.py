"""The FL job, engine-free: its model, the server's and the clients' replicas, the star
network of links between the server and its clients, and the partition record. The sim
(jobs/fl_sim.py) and real processes (fl/processes.py) build the job from these.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlion.cluster.topology import MBPS, Cluster, Link, Worker
from dlion.data import Dataset
from dlion.fl.config import FLConfig
from dlion.fl.population import ClientProfile, make_population, split_clients
from dlion.report import EvalPoint, write_json_atomic
from dlion.training.experiment import cached_dataset
from dlion.training.models import build_model, train_flops_per_sample
from dlion.training.replica import Replica

# An idle client's receive wakes up this often (virtual s in the sim) just to wait again;
# large so that idle clients cost almost no events.
IDLE_RECV_S = 3600.0


@dataclass
class FLRunResult:
    summary: dict[str, Any]
    points: list[EvalPoint]
    events: list[dict[str, Any]]
    model: torch.Tensor  # final global model


def build_fl_model(cfg: FLConfig, dataset: Dataset) -> torch.nn.Module:
    """The FL job's model, seeded: every process and every replica builds the same one."""
    m = cfg.model
    return build_model(
        m.name,
        dataset.input_shape,
        dataset.num_classes,
        hidden=m.hidden,
        channels=m.channels,
        seed=cfg.train.seed,
    )


def client_replica(
    cfg: FLConfig,
    template: torch.nn.Module,
    dataset: Dataset,
    shard: np.ndarray,
    rank: int,
    now: float,
) -> Replica:
    """A client's model for one task, on its own shard (sim and dist engines alike)."""
    idx = torch.from_numpy(np.asarray(shard, dtype=np.int64))
    loc = cfg.local
    return Replica.from_tensors(
        # A copy of the template, not a fresh seeded build: the weights are overwritten
        # by the task's model at once, and seeding torch per task cost a quarter of
        # a 50-client run's wall time.
        copy.deepcopy(template),
        dataset.x_train[idx],
        dataset.y_train[idx],
        lr=loc.lr,
        momentum=loc.momentum,
        weight_decay=loc.weight_decay,
        # A fresh batch order per task: the seed mixes rank and start time.
        seed=cfg.train.seed * 1_000_003 + rank * 7919 + int(now * 1000),
    )


class FLSetup:
    """What every process of an FL job builds from the config, alike: the data and its
    split over the clients, their profiles, the server's model (and a template for the
    clients'), its training FLOPs per sample, and the evaluation set."""

    def __init__(self, cfg: FLConfig) -> None:
        d = cfg.data
        # The same per-process cache as the other engines (fixed split seed 0).
        self.dataset = cached_dataset(
            d.name, d.path, 0, d.test_fraction, d.num_samples, d.num_features, d.num_classes
        )
        self.shards = split_clients(self.dataset.y_train.numpy(), cfg)
        self.profiles: list[ClientProfile] = make_population(cfg)
        self.model = build_fl_model(cfg, self.dataset)
        self.flops = train_flops_per_sample(self.model, self.dataset.input_shape)
        self.template = build_fl_model(cfg, self.dataset)
        x_eval, y_eval = self.dataset.x_test, self.dataset.y_test
        limit = cfg.evaluation.max_test_samples
        if limit is not None and limit < len(x_eval):
            x_eval, y_eval = x_eval[:limit], y_eval[:limit]
        self.x_eval, self.y_eval = x_eval, y_eval

    def start_fields(self, cfg: FLConfig, parameters: int) -> dict[str, Any]:
        """The fields of a run's `start` / `resume` event, in the sim and on processes."""
        return {
            "scenario": cfg.name,
            "algorithm": cfg.algorithm.name,
            "seed": cfg.train.seed,
            "clients": cfg.clients.count,
            "concurrency": cfg.clients.concurrency,
            "parameters": parameters,
            "flops_per_sample": self.flops,
        }


def server_replica(cfg: FLConfig, dataset: Dataset, model: torch.nn.Module) -> Replica:
    """The server's replica of the global model. (spec) Its data is the proxy set for
    FedASMU's loss observations: a seeded sample of the training data, as a server holding
    a little public data would have."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    n_train = len(dataset.y_train)
    probe = torch.randperm(n_train, generator=g)[: min(cfg.server.probe_samples, n_train)]
    return Replica.from_tensors(
        model,
        dataset.x_train[probe],
        dataset.y_train[probe],
        lr=cfg.local.lr,
        momentum=0.0,
        weight_decay=0.0,
        seed=cfg.train.seed,
    )


def star_cluster(cfg: FLConfig, profiles: list[ClientProfile]) -> Cluster:
    """Server (rank 0) and one link per client, both directions; the server's NIC is shared
    by all transfers, so many concurrent downloads slow each other down."""
    lat = cfg.clients.latency_ms / 1e3
    # The server never trains; its capacity is never used for time.
    workers = [Worker(0, "server", 1e12, cfg.server.nic_mbps * MBPS)]
    links: dict[tuple[int, int], Link] = {}
    for p in profiles:
        rank = p.client + 1
        workers.append(Worker(rank, "client", p.gflops * 1e9, None))
        links[(0, rank)] = links[(rank, 0)] = Link(p.bandwidth_mbps * MBPS, lat)
    return Cluster(workers, links)


def write_partition(path: Path, cfg: FLConfig, dataset: Dataset, shards: list[np.ndarray]) -> None:
    """client -> training-set indices, with sizes and label counts, saved with the run."""
    labels = dataset.y_train.numpy()
    k = dataset.num_classes
    clients = [
        {
            "client": i,
            "rank": i + 1,
            "size": len(idx),
            "label_counts": np.bincount(labels[idx], minlength=k).tolist(),
            "indices": idx.tolist(),
        }
        for i, idx in enumerate(shards)
    ]
    d = cfg.data
    write_json_atomic(
        path,
        {
            "dataset": d.name,
            "scheme": d.partition,
            "alpha": d.alpha,
            "seed": cfg.train.seed,
            "clients": clients,
        },
    )
