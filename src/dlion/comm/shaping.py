"""Sender-side link shaping for the dist engine: a paced queue per link, site pipe and NIC.

Each link (and each NIC, when the scenario gives one) is a pacer with a rate in bytes/s:
a message of S bytes occupies it for S / rate seconds, after whatever it is already
busy with. This is a token bucket with no burst allowance: the sim's serialization
time, reproduced in wall time. A message leaves when every pacer on its path and its NIC
are free and arrives after the link's latency. All times are wall seconds already
multiplied by the run's time scale, so shaping and compute throttling stretch alike.

Shared site pipes (and site uplinks/downlinks) are approximated per sender, since a
sender sees only its own traffic: each sender paces its own slice of a shared resource,
its capacity divided by the workers that may send through it (a pipe a -> b or a's
uplink: the workers of site a; b's downlink: the workers outside b). Messages from one
sender to several workers of a site queue on that slice. Exact when all workers of a site
send across at once (all-to-all exchange, the sim's all-to-all share); a sender that is
alone on a pipe gets only its slice where the sim and the kernel give it the whole pipe
(ring all-reduce crosses each pipe with one flow at a time).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from dlion.cluster.topology import Cluster, Resource
from dlion.core.timescale import TimeScale


@dataclass
class Pacer:
    rate: float  # bytes per wall second
    busy_until: float = 0.0

    def reserve(self, start: float, nbytes: int) -> float:
        """Occupy the pacer for `nbytes` from `start` (or when it frees); return the end."""
        begin = max(start, self.busy_until)
        self.busy_until = begin + nbytes / self.rate
        return self.busy_until


class LinkShaper:
    """Pacers for one sender's outgoing links (or slices of shared pipes) and its NIC.
    `paths[peer]` names the pacers a message to `peer` goes through (default: the one
    keyed by the peer itself)."""

    def __init__(
        self,
        link_rates: Mapping[Hashable, float],
        nic_rate: float | None,
        paths: Mapping[int, Sequence[Hashable]] | None = None,
    ) -> None:
        self._links = {key: Pacer(rate) for key, rate in link_rates.items()}
        self._nic = Pacer(nic_rate) if nic_rate is not None else None
        self._paths = dict(paths or {})

    def set_rate(self, key: Hashable, rate: float) -> None:
        """A link's bandwidth changed (a trace): later messages are paced at the new rate."""
        self._links[key].rate = rate

    def reserve(self, peer: int, now: float, nbytes: int) -> float:
        """When a message of `nbytes` sent to `peer` at `now` has fully left this host."""
        done = max(self._links[k].reserve(now, nbytes) for k in self._paths.get(peer, (peer,)))
        if self._nic is not None:
            # Sharing the NIC: transfers to different peers queue behind each other there.
            done = max(done, self._nic.reserve(now, nbytes))
        return done


def senders_sharing(cluster: Cluster, resource: Resource) -> int:
    """How many workers share `resource` as senders, in the per-sender approximation."""
    kind, a, _ = resource
    if kind in ("site", "up"):
        return sum(1 for w in cluster.workers if w.site == a)
    if kind == "down":
        return sum(1 for w in cluster.workers if w.site != a)
    return 1


def pacer_rate(cluster: Cluster, resource: Resource, t: float, scale: TimeScale) -> float:
    """Bytes per wall second of one sender's pacer for `resource` at scenario time `t`: a
    link's bandwidth, a shared resource's slice (see the module docstring)."""
    return scale.rate(cluster.resource_capacity(resource, t) / senders_sharing(cluster, resource))


def worker_shaper(cluster: Cluster, rank: int, scale: TimeScale) -> LinkShaper:
    """The transport shaper of worker `rank`: its routes' pacers (at t = 0) and its NIC."""
    nic = cluster.workers[rank].nic_bytes_per_s
    paths = {p: cluster.route(rank, p) for p in range(cluster.size) if p != rank}
    rates: dict[Hashable, float] = {
        r: pacer_rate(cluster, r, 0.0, scale) for path in paths.values() for r in path
    }
    return LinkShaper(
        rates,
        None if nic is None else scale.rate(nic),
        paths,
    )
