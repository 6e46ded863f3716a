"""The WorkerContext API: all a strategy may use. Engines implement the abstract parts.

A strategy is an `async def worker(ctx, options)`; it computes gradients, sends and
receives typed messages, and updates `ctx.replica`. It never touches an engine directly,
so the same code runs on the virtual clock of the sim and on real processes.

The engine side is public and explicit too (section "engine side" below): the hooks an
engine attaches, the membership changes its authority announces, the link estimates it
measures and the state a resumed worker gets back. `worker_setup` is the one place that
says what a strategy job's worker is told about itself and its peers, for every engine.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dlion.cluster.vector_cost import VectorCharger
from dlion.comm.collectives import ring_allreduce
from dlion.comm.messages import (
    Control,
    Dense,
    Message,
    Payload,
    PeerGone,
    RecvResult,
    Timeout,
    ViewChanged,
    tensor_problem,
)
from dlion.core.timescale import UNIT, TimeScale
from dlion.training.replica import Replica

if TYPE_CHECKING:
    from dlion.cluster.topology import Cluster
    from dlion.core.config import ExperimentConfig

# A tag no message carries: a guarded wait for it ends only at a membership change.
VIEW_TAG = "__view"
# Reserved tags of the state transfer that lets a joining worker start from the current
# model: a request (Control "state") and a reply (Dense params + optimizer state).
STATE_REQUEST = "__state?"
STATE_REPLY = "__state!"


@dataclass(frozen=True)
class ComputeResult:
    grad: torch.Tensor  # flat mean gradient over the batch
    loss: float  # training loss on the batch
    samples: int  # batch size
    seconds: float  # compute time (virtual in the sim, measured in dist), no waiting included


def tag_matches(pattern: str, tag: str) -> bool:
    """A receive's tag matches a message's tag when equal; a pattern ending in "*" matches
    every tag that starts with what comes before the star."""
    if pattern.endswith("*"):
        return tag.startswith(pattern[:-1])
    return tag == pattern


class Mailbox:
    """Messages delivered to one worker, matched by (source, tag) in arrival order; a tag
    ending in "*" is a prefix (`tag_matches`)."""

    def __init__(self) -> None:
        self._pending: list[Message] = []
        # (source, tag, future, guarded): a guarded waiter also wakes on a membership change.
        self._waiters: list[tuple[int | None, str, asyncio.Future[RecvResult], bool]] = []
        self.gone: set[int] = set()

    def deliver(self, msg: Message) -> None:
        # Waiters whose receive timed out are done (cancelled); drop them first.
        self._waiters = [w for w in self._waiters if not w[2].done()]
        for i, (src, tag, fut, _) in enumerate(self._waiters):
            if tag_matches(tag, msg.tag) and (src is None or src == msg.src):
                del self._waiters[i]
                fut.set_result(msg)
                return
        self._pending.append(msg)

    def take(self, src: int | None, tag: str) -> Message | None:
        for i, msg in enumerate(self._pending):
            if tag_matches(tag, msg.tag) and (src is None or src == msg.src):
                return self._pending.pop(i)
        return None

    def wait(self, src: int | None, tag: str, guarded: bool = False) -> asyncio.Future[RecvResult]:
        fut: asyncio.Future[RecvResult] = asyncio.get_running_loop().create_future()
        if src is not None and src in self.gone:
            fut.set_result(PeerGone(src))
        else:
            self._waiters.append((src, tag, fut, guarded))
        return fut

    def forget(self, fut: asyncio.Future[RecvResult]) -> None:
        """Withdraw a wait that is no longer wanted."""
        fut.cancel()
        self._waiters = [w for w in self._waiters if w[2] is not fut]

    def peer_left(self, rank: int) -> None:
        """Wake everyone waiting on `rank` with PeerGone; later receives from it fail at once."""
        self.gone.add(rank)
        keep = []
        for src, tag, fut, guarded in self._waiters:
            if src == rank and not fut.done():
                fut.set_result(PeerGone(rank))
            else:
                keep.append((src, tag, fut, guarded))
        self._waiters = keep

    def peer_joined(self, rank: int) -> None:
        """`rank` is back: receives from it wait again; what its previous incarnation sent
        and nobody took is dropped (it belongs to a membership that no longer exists)."""
        self.gone.discard(rank)
        self._pending = [m for m in self._pending if m.src != rank]

    def view_changed(self, epoch: int) -> None:
        """Wake every guarded waiter with ViewChanged."""
        keep = []
        for src, tag, fut, guarded in self._waiters:
            if guarded and not fut.done():
                fut.set_result(ViewChanged(epoch))
            else:
                keep.append((src, tag, fut, guarded))
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
        step_overhead: float = 0.0,
    ) -> None:
        self.rank = rank
        # The fixed cost of each of this worker's steps (context seconds), known from its
        # config: a strategy that splits batches by step time needs it (WDB, dlion.py).
        self.step_overhead = step_overhead
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
        # Membership. `epoch` counts the changes this worker has learned of (the engine's
        # membership authority numbers them, so all workers agree on an epoch's view);
        # `_since[r]` is the first iteration in which peer r takes part (0: from the start).
        self.epoch = 0
        self._since: dict[int, int] = dict.fromkeys(world, 0)
        self._incarnation: dict[int, int] = dict.fromkeys(world, 0)
        self._state_seq = 0
        self._background: set[asyncio.Task[Any]] = set()
        # Strategy state that checkpoints carry (residuals...): named tensors read through
        # a getter when a checkpoint is taken; `_restored`: tensors a resumed worker hands
        # back to its strategy, once each.
        self._kept: dict[str, Callable[[], torch.Tensor]] = {}
        self._restored: dict[str, torch.Tensor] = {}
        # Vector work (charged): set by the engine; None = vector work is free.
        self.vector: VectorCharger | None = None
        self.charged_s = 0.0  # modelled seconds of vector work paid (context seconds)
        # The same per asyncio task: what a strategy's own loop paid, without the work of
        # the background tasks it started (`charged_here`).
        self._charged_by_task: weakref.WeakKeyDictionary[asyncio.Task[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    # ---------------------------------------------------------------- membership and links
    @property
    def world_size(self) -> int:
        return len(self._world)

    def peers(self) -> list[int]:
        """Live peers, in rank order (never includes this worker)."""
        return [r for r in self._world if r != self.rank and r not in self.mailbox.gone]

    def members(self, iteration: int) -> list[int]:
        """Ranks taking part in `iteration` (this worker included), in rank order: the live
        peers admitted at or before it. A joining worker is admitted from an iteration no
        live worker has started yet, so bulk-synchronous strategies agree on who is in."""
        return sorted([self.rank, *(p for p in self.peers() if self._since.get(p, 0) <= iteration)])

    def peer_since(self, rank: int) -> int:
        """First iteration in which `rank` takes part (0 for a worker present from the start)."""
        return self._since.get(rank, 0)

    def incarnation(self, rank: int) -> int:
        """How many times `rank` has (re)joined as far as this worker knows: per-peer state
        (residuals, queues) keyed by (rank, incarnation) is never mixed across a return."""
        return self._incarnation.get(rank, 0)

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
        await self._send_message(dst, tag, payload, meta)
        return True

    async def _send_message(
        self, dst: int, tag: str, payload: Payload, meta: dict[str, float] | None
    ) -> None:
        """Charge and transmit one message (no membership check: the state reply goes to
        a joining worker that its peers do not count as live yet)."""
        msg = Message(self.rank, dst, tag, payload, self.now(), dict(meta or {}))
        wire_bytes = msg.nbytes + self.header_bytes
        seconds = await self._transmit(dst, msg, wire_bytes)
        self.bytes_sent += wire_bytes
        self.messages_sent += 1
        self._observe_transfer(dst, wire_bytes, seconds)

    async def recv(
        self,
        src: int | None,
        tag: str,
        timeout: float | None = None,
        *,
        numel: int | None = None,
        epoch: int | None = None,
    ) -> RecvResult:
        """Next message with `tag` from `src` (any source if None).

        Returns the Message, or Timeout after `timeout` (default: the engine's recv
        timeout), or PeerGone. With `epoch` (the membership epoch the caller planned for),
        returns ViewChanged as soon as the membership differs from that epoch's, so a
        collective never waits on a member that is busy re-forming. A tensor payload that
        is malformed (wrong length when `numel` is given, wrong dtype, NaN/Inf) is
        rejected, counted, and waited past.
        """
        wait_for = self.recv_timeout if timeout is None else timeout
        deadline = self.now() + wait_for
        while True:
            if epoch is not None and epoch != self.epoch:
                return ViewChanged(self.epoch)
            msg = self.mailbox.take(src, tag)
            if msg is None:
                fut = self.mailbox.wait(src, tag, guarded=epoch is not None)
                remaining = max(0.0, deadline - self.now())
                try:
                    msg_or_fail = await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return Timeout(src, tag, wait_for)
                if not isinstance(msg_or_fail, Message):
                    return msg_or_fail
                msg = msg_or_fail
            problem = tensor_problem(msg.payload, numel)
            if problem is None:
                return msg
            self.reject(msg, problem)

    def reject(self, msg: Message, why: str) -> None:
        """Count and log a malformed message that is never applied."""
        self.rejected += 1
        self.record("rejected", src=msg.src, tag=msg.tag, why=why)

    async def allreduce_sum(
        self, vector: torch.Tensor, tag: str, *, ranks: list[int], epoch: int | None = None
    ) -> torch.Tensor:
        """Sum `vector` over `ranks` (this worker among them): a plain dense all-reduce,
        the same result at every member. Raises CollectiveFailed when a member leaves or
        fails, or (with `epoch`, the membership epoch the group was planned in) as soon as
        the membership changes, at every member; the caller re-forms (`regroup`).

        Here, and so in the sim, it is the ring of point-to-point messages of
        `ring_allreduce` (`tag` names its messages), which the network charges chunk by
        chunk; the dist engine runs one torch.distributed collective instead on unshaped
        links (on shaped ones, this ring too)."""
        return await ring_allreduce(self, vector, tag, ranks=ranks, epoch=epoch)

    def view_change(self, epoch: int | None) -> asyncio.Future[RecvResult]:
        """A future that resolves (ViewChanged) at the first membership change after
        `epoch`, at once if there has been one; never for None. `mailbox.forget` it when
        done waiting."""
        if epoch is None:
            return asyncio.get_running_loop().create_future()
        if epoch != self.epoch:
            fut: asyncio.Future[RecvResult] = asyncio.get_running_loop().create_future()
            fut.set_result(ViewChanged(self.epoch))
            return fut
        return self.mailbox.wait(None, VIEW_TAG, guarded=True)

    def poll(self, src: int | None, tag: str) -> Message | None:
        """A message already delivered with this tag, without waiting."""
        return self.mailbox.take(src, tag)

    # ---------------------------------------------------------------- engine side
    # Called by engines, never by strategies. Membership changes come from the engine's
    # membership authority (the sim's event schedule; a rendezvous or heartbeat layer in a
    # distributed engine); they only update this worker's view and wake whoever waits on it.

    def set_hooks(
        self,
        on_record: Callable[[int, str, dict[str, Any]], None],
        on_iteration: Callable[[int], None] | None = None,
    ) -> None:
        """Where this worker's events go (`record`: rank, event, fields) and whom its
        finished iterations are told (`iteration_done`: rank)."""
        self._on_record = on_record
        self._on_iteration = on_iteration

    def set_bandwidth(self, peer: int, bytes_per_s: float) -> None:
        """Replace the estimate of the link to `peer` (an engine that measures it itself)."""
        self._bandwidth[peer] = bytes_per_s

    def restore_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strategy state from a checkpoint, handed out once each by `restored_state`."""
        self._restored = dict(tensors)

    def peer_left(self, rank: int, epoch: int) -> None:
        """`rank` is gone (announced, or detected after the peer timeout): it leaves
        `peers()`, receives waiting on it return PeerGone, guarded receives ViewChanged."""
        self.epoch = epoch
        self.mailbox.peer_left(rank)
        self.mailbox.view_changed(epoch)

    def peer_joined(self, rank: int, since: int, epoch: int) -> None:
        """`rank` (new or returning) is live and takes part from iteration `since` on."""
        self.epoch = epoch
        if rank not in self._world:
            self._world = sorted([*self._world, rank])
        self._since[rank] = since
        self._incarnation[rank] = self._incarnation.get(rank, 0) + 1
        self.mailbox.peer_joined(rank)
        self.mailbox.view_changed(epoch)

    def set_view(self, live: dict[int, int], epoch: int, own_since: int = 0) -> None:
        """Initial view of a worker that starts now: live peers with their `since`
        iteration; every other rank of the world is gone until it joins. `own_since`:
        the iteration this worker is admitted from (0 for a worker present from the start)."""
        self.epoch = epoch
        self._since[self.rank] = own_since
        for r in self._world:
            if r == self.rank:
                continue
            if r in live:
                self._since[r] = live[r]
                self.mailbox.gone.discard(r)
            else:
                self.mailbox.gone.add(r)

    # ---------------------------------------------------------------- state transfer
    async def serve_state(self) -> None:
        """Answer state requests from joining peers with this replica's parameters,
        optimizer state and iteration, for the whole life of this worker. The engine runs
        it beside the strategy, so any live worker can be the donor."""
        while True:
            msg = await self.recv(None, STATE_REQUEST)
            if not isinstance(msg, Message) or not isinstance(msg.payload, Control):
                continue  # a quiet spell (Timeout): keep serving
            # The snapshot is taken now, with no await before it: a consistent state.
            state = Dense(self.replica.state_vector())
            reply = f"{STATE_REPLY}{msg.payload.data.get('seq', 0)}"
            meta = {"iteration": float(self.iteration)}
            self._spawn(self._send_message(msg.src, reply, state, meta))

    async def fetch_state(self, peer: int, timeout: float | None = None) -> bool:
        """Adopt `peer`'s current parameters, optimizer state and iteration count.
        False (and nothing changed) if the peer is gone or does not answer in time."""
        self._state_seq += 1
        if not await self.send(peer, STATE_REQUEST, Control("state", {"seq": self._state_seq})):
            return False
        numel = self.replica.state_numel
        got = await self.recv(peer, f"{STATE_REPLY}{self._state_seq}", timeout, numel=numel)
        if not isinstance(got, Message) or not isinstance(got.payload, Dense):
            self.record("state_fetch_failed", peer=peer, why=repr(got))
            return False
        self.replica.load_state_vector(got.payload.values)
        self.iteration = int(got.meta.get("iteration", self.iteration))
        return True

    async def join_from_live_peer(self) -> int | None:
        """Start from the current model: fetch state from the live peers in rank order
        until one answers; returns the donor (None if nobody answered)."""
        for peer in self.peers():
            if await self.fetch_state(peer):
                return peer
        return None

    def _spawn(self, coro: Any) -> None:
        # Keep a reference until done: the loop holds tasks only weakly.
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- strategy state
    def keep_state(self, name: str, get: Callable[[], torch.Tensor]) -> None:
        """Put strategy state (e.g. a link's residual) into this worker's checkpoints; `get`
        is called when one is taken. A later call with the same name replaces it."""
        self._kept[name] = get

    def drop_state(self, name: str) -> None:
        self._kept.pop(name, None)

    def strategy_state(self) -> dict[str, torch.Tensor]:
        """Copies of the kept state tensors, by name."""
        return {name: get().detach().clone() for name, get in sorted(self._kept.items())}

    def restored_state(self, name: str) -> torch.Tensor | None:
        """State named `name` from the checkpoint this worker resumed from (None if there is
        none); each name is handed out once, so a later re-creation starts fresh."""
        return self._restored.pop(name, None)

    # ---------------------------------------------------------------- vector work
    @asynccontextmanager
    async def charged(self, kind: str, numel: int, ops: int = 1) -> AsyncIterator[None]:
        """Pay for the vector work done inside the block (`dlion.cluster.vector_cost`): `ops`
        calls of `kind` over `numel` elements in all. The sim advances this worker's clock
        by the modelled seconds at the end of the block; the dist engine sleeps what the
        real work left of them (an overrun is counted when it took longer). Free when
        the run turns charging off (`engine.charge_vector_work: false`)."""
        start = time.perf_counter()
        yield
        if self.vector is None:
            return
        modelled = self.vector.seconds(kind, numel, ops, self.now())
        self.charged_s += modelled
        task = asyncio.current_task()
        if task is not None:
            self._charged_by_task[task] = self._charged_by_task.get(task, 0.0) + modelled
        await self.pay_vector_work(modelled, time.perf_counter() - start)

    def charged_here(self) -> float:
        """Modelled seconds of vector work paid so far by the calling task's own blocks,
        not by the tasks it started: a strategy's main loop measures its own step cost
        with it while its background senders' work runs beside it."""
        task = asyncio.current_task()
        return self.charged_s if task is None else self._charged_by_task.get(task, 0.0)

    async def pay_vector_work(self, modelled: float, real_s: float) -> None:
        """Engine side: spend `modelled` context seconds of vector work whose real run took
        `real_s`. On a virtual clock the real run is free and the model is all."""
        await asyncio.sleep(modelled)

    async def charge(self, kind: str, numel: int, ops: int = 1) -> None:
        """Pay for vector work whose real cost is negligible here or already paid (a
        block with nothing in it): `async with self.charged(...)` is preferred."""
        async with self.charged(kind, numel, ops):
            pass

    async def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step of the replica with `grad` (`replica.apply`), charged as
        the optimizer it is: SGD with momentum as `sgd`, anything else as `adamw` plus
        `adamw_tensor` for each parameter tensor beyond the first."""
        kind, tensors = self.replica.optimizer_cost
        async with self.charged(kind, self.replica.numel):
            self.replica.apply(grad)
        if kind == "adamw" and tensors > 1:
            await self.charge("adamw_tensor", 0, tensors - 1)

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


def worker_setup(
    cfg: ExperimentConfig,
    cluster: Cluster,
    rank: int,
    rates: Mapping[tuple[int, int], float],
    scale: TimeScale = UNIT,
) -> dict[str, Any]:
    """WorkerContext's arguments (all but the replica) for worker `rank` of a strategy job,
    on any engine: the world and sites, the global batch, and what it is told of its links
    (`rates`: bytes/s per (src, dst) pair it expects, the all-to-all shares of
    engines/network.py; latencies from the config). Every time and rate is in the
    engine's units: `scale` stretches scenario time into them (the sim's is 1)."""
    peers = [r for r in range(cluster.size) if r != rank]
    e = cfg.engine
    return {
        "rank": rank,
        "world": list(range(cluster.size)),
        "sites": [w.site for w in cluster.workers],
        "global_batch": cfg.train.batch_per_worker * cluster.size,
        "recv_timeout": scale.wall(e.recv_timeout),
        "bandwidth_seed": {p: scale.rate(rates[(rank, p)]) for p in peers},
        "latency": {p: scale.wall(cluster.link(rank, p).latency) for p in peers},
        "bandwidth_ema": e.bandwidth_ema,
        "header_bytes": e.header_bytes,
        "seed": cfg.train.seed,
        "step_overhead": scale.wall(cluster.workers[rank].step_overhead_s),
    }


class PaysVectorWorkInRealTime:
    """Engine side, for contexts on a real clock (the dist engine): vector work costs its
    modelled seconds in all, the real run included, so only the rest is slept.

    The sleep owed is kept as a debt: negative when a sleep overshot, and the excess is
    credited to the next charges, so many short sleeps do not add up their wake-up delays.
    Real work beyond the model is counted (`charge_overruns`) and not credited: it stays
    visible.

    One debt per task: on the virtual clock, charges made by concurrent tasks of a worker
    (DLion's pumps beside its main loop) sleep side by side, so here too a task pays only
    its own. (One debt shared by all tasks made a task sleep what the others owed, and
    the others sleep it again: DLion's main loop paid its pumps' top-k, 1.36-1.52x the
    sim's time to target; RESULTS.md section 12e.)"""

    charge_overruns: int = 0
    _vector_debts: weakref.WeakKeyDictionary[asyncio.Task[Any], float] | None = None

    async def pay_vector_work(self, modelled: float, real_s: float) -> None:
        left = modelled - real_s
        if left < 0:
            self.charge_overruns += 1
        if self._vector_debts is None:
            self._vector_debts = weakref.WeakKeyDictionary()
        task = asyncio.current_task()
        assert task is not None, "vector work is paid inside a task"
        debt = self._vector_debts.get(task, 0.0) + max(left, 0.0)
        if debt > 0:
            slept = time.perf_counter()
            await asyncio.sleep(debt)
            debt -= time.perf_counter() - slept
        self._vector_debts[task] = debt
