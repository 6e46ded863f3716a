"""Synchronous data-parallel SGD with a dense ring all-reduce every iteration (the baseline)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from dlion.comm.collectives import ring_allreduce
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
    iteration = 0
    while True:
        ranks = sorted([ctx.rank, *ctx.peers()])
        batch = equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]
        result = await ctx.compute(batch)
        # Weight b_i / G so that the sum is the gradient of the global batch.
        weighted = result.grad * (batch / ctx.global_batch)
        total = await ring_allreduce(ctx, weighted, f"ar{iteration}")
        ctx.replica.apply(total)
        iteration += 1
        ctx.iteration_done(result.loss)
