"""Ako: decentralised deep learning with partial gradient exchange.

Watcharapichat et al., "Ako: Decentralised Deep Learning with Partial Gradient
Exchange", SoCC '16 (../shared/PAPERS.md, section 1, baselines).

Every worker trains on an equal share of the global batch and exchanges gradients
directly with every peer, but each iteration sends each peer only *one partition* of
its gradient, so the exchange fits the network:

- Per peer j, the worker keeps an accumulator of its weighted gradients (batch / G)
  not yet sent to j. The flat vector is split into P_j contiguous partitions; each send
  to j carries partition (sends_j + offset) mod P_j of the accumulator, which is then
  cleared there. Over P_j sends every partition goes out once, carrying everything
  accumulated for it: nothing is lost, only delayed (at most P_j sends: Ako's implicit
  staleness bound).
- P_j is the smallest P such that one partition fits the link within the iteration's
  time budget: header + meta + 4 * ceil(numel / P) bytes <= bandwidth_j * rho * compute
  time, with the measured bandwidth (`ctx.bandwidth`), capped to [1, numel] and
  re-derived every `reprofile_every` iterations (fixed with `partitions`). The budget is
  per link because the paper's single P assumes equal links; on a cluster with fast and
  slow links a single P would starve the fast ones (`per_link: false` restores the
  paper's single P: the largest over the links). Latency is not charged by default: a
  send returns when its bytes have left, so the latency of one partition overlaps the
  next one's transmission and only delays delivery (`count_latency: true` charges it,
  as a synchronous exchange would have to).
- The offset is the sender's rank, so at any moment different senders deliver
  different partitions to a receiver and it sees the whole model updated sooner.

Synchronization: asynchronous, as in the paper. A worker never waits for a peer: after
each gradient it applies its own weighted gradient plus whatever partitions have
arrived. One send per link is in flight at a time; when a link is still busy the
partition's turn waits (the accumulator keeps growing) instead of queueing messages
without bound, so a slow link never stalls compute. Option `staleness = s` adds a bound:
before applying iteration t, wait (up to the engine's receive timeout) until every peer
has delivered a partition sent at its iteration >= t - s.

Options (defaults in `Options`): `partitions` (null: derived), `rho` (1.0),
`reprofile_every` (20), `per_link` (true), `count_latency` (false), `staleness` (null).
On microcloud-hetero (seed 0) these defaults reach the target in 2.0 s; the paper's single
P takes 4.0 s, charging latency 3.3 s, staleness 0 or 1 9.5 s and 7.0 s.

Membership: a peer that leaves is forgotten (its accumulator too: nothing can reach it);
a peer that joins (or returns) gets a fresh accumulator and a P of its own at once; the
joiner starts at the iteration it was admitted from, with a live peer's model.

Buffers (BatchNorm running statistics and other float buffers): Ako exchanges gradient
partitions only, so each replica's buffers follow its own batches (never synchronised).
"""

from __future__ import annotations

import asyncio
import itertools
import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import META_ENTRY_BYTES, VALUE_BYTES, Dense, Message
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "Ako: asynchronous, one round-robin gradient partition per peer per iteration"

TAG = "ako/part"
MESSAGE_META = 2  # "start" and "it" ride on every partition


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    partitions: int | None = Field(
        None, ge=1, description="Fix P for every link (None: derive it from the link)."
    )
    rho: float = Field(
        1.0, gt=0, description="Link time budget as a multiple of this iteration's compute."
    )
    reprofile_every: int = Field(
        20, ge=1, description="Re-derive P from measured bandwidth every N iterations."
    )
    per_link: bool = Field(
        True, description="One P per link (False: the paper's single P, the largest needed)."
    )
    count_latency: bool = Field(
        False, description="Charge link latency against the time budget (sync-style)."
    )
    staleness: int | None = Field(
        None,
        ge=0,
        description="Wait until every peer's partitions of iteration t - staleness arrived "
        "(None: fully asynchronous, as in the paper).",
    )


# ------------------------------------------------------------------ pure functions (tested)


def partitions_for_link(
    numel: int,
    bandwidth: float,
    latency: float,
    time_budget: float,
    header_bytes: int = 0,
    count_latency: bool = False,
) -> int:
    """Smallest P in [1, numel] whose largest partition fits bandwidth * budget bytes.

    A message carries ceil(numel / P) float32 values plus the header and its meta. If
    not even one value fits, P = numel: one entry per send, the least a link can carry.
    """
    send_time = time_budget - latency if count_latency else time_budget
    capacity = bandwidth * send_time - header_bytes - MESSAGE_META * META_ENTRY_BYTES
    per_message = int(capacity // VALUE_BYTES) if capacity > 0 else 0
    if per_message < 1:
        return numel
    return max(1, min(numel, math.ceil(numel / per_message)))


def partition_bounds(numel: int, partitions: int) -> list[tuple[int, int]]:
    """[start, end) of P contiguous partitions, sizes as torch.tensor_split (first larger)."""
    if not 1 <= partitions <= numel:
        raise ValueError(f"partitions must be in [1, {numel}], got {partitions}")
    base, extra = divmod(numel, partitions)
    starts = [i * base + min(i, extra) for i in range(partitions + 1)]
    return list(itertools.pairwise(starts))


class PartitionedAccumulator:
    """Gradient owed to one peer, sent one round-robin partition at a time."""

    def __init__(self, numel: int, offset: int = 0) -> None:
        self.accumulated = torch.zeros(numel)
        self.offset = offset
        self.sends = 0

    def add(self, weighted_grad: torch.Tensor) -> None:
        self.accumulated += weighted_grad

    def take(self, partitions: int) -> tuple[int, torch.Tensor]:
        """(start, values) of the partition whose turn it is; cleared here."""
        bounds = partition_bounds(self.accumulated.numel(), partitions)
        start, end = bounds[(self.sends + self.offset) % partitions]
        values = self.accumulated[start:end].clone()
        self.accumulated[start:end] = 0.0
        self.sends += 1
        return start, values


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    G = ctx.global_batch
    me = ctx.rank
    owed = {p: PartitionedAccumulator(numel, offset=me) for p in ctx.peers()}
    known = {p: ctx.incarnation(p) for p in owed}  # incarnation each accumulator belongs to
    lost: set[tuple[int, int]] = set()  # (rank, incarnation) that timed out a staleness wait
    partitions: dict[int, int] = {}
    in_flight: dict[int, asyncio.Task[bool]] = {}
    latest: dict[int, int] = {}  # newest sender iteration received from each peer
    t = ctx.iteration  # a joiner starts at the iteration it was admitted from
    first = t
    while True:
        for p in ctx.peers():
            if known.get(p) != ctx.incarnation(p) and (p, ctx.incarnation(p)) not in lost:
                known[p] = ctx.incarnation(p)
                owed[p] = PartitionedAccumulator(numel, offset=me)
                latest.pop(p, None)
                in_flight.pop(p, None)
        peers = [p for p in ctx.peers() if p in owed]
        ranks = sorted([me, *peers])
        batch = equal_batches(G, len(ranks))[ranks.index(me)]
        result = await ctx.compute(batch)
        async with ctx.charged("axpy", numel):
            weighted = result.grad * (batch / G)

        if (t - first) % opt.reprofile_every == 0 or any(p not in partitions for p in peers):
            partitions = _choose_partitions(ctx, opt, peers, result.seconds)
            ctx.record("ako", iteration=t, partitions=[partitions[p] for p in peers])

        for p in peers:
            async with ctx.charged("axpy", numel):
                owed[p].add(weighted)
            busy = p in in_flight and not in_flight[p].done()
            if busy:
                continue  # the partition's turn waits; its gradient keeps accumulating
            async with ctx.charged("axpy", numel // max(1, partitions[p])):
                start, values = owed[p].take(partitions[p])
            meta = {"start": float(start), "it": float(t)}
            in_flight[p] = asyncio.ensure_future(ctx.send(p, TAG, Dense(values), meta))

        total = weighted.clone()
        if opt.staleness is not None:
            for p in peers:
                while latest.get(p, -1) < t - opt.staleness:
                    msg = await ctx.recv(p, TAG)
                    if not isinstance(msg, Message):
                        # Waited the engine's receive timeout: stop waiting for (and sending
                        # to) this peer, as for one that left.
                        del owed[p]
                        lost.add((p, ctx.incarnation(p)))
                        ctx.record("peer_lost", peer=p, phase="staleness wait", why=repr(msg))
                        break
                    _absorb(ctx, msg, total, latest)
        while isinstance(msg := await ctx.recv(None, TAG, timeout=0.0), Message):
            async with ctx.charged("axpy", msg.nbytes // 4):
                _absorb(ctx, msg, total, latest)
        await ctx.apply(total)

        live = ctx.peers()
        for p in [p for p in owed if p not in live]:
            del owed[p]  # gone: nothing more can reach it
        t += 1
        ctx.iteration_done(result.loss)


def _choose_partitions(
    ctx: WorkerContext, opt: Options, peers: list[int], compute_seconds: float
) -> dict[int, int]:
    numel = ctx.replica.numel
    if opt.partitions is not None:
        return {p: min(opt.partitions, numel) for p in peers}
    per_link = {
        p: partitions_for_link(
            numel,
            ctx.bandwidth(p),
            ctx.latency(p),
            opt.rho * compute_seconds,
            ctx.header_bytes,
            opt.count_latency,
        )
        for p in peers
    }
    if opt.per_link or not per_link:
        return per_link
    single = max(per_link.values())
    return {p: single for p in peers}


def _absorb(ctx: WorkerContext, msg: Message, total: torch.Tensor, latest: dict[int, int]) -> None:
    """Add a received partition into this iteration's update, after checking where it goes."""
    values = msg.payload.values if isinstance(msg.payload, Dense) else None
    start = int(msg.meta.get("start", -1))
    if values is None or start < 0 or start + values.numel() > total.numel():
        ctx.record("rejected", src=msg.src, tag=msg.tag, why="partition out of range")
        return
    total[start : start + values.numel()] += values
    latest[msg.src] = max(latest.get(msg.src, -1), int(msg.meta.get("it", -1)))
