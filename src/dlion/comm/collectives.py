"""Collectives built from point-to-point messages, so the network charges every chunk."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dlion.comm.messages import (
    VALUE_BYTES,
    Dense,
    Message,
    Payload,
    RecvResult,
    dense_values,
    tensor_problem,
)


class WorkerContext(Protocol):
    """What a collective uses of a worker's context (dlion.context.WorkerContext has it;
    spelled out here so that the context can offer collectives without an import circle)."""

    rank: int
    epoch: int

    def peers(self) -> list[int]: ...

    def peer_since(self, rank: int) -> int: ...

    def record(self, event: str, **fields: Any) -> None: ...

    def reject(self, msg: Message, why: str) -> None: ...

    def charged(self, kind: str, numel: int, ops: int = 1) -> AbstractAsyncContextManager[None]: ...

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
    return dense_values(got)


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

    Members may start with different views: on real processes one survivor learns of a
    departure a moment before another, after both planned the iteration. So round-1 tags
    name the sender's group, and a member that hears a smaller group from a peer (one that
    still counts it) narrows its own to the intersection and sends again. Every view
    shrinks to the same intersection; the members left out of it are reported in `lost`.
    """
    ranks = sorted(ranks)
    me = ctx.rank
    own_meta = dict(meta or {})
    if len(ranks) == 1:
        return GroupSum(vector.clone(), {me: own_meta}, [])
    group, failed, got, sends = await _agree_round_one(ctx, vector, tag, ranks, own_meta)
    lost = sorted(set(failed) | (set(ranks) - set(group)))
    if len(group) == 1:  # everyone else failed or dropped this member
        await asyncio.gather(*sends)
        return GroupSum(vector.clone(), {me: own_meta}, lost)
    shards = vector.tensor_split(len(group))
    pos = group.index(me)
    others = [r for r in group if r != me]
    mine = shards[pos]
    parts = {me: mine}
    metas = {me: own_meta}
    for r, part in got.items():
        parts[r] = dense_values(part)
        metas[r] = dict(part.meta)
    async with ctx.charged("sum", mine.numel() * len(parts)):
        summed = torch.zeros_like(mine)
        for r in sorted(parts):  # rank order: equal inputs give equal sums
            summed += parts[r]

    ag = _group_tag(tag, "ag", group)
    sends += [asyncio.ensure_future(ctx.send(r, ag, Dense(summed))) for r in others]
    answers = await asyncio.gather(
        *(ctx.recv(r, ag, numel=shards[group.index(r)].numel()) for r in others)
    )
    out = [summed if r == me else shards[group.index(r)].clone() for r in group]
    for r, msg in zip(others, answers, strict=True):
        if isinstance(msg, Message):
            out[group.index(r)] = dense_values(msg)
        elif r not in lost:
            lost.append(r)
    await asyncio.gather(*sends)
    return GroupSum(torch.cat(out), metas, sorted(lost))


def _group_tag(tag: str, round_name: str, group: list[int]) -> str:
    return f"{tag}/{round_name}/" + ",".join(map(str, group))


def _sender_group(msg: Message) -> set[int]:
    """The group named by a `_group_tag`; empty if the tag names none (a peer's garbage
    then reads as a member that no longer counts this one)."""
    try:
        return {int(x) for x in msg.tag.rsplit("/", 1)[1].split(",")}
    except (ValueError, IndexError):
        return set()


async def _agree_round_one(
    ctx: WorkerContext,
    vector: torch.Tensor,
    tag: str,
    ranks: list[int],
    meta: dict[str, float],
) -> tuple[list[int], list[int], dict[int, Message], list[asyncio.Future[bool]]]:
    """Round 1 of `sharded_allreduce` with views that may differ: (the agreed group, the
    members that failed a receive, each other member's round-1 message, the sends).

    Each pass sends this member's shards to its group under a tag naming the group, then
    takes one round-1 message from every member it has none from under that tag. A tag
    naming a smaller group that holds this member narrows the group to the intersection
    (and the shards go out again, split for it); a group without this member means the
    sender dropped it (lost to it); a larger group is a view the sender will narrow (its
    next message is awaited). Groups only shrink, so the passes end."""
    me = ctx.rank
    group = ranks
    failed: list[int] = []
    heard: dict[int, Message] = {}  # each member's latest round-1 message
    got: dict[int, Message] = {}  # those under this member's current group's tag
    sends: list[asyncio.Future[bool]] = []
    sent_for: list[int] | None = None
    while True:
        rs = _group_tag(tag, "rs", group)
        if group != sent_for:
            shards = vector.tensor_split(len(group))
            own_numel = shards[group.index(me)].numel()
            sends += [
                asyncio.ensure_future(ctx.send(r, rs, Dense(shards[i].clone()), meta))
                for i, r in enumerate(group)
                if r != me
            ]
            sent_for = group
        for r, msg in list(heard.items()):
            if r in group and r not in got and msg.tag == rs:
                problem = tensor_problem(msg.payload, own_numel)
                if problem is None:
                    got[r] = msg
                else:
                    ctx.reject(msg, problem)
                    del heard[r]
        waiting = [r for r in group if r != me and r not in failed and r not in got]
        if not waiting:
            break
        answers = await asyncio.gather(*(ctx.recv(r, f"{tag}/rs/*") for r in waiting))
        narrowed = set(group)
        for r, answer in zip(waiting, answers, strict=True):
            theirs = _sender_group(answer) if isinstance(answer, Message) else set()
            if not isinstance(answer, Message) or me not in theirs:
                failed.append(r)  # gone, silent, or it no longer counts this member
            else:
                heard[r] = answer
                narrowed &= theirs
        if sorted(narrowed) != group:  # what came under the old group's tag is void
            group = sorted(narrowed)
            got = {}
    return group, failed, got, sends
