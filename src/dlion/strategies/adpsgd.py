"""AD-PSGD: asynchronous decentralized parallel SGD (Lian, Zhang, Zhang & Liu, ICML '18).

No server and no global barrier. Each iteration a worker, as in the paper's Algorithm 1,
computes a gradient on its current model while it atomically averages that model with one
neighbour chosen uniformly at random (`ctx.rng`): both models become (x_i + x_j) / 2.
Then it applies the gradient (computed before the averaging: the paper's stale x-hat) with
its local SGD step, weight 1 on its own mean gradient of b_i = G / N samples, so the mean
of all models moves like synchronous SGD on the global batch with `train.lr`.

Atomic pairwise averaging. The initiator i holds its model lock for the whole round trip:
it sends x_i; the neighbour j (its server coroutine, running beside j's training) replaces
x_j by the average at once and returns it; i adopts it. Nothing else touches x_i meanwhile
(its own training only computes), so the pair's sum is conserved. Deadlock (A waits on B,
B on C, C on A) is avoided by `pairing`:
- "bipartite" (default, the paper's implementation): ranks at even positions are active,
  the others passive; only active workers initiate, and only with passive neighbours, so a
  request never meets a busy initiator.
- "any": every worker initiates after each step. A request that reaches a worker busy with
  its own averaging waits if it comes from a higher rank and is declined ("busy") if from
  a lower one: waits only ever point to lower ranks, so they cannot cycle. A declined
  initiator tries another neighbour, up to `max_attempts` times per iteration.

Options: `topology` ("all": every live peer is a neighbour; "ring": the two adjacent
ranks), `pairing` ("bipartite"), `max_attempts` (3, "any" only), `timeout_s` (None: the
engine's recv timeout; a neighbour that does not answer in time, or left, is dropped from
the graph and an `adpsgd_drop` event recorded).

Membership: the graph, the active/passive halves and the batch are re-derived from the
live ranks every iteration, so departures and joins (a joiner starts from a live peer's
model) reshape them at once; `serve_now` keeps averaging deadlock-free whatever the roles.
A neighbour dropped for a timeout stays dropped until it returns (a new incarnation).

Buffers (BatchNorm running statistics and other float buffers): the averaged model is
parameters and buffers, so both become (x_i + x_j) / 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import Control, Dense, Message
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "AD-PSGD: asynchronous SGD, atomic pairwise averaging with a random neighbour"

REQUEST = "avg-req"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topology: Literal["all", "ring"] = Field(
        "all", description="Neighbour graph: all peers, or the two adjacent ranks (ring)."
    )
    max_attempts: int = Field(
        3, ge=1, description="Neighbours to try per iteration while the chosen ones are busy."
    )
    pairing: Literal["bipartite", "any"] = Field(
        "bipartite",
        description="Who may initiate: active half only, with passive neighbours (bipartite, "
        "the paper's implementation), or every worker (any).",
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Drop a neighbour that does not answer in this time (None: engine default).",
    )


# ------------------------------------------------------------------ pure functions (tested)


def neighbours(rank: int, ranks: list[int], topology: Literal["all", "ring"]) -> list[int]:
    """This worker's neighbours among `ranks` (which include it), in rank order."""
    others = [r for r in sorted(ranks) if r != rank]
    if topology == "all" or len(others) <= 2:
        return others
    order = sorted(ranks)
    pos = order.index(rank)
    return sorted({order[(pos - 1) % len(order)], order[(pos + 1) % len(order)]})


def bipartite_targets(rank: int, ranks: list[int], graph: list[int]) -> list[int]:
    """Whom `rank` initiates averaging with: passive neighbours if it is active (even
    position in rank order), nobody if it is passive (it only answers)."""
    active = set(sorted(ranks)[0::2])
    return [p for p in graph if p not in active] if rank in active else []


def pairwise_average(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) / 2; symmetric in its arguments to the bit."""
    return (a + b) * 0.5


def serve_now(own_rank: int, requester: int, initiating: bool) -> bool | None:
    """How a request is handled: True serve at once, None queue until our own averaging
    ends, False decline. Only requests from higher ranks ever wait, so waits never cycle."""
    if not initiating:
        return True
    return None if requester > own_rank else False


# ------------------------------------------------------------------ the worker


@dataclass
class _State:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    initiating: bool = False  # True while this worker waits for its own averaging's reply
    seq: int = 0  # numbers this worker's requests, so each reply has a tag of its own
    dropped: set[tuple[int, int]] = field(default_factory=set)  # (rank, incarnation)
    tasks: set[asyncio.Task[bool]] = field(default_factory=set)


async def worker(ctx: WorkerContext, opt: Options) -> None:
    timeout = opt.timeout_s if opt.timeout_s is not None else ctx.recv_timeout
    state = _State()
    await asyncio.gather(_serve(ctx, state), _train(ctx, opt, state, timeout))


def _plan(ctx: WorkerContext, opt: Options) -> tuple[int, list[int]]:
    """(batch, whom to initiate averaging with) for the current live ranks."""
    ranks = sorted([ctx.rank, *ctx.peers()])
    batch = equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]
    graph = neighbours(ctx.rank, ranks, opt.topology)
    if opt.pairing == "bipartite":
        graph = bipartite_targets(ctx.rank, ranks, graph)
    return batch, graph


async def _train(ctx: WorkerContext, opt: Options, state: _State, timeout: float) -> None:
    while True:
        batch, graph = _plan(ctx, opt)
        # compute() takes the gradient of the current model before its (virtual) compute
        # time passes; the averaging runs during that time, as in the paper.
        result, _ = await asyncio.gather(
            ctx.compute(batch), _average(ctx, opt, state, graph, timeout)
        )
        async with state.lock:
            await ctx.apply(result.grad)
        ctx.iteration_done(result.loss)


async def _average(
    ctx: WorkerContext, opt: Options, state: _State, graph: list[int], timeout: float
) -> bool:
    """One atomic pairwise averaging with a random live neighbour; False if none took part."""
    numel = ctx.replica.model_numel
    for _ in range(opt.max_attempts):
        live = set(ctx.peers())
        candidates = [
            p for p in graph if p in live and (p, ctx.incarnation(p)) not in state.dropped
        ]
        if not candidates:
            return False
        peer = ctx.rng.choice(candidates)
        async with state.lock:
            state.initiating = True
            try:
                state.seq += 1
                reply_tag = f"avg-rep{state.seq}"
                sent = await ctx.send(
                    peer, REQUEST, Dense(ctx.replica.model_state()), {"seq": state.seq}
                )
                got = (
                    await ctx.recv(peer, reply_tag, timeout=timeout, numel=numel) if sent else None
                )
                if isinstance(got, Message) and isinstance(got.payload, Dense):
                    async with ctx.charged("axpy", numel):
                        ctx.replica.set_model_state(got.payload.values)
                    return True
            finally:
                state.initiating = False
        if isinstance(got, Message):  # declined: the neighbour is busy averaging itself
            continue
        state.dropped.add((peer, ctx.incarnation(peer)))
        ctx.record("adpsgd_drop", peer=peer, why="left" if got is None else repr(got))
    return False


async def _serve(ctx: WorkerContext, state: _State) -> None:
    """The passive side: answer other workers' averaging requests, concurrently with training."""
    numel = ctx.replica.model_numel
    while True:
        msg = await ctx.recv(None, REQUEST, numel=numel)
        if not isinstance(msg, Message):
            continue  # a quiet spell (Timeout): keep serving
        decision = serve_now(ctx.rank, msg.src, state.initiating)
        if decision is True:
            _spawn(state, _reply_average(ctx, msg))
        elif decision is None:
            _spawn(state, _serve_after_own(ctx, state, msg))
        else:
            reply_tag = f"avg-rep{int(msg.meta['seq'])}"
            _spawn(state, ctx.send(msg.src, reply_tag, Control("busy")))


async def _serve_after_own(ctx: WorkerContext, state: _State, msg: Message) -> bool:
    async with state.lock:
        reply = _reply_average(ctx, msg)
    # Our model is final once averaged: no need to hold the lock while the reply goes out.
    return await reply


def _reply_average(ctx: WorkerContext, msg: Message) -> Coroutine[object, object, bool]:
    """Average with the requester now (no await: atomic), then send the result back."""
    average = pairwise_average(ctx.replica.model_state(), msg.payload.values)  # type: ignore[union-attr]
    ctx.replica.set_model_state(average)
    return _charged_reply(ctx, msg.src, f"avg-rep{int(msg.meta['seq'])}", average)


async def _charged_reply(ctx: WorkerContext, dst: int, tag: str, average: torch.Tensor) -> bool:
    """Pay for the averaging just done (its sum and the copy), then send the reply."""
    await ctx.charge("axpy", 2 * average.numel(), 2)
    return await ctx.send(dst, tag, Dense(average))


def _spawn(state: _State, coro: Coroutine[object, object, bool]) -> None:
    # Keep a reference until done: the loop holds tasks only weakly.
    task = asyncio.ensure_future(coro)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
