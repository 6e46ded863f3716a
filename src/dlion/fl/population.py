"""The client population: per-device compute, bandwidth and availability, and its data split."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from dlion.core.errors import DataError
from dlion.data import partition
from dlion.fl.config import FLConfig, Range


@dataclass
class ClientProfile:
    client: int  # 0-based client index (its rank is client + 1; rank 0 is the server)
    gflops: float  # effective training GFLOP/s
    bandwidth_mbps: float  # link to the server, both directions
    _rng: random.Random = field(repr=False)
    mean_online_s: float = math.inf
    mean_offline_s: float = 0.0
    # Availability periods generated so far: [(start, end)] of online spans, in order.
    _spans: list[tuple[float, float]] = field(default_factory=list, repr=False)
    _horizon: float = 0.0  # periods are generated lazily up to here

    def online_span(self, t: float) -> tuple[float, float]:
        """(start, end) of the first online period that ends after `t`; start may be <= t
        (online now) or later (offline now, next online then)."""
        while True:
            for start, end in self._spans:
                if end > t:
                    return start, end
            self._extend()

    def _extend(self) -> None:
        if self.mean_offline_s <= 0:
            self._spans = [(0.0, math.inf)]
            return
        # Start online with the stationary probability, so the population is in steady state.
        if not self._spans and self._horizon == 0.0:
            p_on = self.mean_online_s / (self.mean_online_s + self.mean_offline_s)
            if self._rng.random() >= p_on:
                self._horizon = self._rng.expovariate(1 / self.mean_offline_s)
        start = self._horizon
        end = start + self._rng.expovariate(1 / self.mean_online_s)
        self._spans.append((start, end))
        self._horizon = end + self._rng.expovariate(1 / self.mean_offline_s)
        # Keep the list short: spans that ended long ago are never asked for again.
        if len(self._spans) > 4:
            del self._spans[0]


def _log_uniform(rng: random.Random, r: Range) -> float:
    return math.exp(rng.uniform(math.log(r.min), math.log(r.max)))


def make_population(cfg: FLConfig) -> list[ClientProfile]:
    """Seeded profiles: same config and seed => same devices and availability."""
    c = cfg.clients
    out = []
    for i in range(c.count):
        rng = random.Random(cfg.train.seed * 1_000_003 + i)
        out.append(
            ClientProfile(
                client=i,
                gflops=_log_uniform(rng, c.compute_gflops),
                bandwidth_mbps=_log_uniform(rng, c.bandwidth_mbps),
                _rng=rng,
                mean_online_s=c.availability.mean_online_s,
                mean_offline_s=c.availability.mean_offline_s,
            )
        )
    return out


def split_clients(labels: np.ndarray, cfg: FLConfig) -> list[np.ndarray]:
    """Client -> train indices. Dirichlet(alpha) label skew (sizes vary with the draw) or
    label shards with a lognormal number of shards per client (sizes vary on purpose)."""
    d = cfg.data
    n = cfg.clients.count
    seed = cfg.train.seed
    if d.partition != "shards":
        return partition(labels, n, d.partition, seed=seed, alpha=d.alpha, min_size=1)
    total = n * d.shards_per_client
    if total > len(labels):
        raise DataError(
            f"data.shards_per_client: {n} clients x {d.shards_per_client} shards need "
            f"{total} samples, the training set has {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    # Every client gets at least one shard; the rest go by lognormal weights.
    weights = rng.lognormal(0.0, d.size_sigma, n)
    counts = 1 + rng.multinomial(total - n, weights / weights.sum())
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, total)
    assignment = rng.permutation(total)
    parts = []
    start = 0
    for k in counts:
        parts.append(np.sort(np.concatenate([shards[s] for s in assignment[start : start + k]])))
        start += k
    return [p.astype(np.int64) for p in parts]
