"""Sender-side link shaping for the dist engine: a paced queue per link and per NIC.

Each link (and each NIC, when the scenario gives one) is a pacer with a rate in bytes/s:
a message of S bytes occupies it for S / rate seconds, after whatever it is already
busy with. This is a token bucket with no burst allowance: the sim's serialization
time, reproduced in wall time. A message leaves when both its link and its NIC are
free and arrives after the link's latency. All times are wall seconds already
multiplied by the run's time scale, so shaping and compute throttling stretch alike.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """Pacers for one sender's outgoing links and its NIC."""

    def __init__(self, link_rates: dict[int, float], nic_rate: float | None) -> None:
        self._links = {peer: Pacer(rate) for peer, rate in link_rates.items()}
        self._nic = Pacer(nic_rate) if nic_rate is not None else None

    def set_rate(self, peer: int, rate: float) -> None:
        """A link's bandwidth changed (a trace): later messages are paced at the new rate."""
        self._links[peer].rate = rate

    def reserve(self, peer: int, now: float, nbytes: int) -> float:
        """When a message of `nbytes` sent to `peer` at `now` has fully left this host."""
        done = self._links[peer].reserve(now, nbytes)
        if self._nic is not None:
            # Sharing the NIC: transfers to different peers queue behind each other there.
            done = max(done, self._nic.reserve(now, nbytes))
        return done
