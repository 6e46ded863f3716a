"""Collectives built from point-to-point messages, so the network charges every chunk."""

from __future__ import annotations

import asyncio

import torch

from dlion.comm.messages import Dense, Message
from dlion.context import WorkerContext


class CollectiveFailed(RuntimeError):
    """A peer left or timed out during a collective; the caller decides how to re-form."""


async def _exchange(
    ctx: WorkerContext, right: int, left: int, tag: str, chunk: torch.Tensor, numel: int
) -> torch.Tensor:
    _, got = await asyncio.gather(
        ctx.send(right, tag, Dense(chunk)), ctx.recv(left, tag, numel=numel)
    )
    if not isinstance(got, Message):
        raise CollectiveFailed(f"ring all-reduce step {tag}: {got}")
    return got.payload.values  # type: ignore[union-attr]


async def ring_allreduce(ctx: WorkerContext, vector: torch.Tensor, tag: str) -> torch.Tensor:
    """Sum `vector` over this worker and its live peers with the ring algorithm.

    Reduce-scatter then all-gather, N-1 steps each, one chunk of size/N to the right
    neighbour per step: 2(N-1) latencies and 2(N-1)/N * size over the slowest ring link.
    Each chunk is reduced once and then copied, so every worker gets bit-identical sums.
    """
    ranks = sorted([ctx.rank, *ctx.peers()])
    n = len(ranks)
    if n == 1:
        return vector.clone()
    pos = ranks.index(ctx.rank)
    right, left = ranks[(pos + 1) % n], ranks[(pos - 1) % n]
    chunks = [c.clone() for c in vector.tensor_split(n)]
    for step in range(n - 1):
        send_i, recv_i = (pos - step) % n, (pos - step - 1) % n
        got = await _exchange(
            ctx, right, left, f"{tag}/rs{step}", chunks[send_i], chunks[recv_i].numel()
        )
        chunks[recv_i] = got + chunks[recv_i]
    for step in range(n - 1):
        send_i, recv_i = (pos - step + 1) % n, (pos - step) % n
        chunks[recv_i] = await _exchange(
            ctx, right, left, f"{tag}/ag{step}", chunks[send_i], chunks[recv_i].numel()
        )
    return torch.cat(chunks)
