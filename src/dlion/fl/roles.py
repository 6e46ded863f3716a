"""The FL server and client behaviours, written once against the context API.

Protocol (all client -> server traffic uses one tag so the server sees it in order):
- client -> server "fl": Control("checkin") when it comes online and is idle;
  Control("left") when its connection drops (sent by the engine/transport, not the
  vanished device); Control("pull") mid-training (FedASMU); Dense(delta) = the upload,
  with meta {version, samples, loss, pulled}.
- server -> client "task": Dense(global model) with meta {version, **algorithm meta}.
- server -> client "global": answer to a pull: Dense(fresh global) or Control("none").

Nothing a client sends is trusted: the server keeps its own record of which version it
gave each client, and screens every upload (size, dtype, NaN/Inf, norm) before the
algorithm sees it. An upload that does not arrive whole never reaches the algorithm.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from dlion.comm.messages import (
    Control,
    Dense,
    Message,
    Timeout,
    dense_values,
    tensor_problem,
)
from dlion.context import WorkerContext
from dlion.core.errors import SimulationError
from dlion.fl.base import Algorithm, ServerState, Update
from dlion.fl.config import FLConfig, LocalConfig, SecurityConfig
from dlion.training.replica import Replica

TO_SERVER = "fl"
TASK = "task"
GLOBAL = "global"
SERVER = 0  # the server's rank; clients are 1..N
# A bound on the local steps a task may ask for (a server's "steps" is not trusted blindly).
_MAX_TASK_STEPS = 10_000


class ClientContext(WorkerContext):
    """What a client behaviour needs beyond the worker API: its availability and a model
    that exists only while it trains."""

    # The replica exists only while a client trains (the server's is always there).
    @property
    def replica(self) -> Replica:
        if self._replica is None:
            raise SimulationError(f"client {self.rank} has no model outside a task")
        return self._replica

    @replica.setter
    def replica(self, value: Replica | None) -> None:
        self._replica = value

    @abstractmethod
    def online_span(self, t: float) -> tuple[float, float]:
        """(start, end) of the online period that ends after `t` (start > t: offline now)."""

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """Size of this client's local data."""

    @abstractmethod
    def load_model(self, flat: torch.Tensor) -> None:
        """Create the local replica (lazily) with these parameters."""

    @abstractmethod
    def free_model(self) -> None:
        """Drop the local replica: an idle client holds no model."""

    @abstractmethod
    def disconnect(self) -> None:
        """The device goes offline: free its model; the transport tells the server."""


# ============================================================================ server


@dataclass
class _Task:
    id: int  # echoed by the client, so an answer to an older task is never taken for this one
    version: int
    started: float


@dataclass
class ServerStats:
    uploads: int = 0
    merged: int = 0
    buffered: int = 0
    stale: int = 0
    clipped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    abandoned: int = 0  # tasks whose client left before uploading
    timed_out: int = 0
    pulls: int = 0
    pulls_answered: int = 0
    rounds: int = 0

    def reject(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "rejected_total": sum(self.rejected.values())}


class NormScreen:
    """Update norms far above the population's: clip to, or reject beyond, a multiple of
    the median of recently accepted norms (a median, so a few attackers cannot move it)."""

    def __init__(self, cfg: SecurityConfig) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.norm_history)

    def bound(self) -> float | None:
        if len(self.history) < self.cfg.norm_warmup:
            return None
        return self.cfg.norm_multiple * statistics.median(self.history)

    def screen(self, delta: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(delta to use or None if rejected, whether it was clipped)."""
        norm = float(torch.linalg.vector_norm(delta))
        bound = self.bound()
        if bound is not None and norm > bound:
            if self.cfg.norm_action == "reject":
                return None, False
            self.history.append(bound)
            return delta * (bound / norm), True
        self.history.append(norm)
        return delta, False


class Server:
    """The server behaviour. State lives here so the engine can checkpoint it between
    events; `run` is the coroutine."""

    def __init__(
        self,
        ctx: WorkerContext,
        algo: Algorithm,
        state: ServerState,
        cfg: FLConfig,
        clients: list[int],
    ) -> None:
        self.ctx = ctx
        self.algo = algo
        algo.clock = ctx.now  # algorithms that plan in time (FedCompass, FedPace) read it
        self.state = state
        self.cfg = cfg
        self.clients = clients
        self.numel = state.model.numel()
        self.stats = ServerStats()
        self.norms = NormScreen(cfg.security)
        self.pool: set[int] = set()  # checked-in idle clients
        self.tasks: dict[int, _Task] = {}
        # Models handed out and not yet answered, by version: uploads are deltas against them.
        self.snapshots: dict[int, torch.Tensor] = {}
        self._round: list[Update] | None = None  # uploads of the open round (synchronous)
        self._sends: set[asyncio.Future[bool]] = set()
        self.next_task_id = 0

    async def run(self) -> None:
        if self.algo.synchronous:
            await self._run_rounds()
        else:
            await self._run_async()

    # ---------------------------------------------------------------- main loops
    async def _run_async(self) -> None:
        while True:
            while len(self.tasks) < self.cfg.clients.concurrency and self.pool:
                self._assign(self._pick())
            await self._handle_next()

    async def _run_rounds(self) -> None:
        wait_s = float(getattr(self.algo.options, "select_wait_s", 0.0))
        while True:
            need = self.cfg.clients.concurrency
            deadline = self.ctx.now() + wait_s
            while not self.pool or (len(self.pool) < need and self.ctx.now() < deadline):
                await self._handle_next(deadline if self.pool else None)
            self._round = []
            for _ in range(min(need, len(self.pool))):
                self._assign(self._pick())
            while self.tasks:
                await self._handle_next()
            updates, self._round = self._round, None
            self.algo.aggregate_round(self.state, updates)
            self.stats.rounds += 1
            self.stats.merged += len(updates)

    # ---------------------------------------------------------------- tasks
    def _pick(self) -> int:
        # Sorted first: set order must never decide who trains (determinism).
        client = self.ctx.rng.choice(sorted(self.pool))
        self.pool.discard(client)
        return client

    def _assign(self, client: int) -> None:
        v = self.state.version
        if v not in self.snapshots:
            self.snapshots[v] = self.state.model.clone()
        self.next_task_id += 1
        task = _Task(self.next_task_id, v, self.ctx.now())
        self.tasks[client] = task
        meta = {"task": float(task.id), "version": float(v), **self.algo.task_meta(client)}
        self._send_later(client, TASK, Dense(self.snapshots[v]), meta)

    def _finish(self, client: int) -> _Task:
        task = self.tasks.pop(client)
        if all(t.version != task.version for t in self.tasks.values()):
            self.snapshots.pop(task.version, None)
        return task

    def _send_later(self, dst: int, tag: str, payload: Any, meta: dict[str, float]) -> None:
        # Downloads run in the background: the server keeps serving while bytes move.
        fut = asyncio.ensure_future(self.ctx.send(dst, tag, payload, meta))
        self._sends.add(fut)
        fut.add_done_callback(self._sends.discard)

    # ---------------------------------------------------------------- messages
    async def _handle_next(self, until: float | None = None) -> None:
        """Wait for the next client message (or the earliest task deadline) and handle it."""
        timeout = self.cfg.server.task_timeout_s
        deadlines = [t.started + timeout for t in self.tasks.values()]
        if until is not None:
            deadlines.append(until)
        wait = max(0.0, min(deadlines) - self.ctx.now()) if deadlines else timeout
        msg = await self.ctx.recv(None, TO_SERVER, timeout=wait)
        if isinstance(msg, Timeout):
            now = self.ctx.now()
            for client, task in list(self.tasks.items()):
                if task.started + timeout <= now:
                    self._finish(client)
                    self.algo.task_lost(client)
                    self.stats.timed_out += 1
                    self.ctx.record("task_timeout", client=client, phase="upload")
            return
        if not isinstance(msg, Message):
            return  # PeerGone: not used by the FL transport (departures are "left" messages)
        if isinstance(msg.payload, Control):
            self._on_control(msg)
        else:
            self._on_upload(msg)

    def _on_control(self, msg: Message) -> None:
        kind = msg.payload.kind if isinstance(msg.payload, Control) else ""
        src = msg.src
        if src not in self.clients:
            self.stats.reject("unknown sender")
            return
        if kind == "checkin":
            if src in self.tasks:  # reconnected: whatever it was doing is lost
                self._finish(src)
                self.algo.task_lost(src)
                self.stats.abandoned += 1
            self.pool.add(src)
        elif kind == "left":
            self.pool.discard(src)
            if src in self.tasks:
                self._finish(src)
                self.algo.task_lost(src)
                self.stats.abandoned += 1
                self.ctx.record("client_left", client=src, phase="training or upload")
        elif kind == "pull":
            self.stats.pulls += 1
            task = self.tasks.get(src)
            if task is None:
                return
            meta = {k: v for k, v in msg.meta.items() if isinstance(v, float) and math.isfinite(v)}
            if self.algo.answer_pull(self.state, src, task.version, meta):
                self.stats.pulls_answered += 1
                fresh = Dense(self.state.model.clone())
                self._send_later(src, GLOBAL, fresh, {"version": float(self.state.version)})
            else:
                self._send_later(src, GLOBAL, Control("none"), {})
        else:
            self.stats.reject("unknown control message")

    def _on_upload(self, msg: Message) -> None:
        src = msg.src
        self.stats.uploads += 1
        task = self.tasks.get(src)
        if task is None or msg.meta.get("task") != float(task.id):
            self.stats.reject("unsolicited upload")
            return
        base = self.snapshots[task.version]
        self._finish(src)
        self.pool.add(src)  # it just talked to us: online and idle
        problem = (
            tensor_problem(msg.payload, self.numel)
            if isinstance(msg.payload, Dense)
            else f"payload {type(msg.payload).__name__}, expected a dense tensor"
        )
        samples = msg.meta.get("samples", 0.0)
        if problem is None and not (math.isfinite(samples) and samples >= 1):
            problem = "sample count missing or not a positive number"
        if problem is not None:
            self.stats.reject(problem)
            self.ctx.record("rejected", client=src, why=problem)
            return
        values = dense_values(msg)  # a Dense: screened above
        delta, clipped = self.norms.screen(values)
        if delta is None:
            self.stats.reject("norm above bound")
            self.ctx.record("rejected", client=src, why="norm above bound")
            return
        if clipped:
            self.stats.clipped += 1
        update = Update(
            client=src,
            version=task.version,
            delta=delta,
            weights=base + delta,
            samples=int(samples),
            meta=dict(msg.meta),
            elapsed=self.ctx.now() - task.started,
        )
        if self._round is not None:
            self._round.append(update)
            return
        outcome = self.algo.merge(self.state, update)
        if outcome == "merged":
            self.stats.merged += 1
        elif outcome == "buffered":
            self.stats.buffered += 1
        else:
            self.stats.stale += 1


# ============================================================================ client


async def client(ctx: ClientContext, algo: Algorithm, local: LocalConfig) -> None:
    """The client behaviour: come online, check in, train the tasks it gets, go offline.

    Going offline can happen at any moment, mid-training or mid-upload: the work in
    progress is cancelled and lost, the model is freed, and the server is told by the
    transport (a dropped connection), never by the vanished device itself."""
    while True:
        start, end = ctx.online_span(ctx.now())
        if start > ctx.now():
            await asyncio.sleep(start - ctx.now())
        if math.isinf(end):
            await _serve(ctx, algo, local)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_serve(ctx, algo, local), end - ctx.now())
        ctx.disconnect()


async def _serve(ctx: ClientContext, algo: Algorithm, local: LocalConfig) -> None:
    # Tasks or answers sent to the previous session died with its connection.
    while ctx.poll(SERVER, TASK) is not None or ctx.poll(SERVER, GLOBAL) is not None:
        pass
    await ctx.send(SERVER, TO_SERVER, Control("checkin"))
    while True:
        msg = await ctx.recv(SERVER, TASK)
        if isinstance(msg, Message) and isinstance(msg.payload, Dense):
            await _train(ctx, algo, local, msg)


async def _train(ctx: ClientContext, algo: Algorithm, local: LocalConfig, task: Message) -> None:
    assert isinstance(task.payload, Dense)
    version = int(task.meta["version"])
    ctx.load_model(task.payload.values)
    start = ctx.replica.params()
    n = ctx.num_samples
    batch = min(local.batch_size, n)
    default_steps = max(1, math.ceil(local.epochs * n / batch))
    # The server may set the task's local work (FedCompass, FedPace); else one config's worth.
    assigned = task.meta.get("steps", 0.0)
    steps = min(int(assigned), _MAX_TASK_STEPS) if assigned >= 1 else default_steps
    pull_at = algo.pull_step(task.meta, steps)
    pulled = 0.0
    pull_version = float(version)
    asked = False
    losses: list[float] = []
    train_s = 0.0
    for step in range(steps):
        if step == pull_at:
            # Ask for the fresh global model and keep training while it downloads; it is
            # merged after the first local step that ends once it has arrived (the last
            # step included; an answer later than that is dropped with the session).
            pull_meta = {"version": float(version)}
            if algo.reports_timing:
                pull_meta["remaining_s"] = (steps - step) * train_s / step if step > 0 else 0.0
            await ctx.send(SERVER, TO_SERVER, Control("pull"), pull_meta)
            asked = True
        result = await ctx.compute(batch)
        train_s += result.seconds
        ctx.replica.apply(result.grad)
        losses.append(result.loss)
        ctx.iteration_done(result.loss)
        if asked:
            reply = ctx.poll(SERVER, GLOBAL)
            if reply is not None:
                asked = False
                pulled = _merge_fresh(ctx, algo, task.meta, version, reply, start)
                if pulled > 0:
                    pull_version = reply.meta.get("version", float(version))
    delta = ctx.replica.flat - start
    # The model is freed before the upload: only the delta travels, and an idle client
    # holds nothing. An answer to a pull that came too late is dropped with the next task.
    ctx.free_model()
    meta = {
        "task": task.meta.get("task", 0.0),
        "version": float(version),
        "samples": float(n),
        "loss": sum(losses) / len(losses),
    }
    if algo.reports_timing:
        meta["steps"] = float(steps)
        meta["default_steps"] = float(default_steps)
        meta["train_s"] = train_s
        meta["pull_version"] = pull_version
    await ctx.send(SERVER, TO_SERVER, Dense(delta), {**meta, "pulled": pulled})


def _merge_fresh(
    ctx: ClientContext,
    algo: Algorithm,
    meta: dict[str, float],
    version: int,
    reply: Message,
    start: torch.Tensor,
) -> float:
    """Merge the fresh global model into the local one (FedASMU's adaptive local model
    adjustment), or, for an algorithm that rebases, move the local model and the task's
    start point by beta (w_fresh - start) so the upload stays the local progress alone.
    Returns the weight beta used (0 if nothing was merged)."""
    if not isinstance(reply.payload, Dense):
        return 0.0  # Control("none"): the server has nothing new
    if tensor_problem(reply.payload, ctx.replica.numel) is not None:
        return 0.0
    b = algo.device_beta(meta, int(reply.meta.get("version", version)), version)
    if b <= 0:
        return 0.0
    if algo.rebase_on_pull:
        shift = (reply.payload.values - start).mul_(b)
        ctx.replica.flat.add_(shift)
        start.add_(shift)
        return b
    ctx.replica.flat.mul_(1 - b).add_(reply.payload.values, alpha=b)
    return b
