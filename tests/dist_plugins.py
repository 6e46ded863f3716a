"""Strategies that exist only for the dist engine tests; workers import this module through
DLION_PLUGINS (with tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio

import torch
from pydantic import BaseModel, ConfigDict

from dlion.comm.messages import Dense, Message
from dlion.context import WorkerContext
from dlion.strategies import REGISTRY, StrategySpec


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def liar(ctx: WorkerContext, options: NoOptions) -> None:
    """Rank 1 sends rank 0 three bad tensors, then a good one, then one too large for the
    frame limit; rank 0 must take only the good one. Both then idle-train."""
    numel = ctx.replica.numel
    good = torch.arange(numel, dtype=torch.float32)
    if ctx.rank == 1:
        await ctx.send(0, "g", Dense(torch.full((numel,), float("nan"))))
        await ctx.send(0, "g", Dense(torch.zeros(3)))
        await ctx.send(0, "g", Dense(torch.zeros(numel, dtype=torch.float64)))
        await ctx.send(0, "g", Dense(good))
        await ctx.send(0, "huge", Dense(torch.zeros(200_000)))
    elif ctx.rank == 0:
        got = await ctx.recv(1, "g", numel=numel)
        ok = isinstance(got, Message) and torch.equal(got.payload.values, good)  # type: ignore[union-attr]
        ctx.record("took", good=ok)
    while True:
        result = await ctx.compute(8)
        ctx.iteration_done(result.loss)
        await asyncio.sleep(0.01)


REGISTRY["t-liar"] = StrategySpec("t-liar", "sends malformed tensors", NoOptions, liar)


async def latency_probe(ctx: WorkerContext, options: NoOptions) -> None:
    """Rank 0 sends rank 2 one 20 kB message and records how long its send took; rank 2
    records how long after the send began it was delivered. Then all idle-train."""
    if ctx.rank == 0:
        start = ctx.now()
        await ctx.send(2, "lat", Dense(torch.zeros(5000)))
        ctx.record("sent", seconds=ctx.now() - start)
    elif ctx.rank == 2:
        got = await ctx.recv(0, "lat", numel=5000)
        assert isinstance(got, Message)
        ctx.record("delivered", after=ctx.now() - got.sent_at)
    while True:
        result = await ctx.compute(8)
        ctx.iteration_done(result.loss)
        await asyncio.sleep(0.01)


REGISTRY["t-latency"] = StrategySpec(
    "t-latency", "one timed message across a pipe", NoOptions, latency_probe
)
