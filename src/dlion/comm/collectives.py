"""Collectives built from point-to-point messages, so the network charges every chunk."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dlion.comm.messages import VALUE_BYTES, Dense, Message, Payload, RecvResult


class WorkerContext(Protocol):
    """What a collective uses of a worker's context (dlion.context.WorkerContext has it;
    spelled out here so that the context can offer collectives without an import circle)."""

    rank: int
    epoch: int

    def peers(self) -> list[int]: ...

    def peer_since(self, rank: int) -> int: ...

    def record(self, event: str, **fields: Any) -> None: ...

    async def fetch_state(self, peer: int, timeout: float | None = None) -> bool: ...

    async def send(
        self, dst: int, tag: str, payload: Payload, meta: dict[str, float] | None = None
    ) -> bool: ...

    async def recv(
        self,
        src: int | None,
        tag: str,
        timeout: float | None = None,
        *,
        numel: int | None = None,
        epoch: int | None = None,
    ) -> RecvResult: ...


class CollectiveFailed(RuntimeError):
    """A peer left or timed out during a collective; the caller decides how to re-form."""


async def _exchange(
    ctx: WorkerContext,
    right: int,
    left: int,
    tag: str,
    chunk: torch.Tensor,
    numel: int,
    epoch: int | None,
) -> torch.Tensor:
    _, got = await asyncio.gather(
        ctx.send(right, tag, Dense(chunk)), ctx.recv(left, tag, numel=numel, epoch=epoch)
    )
    if not isinstance(got, Message):
        raise CollectiveFailed(f"ring all-reduce step {tag}: {got}")
    return got.payload.values  # type: ignore[union-attr]


async def ring_allreduce(
    ctx: WorkerContext,
    vector: torch.Tensor,
    tag: str,
    *,
    ranks: list[int] | None = None,
    epoch: int | None = None,
) -> torch.Tensor:
    """Sum `vector` over `ranks` (default: this worker and its live peers) with the ring
    algorithm.

    Reduce-scatter then all-gather, N-1 steps each, one chunk of size/N to the right
    neighbour per step: 2(N-1) latencies and 2(N-1)/N * size over the slowest ring link.
    Each chunk is reduced once and then copied, so every worker gets bit-identical sums.
    With `epoch` (the membership epoch the ring was planned in), any membership change
    during the collective raises CollectiveFailed at every member at once, so nobody
    waits on a member that went to re-form (see `regroup`).
    """
    ranks = sorted(ranks) if ranks is not None else sorted([ctx.rank, *ctx.peers()])
    n = len(ranks)
    if n == 1:
        return vector.clone()
    pos = ranks.index(ctx.rank)
    right, left = ranks[(pos + 1) % n], ranks[(pos - 1) % n]
    chunks = [c.clone() for c in vector.tensor_split(n)]
    for step in range(n - 1):
        send_i, recv_i = (pos - step) % n, (pos - step - 1) % n
        got = await _exchange(
            ctx, right, left, f"{tag}/rs{step}", chunks[send_i], chunks[recv_i].numel(), epoch
        )
        async with ctx.charged("axpy", chunks[recv_i].numel()):
            chunks[recv_i] = got + chunks[recv_i]
    for step in range(n - 1):
        send_i, recv_i = (pos - step + 1) % n, (pos - step) % n
        chunks[recv_i] = await _exchange(
            ctx, right, left, f"{tag}/ag{step}", chunks[send_i], chunks[recv_i].numel(), epoch
        )
    return torch.cat(chunks)


def ring_bytes(numel: int, n: int, pos: int, header_bytes: int = 0) -> int:
    """Bytes the member at `pos` of an n-member `ring_allreduce` of `numel` float32 values
    sends: its chunk of each of the 2(n-1) steps (chunks of `tensor_split`), each message
    with its header."""
    if n == 1:
        return 0
    base, extra = divmod(numel, n)
    size = [base + (1 if i < extra else 0) for i in range(n)]
    sent = [size[(pos - step) % n] for step in range(n - 1)]
    sent += [size[(pos - step + 1) % n] for step in range(n - 1)]
    return sum(VALUE_BYTES * s + header_bytes for s in sent)


async def ring_allgather(
    ctx: WorkerContext,
    payload: Payload,
    meta: dict[str, float],
    tag: str,
    *,
    ranks: list[int],
    epoch: int | None = None,
    numel: int | None = None,
) -> dict[int, tuple[Payload, dict[str, float]]]:
    """Every member's (payload, meta), by rank, with the ring algorithm: N-1 steps, in
    each one payload to the right neighbour, which relays it unchanged in the next step
    (compressed payloads are never re-encoded, so every member holds the same bytes).
    Each link carries N-1 payloads. With `epoch`, a membership change during the
    collective raises CollectiveFailed at every member at once, as in `ring_allreduce`."""
    ranks = sorted(ranks)
    n = len(ranks)
    pos = ranks.index(ctx.rank)
    right, left = ranks[(pos + 1) % n], ranks[(pos - 1) % n]
    out: dict[int, tuple[Payload, dict[str, float]]] = {ctx.rank: (payload, dict(meta))}
    for step in range(n - 1):
        origin = ranks[(pos - step) % n]
        send_payload, send_meta = out[origin]
        _, got = await asyncio.gather(
            ctx.send(right, f"{tag}/{step}", send_payload, send_meta),
            ctx.recv(left, f"{tag}/{step}", numel=numel, epoch=epoch),
        )
        if not isinstance(got, Message):
            raise CollectiveFailed(f"ring all-gather step {tag}/{step}: {got}")
        out[ranks[(pos - step - 1) % n]] = (got.payload, got.meta)
    return out


def longest_member(ctx: WorkerContext) -> int:
    """The live worker that has been a member longest (lowest admission iteration, then
    lowest rank): its state is the group's, never a joiner's copy of an older one."""
    return min([ctx.rank, *ctx.peers()], key=lambda r: (ctx.peer_since(r), r))


async def regroup(ctx: WorkerContext) -> tuple[int, list[int]]:
    """Re-form a synchronous group after a membership change: every member adopts the
    state (parameters, optimizer state, iteration count) of the longest-standing member,
    so replicas are identical again and everyone continues at the same iteration.

    Members that had finished the interrupted iteration and members that had not end up
    alike (at most one iteration of progress is lost). The leader cannot move on before
    the others fetched its state: its next collective needs them. Retries until a
    fetch succeeds in an epoch that still holds. Returns (epoch, sorted members)."""
    while True:
        epoch = ctx.epoch
        leader = longest_member(ctx)
        synced = leader == ctx.rank or await ctx.fetch_state(leader)
        if synced and epoch == ctx.epoch:
            ctx.record("regroup", epoch=epoch, leader=leader, members=len(ctx.peers()) + 1)
            return epoch, sorted([ctx.rank, *ctx.peers()])


@dataclass(frozen=True)
class GroupSum:
    """What `sharded_allreduce` gives every member."""

    total: torch.Tensor  # the sum over the members that answered
    metas: dict[int, dict[str, float]]  # each member's piggybacked numbers (own included)
    lost: list[int]  # members that failed a receive (left, crashed, timed out)


async def sharded_allreduce(
    ctx: WorkerContext,
    vector: torch.Tensor,
    tag: str,
    ranks: list[int],
    meta: dict[str, float] | None = None,
) -> GroupSum:
    """Sum `vector` over `ranks` in two rounds (a reduce-scatter, then an all-gather): the
    member at position k serves shard k of `torch.tensor_split(vector, n)`.

    Every member sends shard j to member j and receives its own shard from all (round 1);
    it sums them in rank order and sends the sum to all (round 2). Two latencies and
    2(n-1)/n * size through each member's NIC, against the ring's 2(n-1) latencies: the
    right shape inside a site, where links are fast and latency is the cost. Each shard is
    summed once and then copied, so every member gets bit-identical totals.

    Tolerant, not all-or-nothing: a member that fails a receive is reported in `lost`;
    its part is left out of the shard sums, and a shard whose server is lost is filled
    with this member's own part (it keeps at least its own contribution). `meta` rides on
    the round-1 messages, so every member learns every other member's numbers.
    """
    ranks = sorted(ranks)
    me = ctx.rank
    own_meta = dict(meta or {})
    if len(ranks) == 1:
        return GroupSum(vector.clone(), {me: own_meta}, [])
    shards = vector.tensor_split(len(ranks))
    pos = ranks.index(me)
    others = [r for r in ranks if r != me]
    lost: list[int] = []
    metas = {me: own_meta}

    rs = f"{tag}/rs"
    sends = [
        asyncio.ensure_future(ctx.send(r, rs, Dense(shards[ranks.index(r)].clone()), own_meta))
        for r in others
    ]
    mine = shards[pos]
    got = await asyncio.gather(*(ctx.recv(r, rs, numel=mine.numel()) for r in others))
    parts = {me: mine}
    for r, msg in zip(others, got, strict=True):
        if isinstance(msg, Message):
            parts[r] = msg.payload.values  # type: ignore[union-attr]
            metas[r] = dict(msg.meta)
        else:
            lost.append(r)
    async with ctx.charged("sum", mine.numel() * len(parts)):
        summed = torch.zeros_like(mine)
        for r in sorted(parts):  # rank order: equal inputs give equal sums
            summed += parts[r]

    ag = f"{tag}/ag"
    sends += [asyncio.ensure_future(ctx.send(r, ag, Dense(summed))) for r in others]
    got = await asyncio.gather(
        *(ctx.recv(r, ag, numel=shards[ranks.index(r)].numel()) for r in others)
    )
    out = [summed if r == me else shards[ranks.index(r)].clone() for r in ranks]
    for r, msg in zip(others, got, strict=True):
        if isinstance(msg, Message):
            out[ranks.index(r)] = msg.payload.values  # type: ignore[union-attr]
        elif r not in lost:
            lost.append(r)
    await asyncio.gather(*sends)
    return GroupSum(torch.cat(out), metas, sorted(lost))
