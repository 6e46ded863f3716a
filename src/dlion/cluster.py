"""The simulated micro-cloud: workers with sites and compute capacity, links, NICs."""

from __future__ import annotations

from dataclasses import dataclass

from dlion.config import ClusterConfig
from dlion.errors import ConfigError

MBPS = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Worker:
    rank: int
    site: str
    capacity_flops: float  # effective FLOP/s for training this model
    nic_bytes_per_s: float | None  # shared by all of this worker's transfers; None = unlimited


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s
    latency: float  # seconds, one way


class Cluster:
    """Static description of the cluster: who computes how fast, and every pair's link."""

    def __init__(self, workers: list[Worker], links: dict[tuple[int, int], Link]) -> None:
        self.workers = workers
        self._links = links

    @property
    def size(self) -> int:
        return len(self.workers)

    def link(self, src: int, dst: int) -> Link:
        return self._links[(src, dst)]

    def capacity(self, rank: int) -> float:
        return self.workers[rank].capacity_flops

    def total_capacity(self) -> float:
        return sum(w.capacity_flops for w in self.workers)

    def compute_time(self, rank: int, flops: float) -> float:
        """Virtual seconds worker `rank` needs for `flops` of training work."""
        return flops / self.workers[rank].capacity_flops

    def sites(self) -> list[str]:
        seen: list[str] = []
        for w in self.workers:
            if w.site not in seen:
                seen.append(w.site)
        return seen

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> Cluster:
        workers: list[Worker] = []
        for entry in cfg.workers:
            for _ in range(entry.count):
                nic = entry.nic_mbps * MBPS if entry.nic_mbps is not None else None
                workers.append(Worker(len(workers), entry.site, entry.capacity_gflops * 1e9, nic))
        sites = {s.name: s for s in cfg.sites}
        site_links: dict[frozenset[str], tuple[float, float]] = {}
        pair_links: dict[frozenset[int], tuple[float, float]] = {}
        for i, link in enumerate(cfg.links):
            value = (link.bandwidth_mbps * MBPS, link.latency_ms / 1e3)
            if link.sites is not None:
                site_links[frozenset(link.sites)] = value
            elif link.workers is not None:
                a, b = link.workers
                if not (0 <= a < len(workers) and 0 <= b < len(workers)) or a == b:
                    raise ConfigError(
                        f"cluster.links.{i}.workers: ranks must be two different workers "
                        f"in 0..{len(workers) - 1}, got {list(link.workers)}"
                    )
                pair_links[frozenset((a, b))] = value
        links: dict[tuple[int, int], Link] = {}
        for a in workers:
            for b in workers:
                if a.rank == b.rank:
                    continue
                if frozenset((a.rank, b.rank)) in pair_links:
                    bw, lat = pair_links[frozenset((a.rank, b.rank))]
                elif a.site == b.site and frozenset((a.site,)) not in site_links:
                    site = sites[a.site]
                    bw, lat = site.intra_bandwidth_mbps * MBPS, site.intra_latency_ms / 1e3
                else:
                    key = frozenset((a.site, b.site))
                    bw, lat = site_links.get(
                        key,
                        (
                            cfg.default_inter_bandwidth_mbps * MBPS,
                            cfg.default_inter_latency_ms / 1e3,
                        ),
                    )
                links[(a.rank, b.rank)] = Link(bw, lat)
        return cls(workers, links)
