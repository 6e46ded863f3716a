"""Fluid network model for the sim: max-min fair sharing of links, site pipes and NICs, on a
virtual clock.

A transfer is a flow of bytes from one worker to another along its path
(`Cluster.path`): its own link inside a site or on a per-pair entry; between sites the
pipe from its site to the other (shared by every flow between the two sites, that
direction), and the sites' WAN uplink / downlink where given; and, where configured, the
sender's NIC egress and the receiver's NIC ingress. Every resource is shared by all flows
through it. Rates are the max-min fair allocation (progressive filling), recomputed
whenever a flow starts or ends; a flow finishes when its bytes are through. Latency is
added by the caller on delivery, so a lone message takes exactly latency + size / the
smallest capacity on its path.

Example: workers 0, 1 in site a and 2, 3 in site b, a 1 MB/s pipe a -> b. Flows 0->2 and
1->3 at once each get 0.5 MB/s; all four a -> b pairs at once, 0.25 MB/s each.

`all_to_all_rates` is what strategies are told to expect (`ctx.bandwidth` seeds): each
pair's max-min share when every worker sends to every other at once, the pattern of the
decentralized strategies, over links and pipes (NICs left to the observed throughput).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from dlion.cluster.topology import Cluster, Resource

# A flow with fewer bytes left than this is done: absorbs float rounding of rate * time.
_DONE_BYTES = 1e-3
# Relative slack below which a resource counts as saturated during progressive filling.
_SATURATED = 1e-12
# Remembered rate allocations (one per set of concurrent paths); the cache starts over
# when full, which bounds its memory at scale.
_RATE_CACHE_ENTRIES = 4096

R = TypeVar("R", bound=Hashable)


@dataclass(eq=False)
class _Flow:
    src: int
    dst: int
    remaining: float
    done: asyncio.Future[None]
    resources: tuple[Resource, ...] = ()
    path_id: int = 0  # the same id for every flow along the same path
    rate: float = 0.0


class Network:
    def __init__(self, loop: asyncio.AbstractEventLoop, cluster: Cluster) -> None:
        self._loop = loop
        self._cluster = cluster
        self._flows: list[_Flow] = []
        self._last_update = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        # Paths by (src, dst), with an id each; rates by path, by (bandwidth epoch, sorted
        # path ids of the flows). Rates depend only on the paths and the capacities, so a
        # set of concurrent flows seen before (every synchronous iteration repeats its
        # pattern) gets the very numbers computed the first time.
        self._paths: dict[tuple[int, int], tuple[tuple[Resource, ...], int]] = {}
        self._rate_cache: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}

    async def transfer(self, src: int, dst: int, nbytes: int) -> float:
        """Carry `nbytes` from src to dst; returns the transmission time (latency excluded)."""
        start = self._loop.time()
        if nbytes <= 0:
            return 0.0
        flow = _Flow(src, dst, float(nbytes), self._loop.create_future())
        flow.resources, flow.path_id = self._path(src, dst)
        self._progress()
        self._flows.append(flow)
        self._schedule_update()
        try:
            await flow.done
        except asyncio.CancelledError:
            # The sender stopped (it left or crashed): its bytes stop flowing at once.
            self._progress()
            if flow in self._flows:
                self._flows.remove(flow)
                self._schedule_update()
            raise
        return self._loop.time() - start

    def _path(self, src: int, dst: int) -> tuple[tuple[Resource, ...], int]:
        known = self._paths.get((src, dst))
        if known is None:
            known = self._paths[(src, dst)] = (self._cluster.path(src, dst), len(self._paths))
        return known

    def rerate(self) -> None:
        """A link's bandwidth changes now: move flows on at their old rates up to now,
        then share the new capacities."""
        self._update()

    def _schedule_update(self) -> None:
        # Flows started at the same instant share one rate recomputation.
        if not self._dirty:
            self._dirty = True
            self._loop.call_soon(self._update)

    def _progress(self) -> None:
        """Move every flow forward at its current rate up to now; finish completed flows."""
        now = self._loop.time()
        elapsed = now - self._last_update
        if elapsed <= 0:
            return  # nothing moved since the last update (many flows start at one instant)
        self._last_update = now
        for f in self._flows:
            f.remaining -= f.rate * elapsed
        still: list[_Flow] = []
        for f in self._flows:
            if f.remaining <= _DONE_BYTES:
                if not f.done.done():
                    f.done.set_result(None)
            else:
                still.append(f)
        self._flows = still

    def _update(self) -> None:
        self._dirty = False
        self._progress()
        self._assign_rates()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flows:
            soonest = min(f.remaining / f.rate for f in self._flows)
            self._timer = self._loop.call_later(soonest, self._update)

    def _assign_rates(self) -> None:
        now = self._loop.time()
        # Flows along one path get one rate, and the allocation does not depend on the
        # flows' order (max_min_rates): the sorted path ids name it.
        key = (self._cluster.bandwidth_epoch(now), tuple(sorted(f.path_id for f in self._flows)))
        by_path = self._rate_cache.get(key)
        if by_path is None:
            rates = max_min_rates(
                [f.resources for f in self._flows],
                lambda r: self._cluster.resource_capacity(r, now),
            )
            by_path = {f.path_id: rate for f, rate in zip(self._flows, rates, strict=True)}
            if len(self._rate_cache) >= _RATE_CACHE_ENTRIES:
                self._rate_cache.clear()
            self._rate_cache[key] = by_path
        for f in self._flows:
            f.rate = by_path[f.path_id]


def max_min_rates(paths: Sequence[Sequence[R]], capacity: Callable[[R], float]) -> list[float]:
    """Max-min fair rates of flows crossing `paths` (resources with `capacity`), by
    progressive filling: raise all unfrozen flows together until a resource saturates,
    freeze the flows through it, repeat. Deterministic, and independent of the flows'
    order (each round's share is a minimum, each resource's capacity is reduced once per
    round), so flows along the same path get the same rate.

    The fill level is one running sum (0 + share_1 + share_2 + ...), and a flow's rate is
    the level at which it froze: the same additions, in the same order, as adding each
    round's share to every unfrozen flow, without touching every flow in every round. A
    saturated resource freezes the flows listed under it, so a round costs the resources
    still in use, not the flows times their paths."""
    remaining_cap: dict[R, float] = {}
    full: dict[R, float] = {}
    users: dict[R, int] = {}
    flows_of: dict[R, list[int]] = {}
    for i, path in enumerate(paths):
        for r in path:
            if r not in remaining_cap:
                remaining_cap[r] = full[r] = capacity(r)
                users[r] = 0
                flows_of[r] = []
            users[r] += 1
            flows_of[r].append(i)
    rates = [0.0] * len(paths)
    frozen = [False] * len(paths)
    unfrozen = sum(1 for path in paths if path)
    in_use = list(remaining_cap)
    level = 0.0
    while unfrozen:
        share = min(remaining_cap[r] / users[r] for r in in_use)
        level += share
        saturated = []
        for r in in_use:
            remaining_cap[r] -= share * users[r]
            if remaining_cap[r] <= _SATURATED * full[r]:
                saturated.append(r)
        for r in saturated:
            for i in flows_of[r]:
                if not frozen[i]:
                    frozen[i] = True
                    rates[i] = level
                    unfrozen -= 1
                    for q in paths[i]:
                        users[q] -= 1
        in_use = [r for r in in_use if users[r] > 0]
    return rates


def all_to_all_rates(cluster: Cluster, t: float = 0.0) -> dict[tuple[int, int], float]:
    """Bytes/s of each directed pair when every worker sends to every other at once, over
    links and site pipes (NICs excluded): what a strategy can expect per flow."""
    pairs = [(a, b) for a in range(cluster.size) for b in range(cluster.size) if a != b]
    rates = max_min_rates(
        [cluster.route(a, b) for a, b in pairs],
        lambda r: cluster.resource_capacity(r, t),
    )
    return dict(zip(pairs, rates, strict=True))
