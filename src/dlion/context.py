"""The WorkerContext API: all a strategy may use. Engines implement the abstract parts.

A strategy is an `async def worker(ctx, options)`; it computes gradients, sends and
receives typed messages, and updates `ctx.replica`. It never touches an engine directly,
so the same code runs on the virtual clock of the sim and on real processes.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dlion.comm.messages import Message, Payload, PeerGone, RecvResult, Timeout, tensor_problem
from dlion.replica import Replica


@dataclass(frozen=True)
class ComputeResult:
    grad: torch.Tensor  # flat mean gradient over the batch
    loss: float  # training loss on the batch
    samples: int  # batch size
    seconds: float  # compute time (virtual in the sim, measured in dist), no waiting included


class Mailbox:
    """Messages delivered to one worker, matched by (source, tag) in arrival order."""

    def __init__(self) -> None:
        self._pending: list[Message] = []
        self._waiters: list[tuple[int | None, str, asyncio.Future[RecvResult]]] = []
        self.gone: set[int] = set()

    def deliver(self, msg: Message) -> None:
        # Waiters whose receive timed out are done (cancelled); drop them first.
        self._waiters = [w for w in self._waiters if not w[2].done()]
        for i, (src, tag, fut) in enumerate(self._waiters):
            if tag == msg.tag and (src is None or src == msg.src):
                del self._waiters[i]
                fut.set_result(msg)
                return
        self._pending.append(msg)

    def take(self, src: int | None, tag: str) -> Message | None:
        for i, msg in enumerate(self._pending):
            if msg.tag == tag and (src is None or src == msg.src):
                return self._pending.pop(i)
        return None

    def wait(self, src: int | None, tag: str) -> asyncio.Future[RecvResult]:
        fut: asyncio.Future[RecvResult] = asyncio.get_running_loop().create_future()
        if src is not None and src in self.gone:
            fut.set_result(PeerGone(src))
        else:
            self._waiters.append((src, tag, fut))
        return fut

    def peer_left(self, rank: int) -> None:
        """Wake everyone waiting on `rank` with PeerGone; later receives from it fail at once."""
        self.gone.add(rank)
        keep = []
        for src, tag, fut in self._waiters:
            if src == rank and not fut.done():
                fut.set_result(PeerGone(rank))
            else:
                keep.append((src, tag, fut))
        self._waiters = keep


class WorkerContext(ABC):
    """What one worker's strategy can see and do. Shared logic lives here; engines fill in
    time, compute and transport."""

    def __init__(
        self,
        *,
        rank: int,
        world: list[int],
        sites: list[str],
        replica: Replica,
        global_batch: int,
        recv_timeout: float,
        bandwidth_seed: dict[int, float],
        latency: dict[int, float],
        bandwidth_ema: float = 0.5,
        header_bytes: int = 0,
        seed: int = 0,
    ) -> None:
        self.rank = rank
        self.replica = replica
        self.global_batch = global_batch
        self.recv_timeout = recv_timeout
        self._world = list(world)
        self._sites = sites
        self._bandwidth = dict(bandwidth_seed)
        self._latency = dict(latency)
        self._bandwidth_ema = bandwidth_ema
        self.header_bytes = header_bytes  # envelope charged on every message
        self.mailbox = Mailbox()
        # Strategies draw randomness (neighbour choice, sampling) only from here, so a run
        # is reproducible for a seed on any engine.
        self.rng = random.Random(seed * 100_003 + rank)
        self.bytes_sent = 0
        self.messages_sent = 0
        self.rejected = 0
        self.iteration = 0
        self.last_loss: float | None = None
        self._on_record: Callable[[int, str, dict[str, Any]], None] | None = None
        self._on_iteration: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- membership and links
    @property
    def world_size(self) -> int:
        return len(self._world)

    def peers(self) -> list[int]:
        """Live peers, in rank order (never includes this worker)."""
        return [r for r in self._world if r != self.rank and r not in self.mailbox.gone]

    def site(self, rank: int) -> str:
        return self._sites[rank]

    def bandwidth(self, peer: int) -> float:
        """Estimated bytes/s to `peer`: seeded from the config, then an EMA of observed sends."""
        return self._bandwidth[peer]

    def latency(self, peer: int) -> float:
        return self._latency[peer]

    def _observe_transfer(self, peer: int, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes > 0:
            a = self._bandwidth_ema
            self._bandwidth[peer] = (1 - a) * self._bandwidth[peer] + a * (nbytes / seconds)

    # ---------------------------------------------------------------- engine-specific parts
    @abstractmethod
    def now(self) -> float:
        """Seconds since the start of the run (virtual in the sim)."""

    @abstractmethod
    async def compute(self, batch_size: int) -> ComputeResult:
        """Gradient of the replica on its next batch; takes compute time."""

    @abstractmethod
    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        """Move `wire_bytes` to `dst` and deliver `msg` there after the link latency;
        return the transmission time (latency excluded)."""

    # ---------------------------------------------------------------- messaging
    async def send(
        self, dst: int, tag: str, payload: Payload, meta: dict[str, float] | None = None
    ) -> bool:
        """Send a message; returns when its bytes have left, False if `dst` is gone."""
        if dst in self.mailbox.gone:
            return False
        msg = Message(self.rank, dst, tag, payload, self.now(), dict(meta or {}))
        wire_bytes = msg.nbytes + self.header_bytes
        seconds = await self._transmit(dst, msg, wire_bytes)
        self.bytes_sent += wire_bytes
        self.messages_sent += 1
        self._observe_transfer(dst, wire_bytes, seconds)
        return True

    async def recv(
        self, src: int | None, tag: str, timeout: float | None = None, *, numel: int | None = None
    ) -> RecvResult:
        """Next message with `tag` from `src` (any source if None).

        Returns the Message, or Timeout after `timeout` (default: the engine's recv
        timeout), or PeerGone. A tensor payload that is malformed (wrong length when
        `numel` is given, wrong dtype, NaN/Inf) is rejected, counted, and waited past.
        """
        wait_for = self.recv_timeout if timeout is None else timeout
        deadline = self.now() + wait_for
        while True:
            msg = self.mailbox.take(src, tag)
            if msg is None:
                fut = self.mailbox.wait(src, tag)
                remaining = max(0.0, deadline - self.now())
                try:
                    msg_or_fail = await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return Timeout(src, tag, wait_for)
                if not isinstance(msg_or_fail, Message):
                    return msg_or_fail
                msg = msg_or_fail
            if tensor_problem(msg.payload, numel) is None:
                return msg
            self.rejected += 1
            self.record("rejected", src=msg.src, tag=tag, why=tensor_problem(msg.payload, numel))

    def poll(self, src: int | None, tag: str) -> Message | None:
        """A message already delivered with this tag, without waiting."""
        return self.mailbox.take(src, tag)

    # ---------------------------------------------------------------- bookkeeping
    def record(self, event: str, **fields: Any) -> None:
        """Log a strategy event (batch sizes, link budgets) into the run's metrics."""
        if self._on_record is not None:
            self._on_record(self.rank, event, fields)

    def iteration_done(self, loss: float) -> None:
        self.iteration += 1
        self.last_loss = loss
        if self._on_iteration is not None:
            self._on_iteration(self.rank)
