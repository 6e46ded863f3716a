"""One process of a job on real processes, apart from its role: store clients, the loop
with its monitor thread and signals, frames, peer heartbeats and links, the stop. Used by
a strategy's worker (engines/dist.py) and the FL server or a client (fl/processes.py); a
subclass sets `ctx`, `log` and `transport` and defines the three hooks."""

from __future__ import annotations

import abc
import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from dlion.comm.codec import BadFrame, decode_from
from dlion.comm.job import (
    Keys,
    call_from_thread,
    cancel_others,
    first_line,
    heartbeat_stale,
    store_get_json,
    store_has,
)
from dlion.comm.shaping import LinkShaper
from dlion.comm.transport import PairTransport

if TYPE_CHECKING:
    import torch.distributed as dist

    from dlion.comm.messages import Message
    from dlion.report import MetricsLog


T = TypeVar("T")


async def stretched(work: Callable[[], T], target: float) -> tuple[T, float]:
    """Run `work` now, then sleep what is left of `target` wall seconds (a real step
    stretched to what the emulated device would take). Returns the work's result and its
    real seconds; at or above `target`, an overrun: no sleep."""
    start = time.perf_counter()
    result = work()
    measured = time.perf_counter() - start
    if target > measured:
        await asyncio.sleep(target - measured)
    return result, measured


class _Context(Protocol):
    rejected: int

    def now(self) -> float: ...

    def record(self, event: str, **fields: Any) -> None: ...

    def latency(self, peer: int) -> float: ...


class PeerProcess(abc.ABC):
    """One process of a job: its rank, store clients, loop, monitor thread and stop."""

    ctx: _Context
    log: MetricsLog
    transport: PairTransport
    shaper: LinkShaper  # paces `_paced_send`
    incarnation: int  # which registration of its rank this process is

    def __init__(
        self, rank: int, store_factory: Callable[[], dist.Store], *, peer_timeout: float
    ) -> None:
        self.rank = rank
        # One store client per thread that talks to the store: a client serializes its
        # calls, and a rendezvous blocked in one must not hold up heartbeats or another.
        self._store_factory = store_factory
        self.store = store_factory()
        self.peer_timeout = peer_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_reason: str | None = None
        self._stop_event: asyncio.Event | None = None  # made on the loop as the run begins
        self._stopped = threading.Event()  # the run is over: the monitor thread ends
        self._ending = False  # the run is ending: links closing now are no news

    @abc.abstractmethod
    def _deliver(self, msg: Message) -> None:
        """On the loop: a decoded message from the transport."""

    @abc.abstractmethod
    def _peer_gone(self, peer: int, why: str) -> None:
        """On the loop: `peer` failed, left or went silent."""

    @abc.abstractmethod
    def _watch(self, store: dist.Store) -> float:
        """Monitor thread: one round (heartbeat, peers, flags); the seconds to the next."""

    def _run_loop(
        self, main: Coroutine[Any, Any, None], signals: Mapping[signal.Signals, Callable[[], None]]
    ) -> None:
        """Run `main` on this process's loop (made here if there is none yet) beside the
        monitor thread, with `signals` handled on the loop; close both and the log after."""
        loop = self.loop or asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        for sig, handler in signals.items():
            loop.add_signal_handler(sig, handler)
        threading.Thread(target=self._monitor, daemon=True, name="monitor").start()
        try:
            loop.run_until_complete(main)
        finally:
            self._stopped.set()
            self.log.close()
            loop.close()

    def _stop_signal(self) -> asyncio.Event:
        """On the loop: the event `stop` sets (set already if a stop came before the run)."""
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
            if self.stop_reason is not None:
                self._stop_event.set()
        return self._stop_event

    def stop(self, reason: str) -> None:
        """On the loop: end the run; the first reason given is the one kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._stop_event is not None:
            self._stop_event.set()

    async def _until_stopped(self, task: asyncio.Future[Any]) -> None:
        """Wait for `task` or the stop, whichever is first, then end the run's tasks."""
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self._stop_signal().wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        self._ending = True
        await self._end_tasks(task)

    @staticmethod
    async def _end_tasks(task: asyncio.Future[Any]) -> None:
        """Cancel every other task of the loop; re-raise `task`'s error, if it failed."""
        await cancel_others()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    def _from_thread(self, fn: Callable[..., object], *args: object) -> None:
        call_from_thread(self.loop, fn, *args)

    def _monitor(self) -> None:
        """Monitor thread, with a store client of its own: `_watch` rounds until the run is
        over; a lost store ends the run."""
        try:
            store = self._store_factory()
            while not self._stopped.is_set():
                self._stopped.wait(self._watch(store))
        except Exception as err:  # the store is gone: the job is over
            self.log.write("store_lost", t=self.ctx.now(), rank=self.rank, why=str(err))
            self._from_thread(self.stop, "store lost")

    def _beat(self, store: dist.Store, **fields: float) -> None:
        """Publish this process's heartbeat: wall time, incarnation and `fields`."""
        beat = {"wall": time.time(), "incarnation": self.incarnation, **fields}
        store.set(Keys.heartbeat(self.rank), json.dumps(beat))

    def _check_heartbeat(
        self, store: dist.Store, peer: int, incarnation: int
    ) -> dict[str, Any] | None:
        """Monitor thread: `peer`'s heartbeat record (None: none yet); a stale one (comm/
        job.py `heartbeat_stale`) drops the peer."""
        if not store_has(store, Keys.heartbeat(peer)):
            return None
        record = store_get_json(store, Keys.heartbeat(peer))
        if heartbeat_stale(record, incarnation, time.time(), self.peer_timeout):
            self._from_thread(self._peer_gone, peer, f"no heartbeat for {self.peer_timeout:g} s")
        return record

    def _pair_transport(
        self,
        backend: str,
        max_message_mb: float,
        on_timing: Callable[[int, int, float, float], None] | None = None,
    ) -> PairTransport:
        """Pair links whose frames, failures and refusals come to this process's handlers."""
        return PairTransport(
            self._store_factory,
            self.rank,
            backend=backend,
            max_frame_bytes=int(max_message_mb * 1e6),
            on_frame=self._on_frame,
            on_failure=lambda peer, why: self._from_thread(self._peer_gone, peer, why),
            on_refused=lambda peer, why: self._from_thread(self._reject, peer, why),
            on_timing=on_timing,
        )

    async def _paced_send(self, dst: int, frame: bytes, start: float) -> float:
        """Send `frame` to `dst` paced by the shaper from `start` (monotonic), due there a
        link latency after its last byte; the seconds it holds the link (0: link gone)."""
        done = self.shaper.reserve(dst, start, len(frame))
        if not self.transport.send(dst, frame, due=done + self.ctx.latency(dst)):
            return 0.0
        await asyncio.sleep(done - start)
        return done - start

    def _link(self, peer: int, label: str, failed: str) -> bool:
        """A thread of its own: form the pair link `label` with `peer`; False (and the
        event `failed` logged) if the peer cannot be reached."""
        try:
            self.transport.connect(peer, incarnation=label)
        except Exception as err:  # it died during its start-up: it never takes part
            self.log.write(failed, t=self.ctx.now(), rank=self.rank, peer=peer, why=first_line(err))
            return False
        return True

    def _on_frame(self, peer: int, frame: memoryview) -> None:
        """Receiver thread: decode off the loop, then deliver (or reject) on it."""
        limit = self.transport.max_frame_bytes
        try:
            msg = decode_from(frame, peer=peer, me=self.rank, max_bytes=limit)
        except BadFrame as err:
            self._from_thread(self._reject, peer, str(err))
        else:
            self._from_thread(self._deliver, msg)

    def _reject(self, peer: int, why: str) -> None:
        self.ctx.rejected += 1
        self.ctx.record("rejected", src=peer, why=why)
