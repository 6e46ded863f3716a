"""Hop: heterogeneity-aware decentralized training (Luo, Lin, Zhuo & Qian, ASPLOS '19).

D-PSGD on a neighbour graph, with Hop's queue-based synchronization (PAPERS.md, section 1).
Iteration t of worker i, with x its model and N(i) its live neighbours:

1. Skip (if enabled): lead = the newest iteration received from any neighbour; if
   lead - t > `skip_threshold`, jump the counter to min(lead, oldest newest + staleness),
   never backwards: as far towards the leader as the staleness bound to every neighbour
   allows (a skipped iteration still needs each neighbour's "token"). No gradient is
   computed for skipped iterations; the next averaging pulls in the neighbours' newer
   models, so a deterministically slow worker stops holding its neighbours back. (spec:
   the paper lets slow workers skip iterations; this is the exact rule we implement.)
2. Send x (tagged t) to every neighbour's update queue, in the background, so the
   transfer overlaps the gradient computation (D-PSGD's compute/communicate overlap).
3. g = gradient of x on an equal batch G/N.
4. Wait on the update queue, never beyond `wait_timeout`, until both hold:
   - bounded staleness: every neighbour j has delivered some update of iteration
     >= t - `staleness` (Hop's token queues: nobody runs more than `staleness`
     iterations ahead of a neighbour);
   - backup workers: at least k = max(1, n - `backup`) of the n neighbours have delivered
     an update of iteration >= t; the slowest `backup` neighbours are not waited for.
   A neighbour that is gone (PeerGone) or still blocks the wait at the timeout is dropped.
5. From each neighbour's queue take its freshest update with iteration in
   [t - staleness, t]; updates older than that are dropped, so an update that missed its
   own iteration (a backup neighbour's) is still used in a later one while it is within
   the staleness bound. Updates of future iterations stay queued for their iteration.
6. x <- mean of {x} and the models taken, then x <- SGD-momentum step with g.

Sends are fire-and-forget from the loop's view: a worker never waits for its own
sends, only for its neighbours' updates. A link carries one model at a time; with
`coalesce` a newer model replaces one still waiting to be sent (it would be superseded on
arrival anyway), so a slow link delivers fresh models instead of an ever-growing backlog.

Options (defaults): graph "ring+site" (ring over ranks plus all pairs inside a site),
staleness 4, backup 1, skip_threshold 2 (None: never skip), coalesce true,
wait_timeout None (the engine's receive timeout), trace false (one `hop` event per
iteration with the updates used, for analysis and tests).

Membership: a neighbour that leaves is dropped (its queue and outbox go). A graph
neighbour that joins (or returns: a new incarnation) gets a fresh queue whose newest
iteration counts as t - staleness, so it does not block before its first update; the
joiner itself starts at the iteration it was admitted from, with a live peer's model.

Buffers (BatchNorm running statistics and other float buffers): neighbours' models carry
their buffers, and buffers are averaged with the parameters by the same rule.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dlion.comm.messages import Dense, Message, PeerGone
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "Hop: decentralized neighbour averaging, bounded staleness, backup workers, skipping"

TAG = "hop"  # one tag: the mailbox is this worker's update queue, filled by every neighbour
GraphKind = Literal["ring+site", "ring", "all"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    graph: GraphKind = Field(
        "ring+site",
        description="Neighbour graph: ring over ranks plus all pairs within a site (fast "
        "intra-site links carry most of the mixing), a plain ring, or all pairs.",
    )
    staleness: int = Field(
        4,
        ge=0,
        description="Iteration t needs from every neighbour an update of iteration >= t - "
        "staleness (0: every neighbour's current update, i.e. synchronous D-PSGD).",
    )
    backup: int = Field(
        1,
        ge=0,
        description="Backup workers: wait for the current update of only max(1, n - backup) "
        "of a worker's n neighbours.",
    )
    skip_threshold: int | None = Field(
        2,
        ge=0,
        description="Jump to the newest iteration a neighbour has reached when it is more "
        "than this many iterations ahead (None: never skip).",
    )
    coalesce: bool = Field(
        True, description="A newer model replaces one still waiting to be sent on its link."
    )
    wait_timeout: float | None = Field(
        None, gt=0, description="Longest wait for neighbours' updates (None: engine default)."
    )
    trace: bool = Field(
        False, description="Record a `hop` event per iteration (updates used, skips)."
    )

    @field_validator("skip_threshold")
    @classmethod
    def _skip_within_staleness(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A neighbour waits for our update of its iteration - staleness, so it leads us by
        # at most staleness + 1: a larger threshold would silently never fire.
        staleness = info.data.get("staleness")
        if value is not None and staleness is not None and value > staleness:
            raise ValueError(
                f"skip_threshold {value} exceeds staleness {staleness}; "
                "set skip_threshold <= staleness, or null to disable skipping"
            )
        return value


# ------------------------------------------------------------------ pure functions (tested)


def neighbour_graph(sites: Sequence[str], kind: GraphKind) -> dict[int, list[int]]:
    """Undirected neighbour lists (sorted) for ranks 0..n-1 whose sites are `sites`."""
    n = len(sites)
    edges: set[tuple[int, int]] = set()
    if kind == "all":
        edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
    elif kind in ("ring", "ring+site"):
        for i in range(n):
            j = (i + 1) % n
            if i != j:
                edges.add((min(i, j), max(i, j)))
        if kind == "ring+site":
            edges |= {(i, j) for i in range(n) for j in range(i + 1, n) if sites[i] == sites[j]}
    else:
        raise ValueError(f"unknown neighbour graph {kind!r} (choose ring+site, ring or all)")
    graph: dict[int, list[int]] = {i: [] for i in range(n)}
    for i, j in sorted(edges):
        graph[i].append(j)
        graph[j].append(i)
    return {i: sorted(nbrs) for i, nbrs in graph.items()}


def average_models(own: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform mean of a worker's model and the neighbour models it received (in the given
    order, so equal inputs give bit-identical results)."""
    total = own.clone()
    for x in others:
        total += x
    return total / (1 + len(others))


def current_needed(n: int, backup: int) -> int:
    """How many neighbours' current updates a worker waits for: n - backup, at least one
    (with no neighbours, none)."""
    return 0 if n == 0 else max(1, n - backup)


def stale_neighbours(t: int, newest: Mapping[int, int], staleness: int) -> list[int]:
    """Neighbours whose newest delivered iteration is older than t - staleness (they block)."""
    return sorted(j for j, it in newest.items() if it < t - staleness)


def may_proceed(t: int, newest: Mapping[int, int], staleness: int, backup: int) -> bool:
    """Bounded staleness for every neighbour and current updates from enough of them."""
    if stale_neighbours(t, newest, staleness):
        return False
    current = sum(1 for it in newest.values() if it >= t)
    return current >= current_needed(len(newest), backup)


def skip_target(t: int, newest: Mapping[int, int], threshold: int | None, staleness: int) -> int:
    """Iteration to continue at. When some neighbour is more than `threshold` iterations
    ahead of t, jump towards the newest iteration a neighbour has reached, but never past
    min(newest) + staleness: the jump must keep the staleness bound to every neighbour (in
    Hop's terms, a skipped iteration still needs a token from each neighbour), else a
    worker throttled by one slow neighbour would skip ahead of it and block at once."""
    lead = max(newest.values(), default=t)
    if threshold is None or lead - t <= threshold:
        return t
    return max(t, min(lead, min(newest.values()) + staleness))


class UpdateQueues:
    """Updates received from each neighbour and not used yet, with the newest iteration
    ever delivered per neighbour (-1: only the shared initial model)."""

    def __init__(self, neighbours: Sequence[int]) -> None:
        self.pending: dict[int, list[tuple[int, torch.Tensor]]] = {j: [] for j in neighbours}
        self.newest: dict[int, int] = dict.fromkeys(neighbours, -1)

    def push(self, src: int, iteration: int, model: torch.Tensor) -> None:
        if src not in self.pending:  # a neighbour we dropped (timed out) or not a neighbour
            return
        self.pending[src].append((iteration, model))
        self.newest[src] = max(self.newest[src], iteration)

    def drop(self, src: int) -> None:
        self.pending.pop(src, None)
        self.newest.pop(src, None)

    def add(self, src: int, newest: int) -> None:
        """A neighbour that joined: an empty queue, counted as current up to `newest`."""
        self.pending[src] = []
        self.newest[src] = newest

    def take(self, t: int, staleness: int) -> dict[int, tuple[int, torch.Tensor]]:
        """Per neighbour, its freshest update of iteration in [t - staleness, t]; everything
        at or below t is then gone (used, superseded or too stale); later ones stay."""
        used: dict[int, tuple[int, torch.Tensor]] = {}
        for j, items in self.pending.items():
            usable = [(it, x) for it, x in items if t - staleness <= it <= t]
            if usable:
                used[j] = max(usable, key=lambda item: item[0])
            self.pending[j] = [(it, x) for it, x in items if it > t]
        return used


# ------------------------------------------------------------------ the worker


class LinkOutbox:
    """Our models on their way to one neighbour, sent one after another (a link is a
    stream: concurrent sends would only share its bandwidth and all arrive late)."""

    def __init__(self, ctx: WorkerContext, dst: int, coalesce: bool) -> None:
        self._ctx = ctx
        self._dst = dst
        self._coalesce = coalesce
        self._waiting: deque[tuple[int, Dense]] = deque()
        self._task: asyncio.Task[None] | None = None  # kept so the task is not collected

    def post(self, iteration: int, model: Dense) -> None:
        if self._coalesce:
            self._waiting.clear()
        self._waiting.append((iteration, model))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._waiting:
            iteration, model = self._waiting.popleft()
            if not await self._ctx.send(self._dst, TAG, model, {"it": float(iteration)}):
                self._waiting.clear()  # the neighbour is gone
                return


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.model_numel  # neighbours' models carry their buffers
    graph = neighbour_graph([ctx.site(r) for r in range(ctx.world_size)], opt.graph)
    live = set(ctx.peers())
    neighbours = [j for j in graph[ctx.rank] if j in live]
    queues = UpdateQueues(neighbours)
    outboxes = {j: LinkOutbox(ctx, j, opt.coalesce) for j in neighbours}
    known = {j: ctx.incarnation(j) for j in neighbours}  # incarnation each queue belongs to
    timeout = ctx.recv_timeout if opt.wait_timeout is None else opt.wait_timeout
    t = ctx.iteration  # a joiner starts at the iteration it was admitted from
    while True:
        ranks = sorted([ctx.rank, *ctx.peers()])
        batch = equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]

        await _drain(ctx, queues, numel)
        _forget_departed(ctx, queues, outboxes, t)
        for j in graph[ctx.rank]:
            if j in ctx.peers() and known.get(j) != ctx.incarnation(j):
                known[j] = ctx.incarnation(j)
                queues.add(j, t - opt.staleness)
                outboxes[j] = LinkOutbox(ctx, j, opt.coalesce)
                ctx.record("peer_joined", peer=j, phase=f"hop{t}")
        target = skip_target(t, queues.newest, opt.skip_threshold, opt.staleness)
        skipped, t = target - t, target

        # Send before computing: the transfer overlaps the gradient computation.
        model = Dense(ctx.replica.model_state())
        for j in sorted(outboxes):
            outboxes[j].post(t, model)
        result = await ctx.compute(batch)

        wait_start = ctx.now()
        await _wait_for_neighbours(ctx, queues, outboxes, t, opt, timeout, numel)
        newest = dict(queues.newest)
        used = queues.take(t, opt.staleness)
        async with ctx.charged("sum", numel * (1 + len(used))):
            mixed = average_models(ctx.replica.model_state(), [used[j][1] for j in sorted(used)])
            ctx.replica.set_model_state(mixed)
        await ctx.apply(result.grad)
        if opt.trace:
            ctx.record(
                "hop",
                iteration=t,
                skipped=skipped,
                used=[[j, used[j][0]] for j in sorted(used)],
                newest=[[j, newest[j]] for j in sorted(newest)],
                waited=ctx.now() - wait_start,
            )
        t += 1
        ctx.iteration_done(result.loss)


async def _drain(ctx: WorkerContext, queues: UpdateQueues, numel: int) -> None:
    """Move every update already delivered into the queues (no virtual time passes)."""
    while True:
        got = await ctx.recv(None, TAG, timeout=0, numel=numel)
        if not isinstance(got, Message):
            return
        _push(queues, got, numel)


def _push(queues: UpdateQueues, msg: Message, numel: int) -> None:
    queues.push(msg.src, int(msg.meta["it"]), msg.payload.to_dense(numel))  # type: ignore[union-attr]


def _forget_departed(
    ctx: WorkerContext, queues: UpdateQueues, outboxes: dict[int, LinkOutbox], t: int
) -> None:
    live = set(ctx.peers())
    for j in [j for j in queues.newest if j not in live]:
        _drop(ctx, queues, outboxes, j, t, "gone")


def _drop(
    ctx: WorkerContext,
    queues: UpdateQueues,
    outboxes: dict[int, LinkOutbox],
    peer: int,
    t: int,
    why: str,
) -> None:
    queues.drop(peer)
    outboxes.pop(peer, None)
    ctx.record("peer_lost", peer=peer, phase=f"hop{t}", why=why)


async def _wait_for_neighbours(
    ctx: WorkerContext,
    queues: UpdateQueues,
    outboxes: dict[int, LinkOutbox],
    t: int,
    opt: Options,
    timeout: float,
    numel: int,
) -> None:
    """Block on the update queue until iteration t may proceed; drop whoever still blocks
    it at the deadline."""
    deadline = ctx.now() + timeout
    while True:
        await _drain(ctx, queues, numel)
        _forget_departed(ctx, queues, outboxes, t)
        if may_proceed(t, queues.newest, opt.staleness, opt.backup):
            return
        remaining = deadline - ctx.now()
        if remaining <= 0:
            stale = stale_neighbours(t, queues.newest, opt.staleness)
            # Under the backup rule alone, everyone without a current update is late.
            late = stale or sorted(j for j, it in queues.newest.items() if it < t)
            for j in late:
                _drop(ctx, queues, outboxes, j, t, f"timeout after {timeout}s")
            return
        # A stale neighbour must be heard from anyway: wait on it by name, so that its
        # departure (PeerGone) wakes us at once. Otherwise any neighbour's update may do.
        stale = stale_neighbours(t, queues.newest, opt.staleness)
        got = await ctx.recv(stale[0] if stale else None, TAG, timeout=remaining, numel=numel)
        if isinstance(got, Message):
            _push(queues, got, numel)
        elif isinstance(got, PeerGone):
            _drop(ctx, queues, outboxes, got.src, t, "gone")
