"""The simulated micro-cloud: workers with sites and compute capacity, links, NICs, and
how capacity and bandwidth change over time (piecewise-constant traces)."""

from __future__ import annotations

from dataclasses import dataclass

from dlion.config import ClusterConfig, DynamicsConfig
from dlion.errors import ConfigError
from dlion.traces import Trace, build_trace

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
    """The cluster: who computes how fast, and every pair's link, as configured; traces
    (FLOP/s per worker, bytes/s per directed link) make capacity and bandwidth vary."""

    def __init__(
        self,
        workers: list[Worker],
        links: dict[tuple[int, int], Link],
        capacity_traces: dict[int, Trace] | None = None,
        bandwidth_traces: dict[tuple[int, int], Trace] | None = None,
    ) -> None:
        self.workers = workers
        self._links = links
        self._capacity_traces = dict(capacity_traces or {})
        self._bandwidth_traces = dict(bandwidth_traces or {})

    @property
    def size(self) -> int:
        return len(self.workers)

    def link(self, src: int, dst: int) -> Link:
        return self._links[(src, dst)]

    def capacity(self, rank: int, t: float = 0.0) -> float:
        """FLOP/s of worker `rank` at time `t`."""
        trace = self._capacity_traces.get(rank)
        return self.workers[rank].capacity_flops if trace is None else trace.at(t)

    def bandwidth(self, src: int, dst: int, t: float = 0.0) -> float:
        """Bytes/s of the directed link src -> dst at time `t`."""
        trace = self._bandwidth_traces.get((src, dst))
        return self._links[(src, dst)].bandwidth if trace is None else trace.at(t)

    def total_capacity(self) -> float:
        return sum(w.capacity_flops for w in self.workers)

    def compute_time(self, rank: int, flops: float, start: float = 0.0) -> float:
        """Virtual seconds worker `rank` needs for `flops` of training work started at
        `start`: exact across capacity changes (the work is the integral of capacity)."""
        trace = self._capacity_traces.get(rank)
        if trace is None:
            return flops / self.workers[rank].capacity_flops
        return trace.duration_for(flops, start)

    def capacity_change_times(self) -> list[float]:
        """Every time (> 0) at which some worker's capacity changes, sorted."""
        return sorted({t for tr in self._capacity_traces.values() for t in tr.times[1:]})

    def bandwidth_change_times(self) -> list[float]:
        """Every time (> 0) at which some link's bandwidth changes, sorted."""
        return sorted({t for tr in self._bandwidth_traces.values() for t in tr.times[1:]})

    def with_dynamics(self, dyn: DynamicsConfig, horizon: float) -> Cluster:
        """This cluster with the capacity and bandwidth traces of `dyn` (later entries for
        the same worker or link replace earlier ones); random traces up to `horizon` s."""
        capacity: dict[int, Trace] = {}
        for i, spec in enumerate(dyn.capacity):
            trace = build_trace(spec, horizon, f"dynamics.capacity.{i}")
            base = 1e9 if spec.absolute else self.workers[spec.worker].capacity_flops
            capacity[spec.worker] = trace.scaled(base)
        bandwidth: dict[tuple[int, int], Trace] = {}
        for i, spec in enumerate(dyn.bandwidth):
            trace = build_trace(spec, horizon, f"dynamics.bandwidth.{i}")
            for pair in self._pairs(spec.sites, spec.workers):
                base = MBPS if spec.absolute else self._links[pair].bandwidth
                bandwidth[pair] = trace.scaled(base)
        return Cluster(self.workers, self._links, capacity, bandwidth)

    def _pairs(
        self, sites: tuple[str, str] | None, ranks: tuple[int, int] | None
    ) -> list[tuple[int, int]]:
        if ranks is not None:
            a, b = ranks
            return [(a, b), (b, a)]
        ends = set(sites or ())
        return [
            (a.rank, b.rank)
            for a in self.workers
            for b in self.workers
            if a.rank != b.rank and {a.site, b.site} == ends
        ]

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
