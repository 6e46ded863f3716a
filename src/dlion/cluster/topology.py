"""The simulated micro-cloud: workers with sites and compute capacity, the network they
share, and how capacity and bandwidth change over time (piecewise-constant traces).

The network is a set of capacities (resources) that flows cross:
- ("link", i, j): the link of one directed worker pair, used by that pair alone: inside a
  site (the intra-site values, or a `sites: [s, s]` entry) and for per-pair `workers`
  entries (dedicated lines, even between sites);
- ("site", a, b): the pipe from site a to site b, shared by every flow from a worker of a
  to a worker of b (a `sites: [a, b]` entry, else the default inter-site values);
- ("up", a, "") / ("down", b, ""): site a's WAN uplink / site b's downlink, where the site
  gives one, shared by all of its inter-site traffic out / in (not per-pair entries);
- ("out", i, 0) / ("in", i, 0): worker i's NIC, each direction, where it has one.
A flow's rate is the max-min fair share along its path (engines/network.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from dlion.cluster.traces import Trace, build_trace
from dlion.core.config import ClusterConfig, DynamicsConfig
from dlion.core.errors import ConfigError

MBPS = 1e6 / 8  # bytes per second in one Mbit/s

# A capacity flows share: (kind, a, b), see the module docstring.
Resource = tuple[str, int | str, int | str]


@dataclass(frozen=True)
class Worker:
    rank: int
    site: str
    capacity_flops: float  # effective FLOP/s for training this model
    nic_bytes_per_s: float | None  # shared by all of this worker's transfers; None = unlimited
    step_overhead_s: float = 0.0  # fixed cost of every step, before its FLOPs


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s a lone flow gets (the smallest capacity on its path)
    latency: float  # seconds, one way


class Cluster:
    """The cluster: who computes how fast, every directed pair's latency and path, and the
    capacity of each resource on the paths; traces (FLOP/s per worker, bytes/s per
    resource) make capacity and bandwidth vary.

    `links` gives every directed pair's Link. A pair without a `routes` entry uses its own
    link, ("link", src, dst), whose capacity is that Link's bandwidth; a pair in `routes`
    crosses the shared resources listed there, whose capacities are in `shared`."""

    def __init__(
        self,
        workers: list[Worker],
        links: dict[tuple[int, int], Link],
        capacity_traces: dict[int, Trace] | None = None,
        bandwidth_traces: dict[Resource, Trace] | None = None,
        *,
        routes: dict[tuple[int, int], tuple[Resource, ...]] | None = None,
        shared: dict[Resource, float] | None = None,
    ) -> None:
        self.workers = workers
        self._links = links
        self._capacity_traces = dict(capacity_traces or {})
        self._bandwidth_traces = dict(bandwidth_traces or {})
        self._bandwidth_epochs: list[float] | None = None  # every trace's times, sorted
        self._routes = dict(routes or {})
        self._shared = dict(shared or {})

    @property
    def size(self) -> int:
        return len(self.workers)

    def link(self, src: int, dst: int) -> Link:
        """Latency of src -> dst and the bandwidth a lone flow gets there (no traces)."""
        return self._links[(src, dst)]

    def route(self, src: int, dst: int) -> tuple[Resource, ...]:
        """The link resources a flow src -> dst crosses (NICs excluded)."""
        return self._routes.get((src, dst), (("link", src, dst),))

    def path(self, src: int, dst: int) -> tuple[Resource, ...]:
        """Every resource a flow src -> dst crosses: its route, then the NICs it uses."""
        out = list(self.route(src, dst))
        if self.workers[src].nic_bytes_per_s is not None:
            out.append(("out", src, 0))
        if self.workers[dst].nic_bytes_per_s is not None:
            out.append(("in", dst, 0))
        return tuple(out)

    def is_shared(self, src: int, dst: int) -> bool:
        """Whether src -> dst goes through a site pipe (shared with other pairs)."""
        return (src, dst) in self._routes

    def resource_capacity(self, resource: Resource, t: float = 0.0) -> float:
        """Bytes/s of `resource` at time `t`."""
        trace = self._bandwidth_traces.get(resource)
        if trace is not None:
            return trace.at(t)
        kind, a, b = resource
        if kind == "link":
            return self._links[(int(a), int(b))].bandwidth
        if kind in ("out", "in"):
            nic = self.workers[int(a)].nic_bytes_per_s
            if nic is None:
                raise ValueError(f"worker {a} has no NIC capacity")
            return nic
        return self._shared[resource]

    def shared_capacities(self) -> dict[Resource, float]:
        """Base bytes/s of every site pipe, uplink and downlink (no traces)."""
        return dict(self._shared)

    def capacity(self, rank: int, t: float = 0.0) -> float:
        """FLOP/s of worker `rank` at time `t`."""
        trace = self._capacity_traces.get(rank)
        return self.workers[rank].capacity_flops if trace is None else trace.at(t)

    def bandwidth(self, src: int, dst: int, t: float = 0.0) -> float:
        """Bytes/s a lone flow src -> dst gets at time `t` (the smallest capacity on its
        route; NICs excluded)."""
        return min(self.resource_capacity(r, t) for r in self.route(src, dst))

    def compute_time(self, rank: int, flops: float, start: float = 0.0) -> float:
        """Virtual seconds worker `rank` needs for one step of `flops` training work started
        at `start`: the worker's fixed step overhead, then the FLOPs, exact across capacity
        changes (the work is the integral of capacity; the overhead does not scale)."""
        overhead = self.workers[rank].step_overhead_s
        trace = self._capacity_traces.get(rank)
        if trace is None:
            work = flops / self.workers[rank].capacity_flops
        else:
            work = trace.duration_for(flops, start + overhead)
        # Without an overhead the sum is skipped, so every earlier result stays bit-identical.
        return work if overhead == 0.0 else overhead + work

    def capacity_change_times(self) -> list[float]:
        """Every time (> 0) at which some worker's capacity changes, sorted."""
        return sorted({t for tr in self._capacity_traces.values() for t in tr.times[1:]})

    def bandwidth_change_times(self) -> list[float]:
        """Every time (> 0) at which some resource's bandwidth changes, sorted."""
        return sorted({t for tr in self._bandwidth_traces.values() for t in tr.times[1:]})

    def bandwidth_epoch(self, t: float) -> int:
        """Which piece of the piecewise-constant bandwidth traces `t` falls in: at two times
        with the same epoch every resource has the same capacity (no traces: always 0)."""
        if self._bandwidth_epochs is None:
            times = {t for tr in self._bandwidth_traces.values() for t in tr.times}
            self._bandwidth_epochs = sorted(times)
        return bisect.bisect_right(self._bandwidth_epochs, t)

    def with_dynamics(self, dyn: DynamicsConfig, horizon: float) -> Cluster:
        """This cluster with the capacity and bandwidth traces of `dyn` (later entries for
        the same worker or resource replace earlier ones); random traces up to `horizon` s.

        A `sites` bandwidth trace varies the pipes between the two sites (both directions)
        and every per-pair link between them (the same site twice: the links inside it). A
        `workers` trace varies that pair's own link; for a pair that talks through a site
        pipe it adds a cap of that pair alone on top of the pipe (relative values scale the
        pipe's bandwidth), so it can slow the pair, never speed it past the pipe."""
        capacity: dict[int, Trace] = {}
        for i, cap in enumerate(dyn.capacity):
            trace = build_trace(cap, horizon, f"dynamics.capacity.{i}")
            base = 1e9 if cap.absolute else self.workers[cap.worker].capacity_flops
            capacity[cap.worker] = trace.scaled(base)
        bandwidth: dict[Resource, Trace] = {}
        routes = dict(self._routes)
        for i, spec in enumerate(dyn.bandwidth):
            trace = build_trace(spec, horizon, f"dynamics.bandwidth.{i}")
            for resource in self._traced(spec.sites, spec.workers):
                kind, a, b = resource
                pair = (int(a), int(b)) if kind == "link" else (-1, -1)
                if pair in routes and resource not in routes[pair]:
                    # A cap of this pair alone, on top of its shared route.
                    routes[pair] = (*routes[pair], resource)
                base = MBPS if spec.absolute else self._base_capacity(resource)
                bandwidth[resource] = trace.scaled(base)
        return Cluster(
            self.workers, self._links, capacity, bandwidth, routes=routes, shared=self._shared
        )

    def _base_capacity(self, resource: Resource) -> float:
        """Capacity of `resource` before any trace (a pair cap's base: its lone-flow rate)."""
        kind, a, b = resource
        if kind == "link":
            return self._links[(int(a), int(b))].bandwidth
        return self._shared[resource]

    def _traced(
        self, sites: tuple[str, str] | None, ranks: tuple[int, int] | None
    ) -> list[Resource]:
        if ranks is not None:
            a, b = ranks
            return [("link", a, b), ("link", b, a)]
        ends = set(sites or ())
        out: list[Resource] = []
        if sites is not None and sites[0] != sites[1]:
            out += [("site", sites[0], sites[1]), ("site", sites[1], sites[0])]
        out += [
            ("link", a.rank, b.rank)
            for a in self.workers
            for b in self.workers
            if a.rank != b.rank and {a.site, b.site} == ends and not self.is_shared(a.rank, b.rank)
        ]
        return [r for r in out if r[0] != "site" or r in self._shared]

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
                workers.append(
                    Worker(
                        len(workers),
                        entry.site,
                        entry.capacity_gflops * 1e9,
                        nic,
                        entry.step_overhead_ms / 1e3,
                    )
                )
        sites = {s.name: s for s in cfg.sites}
        site_links: dict[frozenset[str], tuple[float, float]] = {}
        pair_links: dict[frozenset[int], tuple[float, float]] = {}
        for i, link in enumerate(cfg.links):
            value = (link.bandwidth_mbps * MBPS, link.latency_ms / 1e3)
            if link.sites is not None:
                site_links[frozenset(link.sites)] = value
            elif link.workers is not None:
                ra, rb = link.workers
                if not (0 <= ra < len(workers) and 0 <= rb < len(workers)) or ra == rb:
                    raise ConfigError(
                        f"cluster.links.{i}.workers: ranks must be two different workers "
                        f"in 0..{len(workers) - 1}, got {list(link.workers)}"
                    )
                pair_links[frozenset((ra, rb))] = value
        links: dict[tuple[int, int], Link] = {}
        routes: dict[tuple[int, int], tuple[Resource, ...]] = {}
        shared: dict[Resource, float] = {}
        for a in workers:
            for b in workers:
                if a.rank == b.rank:
                    continue
                if frozenset((a.rank, b.rank)) in pair_links:
                    bw, lat = pair_links[frozenset((a.rank, b.rank))]
                elif a.site == b.site:
                    site = sites[a.site]
                    bw, lat = site_links.get(
                        frozenset((a.site,)),
                        (site.intra_bandwidth_mbps * MBPS, site.intra_latency_ms / 1e3),
                    )
                else:
                    bw, lat = site_links.get(
                        frozenset((a.site, b.site)),
                        (
                            cfg.default_inter_bandwidth_mbps * MBPS,
                            cfg.default_inter_latency_ms / 1e3,
                        ),
                    )
                    route: list[Resource] = [("site", a.site, b.site)]
                    shared[route[0]] = bw
                    up, down = sites[a.site].uplink_mbps, sites[b.site].downlink_mbps
                    if up is not None:
                        route.append(("up", a.site, ""))
                        shared[route[-1]] = up * MBPS
                    if down is not None:
                        route.append(("down", b.site, ""))
                        shared[route[-1]] = down * MBPS
                    routes[(a.rank, b.rank)] = tuple(route)
                    bw = min(shared[r] for r in route)
                links[(a.rank, b.rank)] = Link(bw, lat)
        return cls(workers, links, routes=routes, shared=shared)
