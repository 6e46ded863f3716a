"""An asyncio event loop whose clock is virtual: when every coroutine waits, time jumps.

asyncio asks its selector to wait `timeout` seconds for I/O until the next timer is due.
Here the selector polls without blocking and, if nothing is ready, advances the virtual
clock by `timeout` instead of sleeping. Everything else (tasks, timers, wait_for, gather)
is stock asyncio, so strategy code is the same under a real loop.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any

from dlion.core.errors import SimulationError


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        # The sim does no I/O: the only file registered is the loop's own wake-up pipe,
        # which only other threads write to. Poll it only when the clock would jump, not
        # on every turn of the loop (one system call per callback batch otherwise).
        if timeout == 0:
            return []
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            # Nothing is scheduled and nothing is ready: every coroutine waits on another.
            raise SimulationError("simulation deadlock: every worker waits and no event is due")
        if timeout > 0:
            # Jump exactly to the next timer's due time (now + timeout could be off by an
            # ulp, which would make timings drift from the model's exact values).
            scheduled = self.loop._scheduled if self.loop is not None else []  # type: ignore[attr-defined]
            self.now = max(self.now, scheduled[0].when()) if scheduled else self.now + timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(selector=self._virtual)
        self._virtual.loop = self

    def time(self) -> float:
        return self._virtual.now
