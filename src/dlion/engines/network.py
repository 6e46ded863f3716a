"""Fluid network model for the sim: max-min fair sharing of links and NICs, on a virtual clock.

A transfer is a flow of bytes from one worker to another. Its rate is limited by its
link's bandwidth (shared by every flow on that directed link) and, where configured, by
the sender's NIC egress and the receiver's NIC ingress (shared by every flow through that
NIC). Rates are the max-min fair allocation (progressive filling), recomputed whenever a
flow starts or ends; a flow finishes when its bytes are through. Latency is added by the
caller on delivery, so a lone message takes exactly latency + size / bandwidth.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from dlion.cluster import Cluster

# A flow with fewer bytes left than this is done: absorbs float rounding of rate * time.
_DONE_BYTES = 1e-3
# Relative slack below which a resource counts as saturated during progressive filling.
_SATURATED = 1e-12


@dataclass(eq=False)
class _Flow:
    src: int
    dst: int
    remaining: float
    done: asyncio.Future[None]
    resources: list[tuple[str, int, int]] = field(default_factory=list)
    rate: float = 0.0


class Network:
    def __init__(self, loop: asyncio.AbstractEventLoop, cluster: Cluster) -> None:
        self._loop = loop
        self._cluster = cluster
        self._flows: list[_Flow] = []
        self._last_update = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self.bytes_moved = 0.0

    def _capacity(self, resource: tuple[str, int, int]) -> float:
        kind, a, b = resource
        if kind == "link":
            return self._cluster.link(a, b).bandwidth
        nic = self._cluster.workers[a].nic_bytes_per_s
        return math.inf if nic is None else nic

    def _resources(self, src: int, dst: int) -> list[tuple[str, int, int]]:
        out = [("link", src, dst)]
        if self._cluster.workers[src].nic_bytes_per_s is not None:
            out.append(("out", src, 0))
        if self._cluster.workers[dst].nic_bytes_per_s is not None:
            out.append(("in", dst, 0))
        return out

    async def transfer(self, src: int, dst: int, nbytes: int) -> float:
        """Carry `nbytes` from src to dst; returns the transmission time (latency excluded)."""
        start = self._loop.time()
        if nbytes <= 0:
            return 0.0
        flow = _Flow(src, dst, float(nbytes), self._loop.create_future())
        flow.resources = self._resources(src, dst)
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
            moved = f.rate * elapsed
            f.remaining -= moved
            self.bytes_moved += moved
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
        """Max-min fair rates by progressive filling: raise all unfrozen flows together until
        a resource saturates, freeze the flows through it, repeat."""
        remaining_cap: dict[tuple[str, int, int], float] = {}
        users: dict[tuple[str, int, int], int] = {}
        for f in self._flows:
            f.rate = 0.0
            for r in f.resources:
                if r not in remaining_cap:
                    remaining_cap[r] = self._capacity(r)
                    users[r] = 0
                users[r] += 1
        active = list(self._flows)
        while active:
            share = min(remaining_cap[r] / n for r, n in users.items() if n > 0)
            for f in active:
                f.rate += share
            for r, n in users.items():
                if n > 0:
                    remaining_cap[r] -= share * n
            saturated = {
                r
                for r, n in users.items()
                if n > 0 and remaining_cap[r] <= _SATURATED * self._capacity(r)
            }
            still_active = []
            for f in active:
                if any(r in saturated for r in f.resources):
                    for r in f.resources:
                        users[r] -= 1
                else:
                    still_active.append(f)
            active = still_active
