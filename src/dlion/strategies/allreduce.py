"""Synchronous data-parallel SGD with a dense all-reduce every iteration (the baseline).

The exchange is `ctx.allreduce_sum`: the sim charges it as a ring of point-to-point
messages, and so does the dist engine on shaped links (on unshaped ones it runs one
torch.distributed collective over the members).

Membership changes: the ring is planned for the current membership epoch; when a worker
leaves, crashes (once detected) or joins, every ring member's collective fails at once
and the group re-forms over the live workers (`regroup`: everyone adopts the
longest-standing member's state, so replicas stay identical), then training goes on with
batches re-split over the new group.

Buffers (BatchNorm running statistics and other float buffers): all-reduced with the
gradient every iteration, weighted b_i / G like it, so every replica holds the same
buffers as well as the same parameters (the global batch's statistics).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from dlion.comm.collectives import CollectiveFailed, regroup
from dlion.context import WorkerContext

SUMMARY = "sync SGD: equal batches, dense ring all-reduce every iteration"


class Options(BaseModel):
    """All-reduce has no options of its own: batch and learning rate come from `train`."""

    model_config = ConfigDict(extra="forbid")


def equal_batches(global_batch: int, n: int) -> list[int]:
    """G split as evenly as possible; the first G mod n workers take one extra sample."""
    base, extra = divmod(global_batch, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


async def worker(ctx: WorkerContext, options: Options) -> None:
    # Workers present from the start share the initial model: no need to re-form. A
    # joiner re-forms first (its epoch is unknown), and so does everyone it joins.
    epoch: int | None = ctx.epoch if ctx.peer_since(ctx.rank) == 0 else None
    ranks = sorted([ctx.rank, *ctx.peers()])
    while True:
        if epoch != ctx.epoch:
            epoch, ranks = await regroup(ctx)
        batch = equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]
        result = await ctx.compute(batch)
        # Weight b_i / G so that the sum is the gradient of the global batch.
        buffers = ctx.replica.buffers
        async with ctx.charged("axpy", result.grad.numel() + buffers.numel()):
            weighted = result.grad * (batch / ctx.global_batch)
            if buffers.numel():
                weighted = torch.cat([weighted, buffers * (batch / ctx.global_batch)])
        tag = f"ar{epoch}.{ctx.iteration}"
        try:
            total = await ctx.allreduce_sum(weighted, tag, ranks=ranks, epoch=epoch)
        except CollectiveFailed as exc:
            ctx.record("collective_failed", tag=tag, why=str(exc))
            epoch = None  # re-form before the next iteration
            continue
        if buffers.numel():
            buffers.copy_(total[ctx.replica.numel :])
            total = total[: ctx.replica.numel]
        await ctx.apply(total)
        ctx.iteration_done(result.loss)
