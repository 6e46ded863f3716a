"""Parameter server, BSP and ASP (Li et al., OSDI '14; ASP as Downpour SGD, Dean et al., NIPS '12).

The server is a role on one node (`server_rank`): that node also trains as a worker, its
server role running beside its worker role as a second coroutine, with that node's compute
and links. Workers train on equal batches b_i (sum G), push their mean gradient with b_i in
the message meta, and pull parameters. The server's replica is the authoritative model
(its optimizer, momentum included, lives there); the other replicas hold what their worker
last pulled, so evaluating them shows what each worker trains on.

- `ps-bsp` (bulk-synchronous): each round the server waits for the gradients of all live
  workers, applies sum_i (b_i / B) g_i with B = sum of the received b_i (= G while nobody
  is dropped: the gradient of the global batch, exactly what all-reduce applies), then
  sends the new parameters to every worker.
- `ps-asp` (asynchronous): the server applies each gradient as it arrives, weighted
  lr_scale * b_i / G, and returns fresh parameters to that worker only; nobody waits for
  anybody. b_i / G is the linear scaling rule (Goyal et al. '17): `train.lr` is set for G,
  so a gradient of b_i samples takes a b_i / G share of a step, and N asynchronous updates
  move the model as far as one synchronous step.

Options (both modes): `server_rank` (0), `timeout_s` (None: the engine's recv timeout).
A worker whose gradient does not arrive within `timeout_s` (BSP: of the round's start;
ASP: of its last one), or that left, is dropped for good: the server records `ps_drop`
and tells it (Control "dropped"); the worker records `ps_dropped` and stops instead of
waiting. A worker that loses the server records `ps_server_lost` and stops. ASP only:
`lr_scale` (1.0).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import Control, Dense, Message
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

BSP_SUMMARY = "parameter server, bulk-synchronous: sum of all gradients per round, then pull"
ASP_SUMMARY = "parameter server, asynchronous: apply each gradient on arrival, no waiting"

Mode = Literal["bsp", "asp"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server_rank: int = Field(
        0, ge=0, description="Rank of the node that runs the server role (it also trains)."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Drop a worker whose gradient is this late (None: engine.recv_timeout).",
    )


class AspOptions(Options):
    lr_scale: float = Field(
        1.0,
        gt=0,
        description="Multiplies the per-update weight b_i / G (1.0: linear scaling, the same "
        "step size per sample as synchronous SGD).",
    )


# ------------------------------------------------------------------ pure functions (tested)


def bsp_aggregate(grads: Mapping[int, tuple[torch.Tensor, int]]) -> torch.Tensor:
    """sum_i (b_i / B) g_i over {rank: (mean gradient g_i, batch b_i)}, B = sum b_i.

    Summed in rank order so equal inputs give bit-identical sums on every run."""
    if not grads:
        raise ValueError("bsp_aggregate needs at least one gradient")
    total_samples = sum(b for _, b in grads.values())
    out = torch.zeros_like(next(iter(grads.values()))[0])
    for rank in sorted(grads):
        grad, samples = grads[rank]
        out += grad * (samples / total_samples)
    return out


def asp_weight(samples: int, global_batch: int, lr_scale: float = 1.0) -> float:
    """Weight of one asynchronous gradient of `samples` samples: lr_scale * b_i / G."""
    return lr_scale * samples / global_batch


# ------------------------------------------------------------------ the worker


@dataclass
class _Local:
    """Hand-off between the server node's worker role and its server role (no network)."""

    grads: asyncio.Queue[tuple[torch.Tensor, int]] = field(default_factory=asyncio.Queue)
    rounds_done: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


async def bsp_worker(ctx: WorkerContext, opt: Options) -> None:
    await _run(ctx, opt, "bsp")


async def asp_worker(ctx: WorkerContext, opt: AspOptions) -> None:
    await _run(ctx, opt, "asp", opt.lr_scale)


async def _run(ctx: WorkerContext, opt: Options, mode: Mode, lr_scale: float = 1.0) -> None:
    if opt.server_rank >= ctx.world_size:
        raise ValueError(
            f"strategy.options.server_rank: {opt.server_rank}, but the cluster has "
            f"{ctx.world_size} workers (ranks 0..{ctx.world_size - 1})"
        )
    ranks = sorted([ctx.rank, *ctx.peers()])
    batch = equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]
    timeout = opt.timeout_s if opt.timeout_s is not None else ctx.recv_timeout
    if ctx.rank != opt.server_rank:
        await _remote_worker(ctx, opt.server_rank, batch, timeout, mode)
    elif mode == "bsp":
        local = _Local()
        await asyncio.gather(_bsp_server(ctx, local, timeout), _bsp_local_worker(ctx, local, batch))
    else:
        await asyncio.gather(
            _asp_server(ctx, lr_scale, timeout), _asp_local_worker(ctx, lr_scale, batch)
        )


async def _remote_worker(
    ctx: WorkerContext, server: int, batch: int, timeout: float, mode: Mode
) -> None:
    """Compute, push the gradient, wait for the parameters, train on them; both modes."""
    numel = ctx.replica.numel
    # Under BSP the server may itself wait `timeout` for a straggler before it replies.
    wait = 2 * timeout if mode == "bsp" else timeout
    t = 0
    while True:
        result = await ctx.compute(batch)
        tag = f"{t}" if mode == "bsp" else ""
        if not await ctx.send(server, "g" + tag, Dense(result.grad), {"samples": batch}):
            ctx.record("ps_server_lost", server=server, why="server left")
            return
        got = await ctx.recv(server, "p" + tag, timeout=wait, numel=numel)
        if not isinstance(got, Message):
            ctx.record("ps_server_lost", server=server, why=repr(got))
            return
        if isinstance(got.payload, Control):  # the server dropped us
            ctx.record("ps_dropped", server=server, why=got.payload.data.get("why", ""))
            return
        ctx.replica.set_params(got.payload.to_dense(numel))  # type: ignore[union-attr]
        t += 1
        ctx.iteration_done(result.loss)


async def _bsp_local_worker(ctx: WorkerContext, local: _Local, batch: int) -> None:
    # The server node trains on the authoritative replica itself: no pull needed.
    while True:
        result = await ctx.compute(batch)
        local.grads.put_nowait((result.grad, batch))
        await local.rounds_done.get()
        ctx.iteration_done(result.loss)


async def _bsp_server(ctx: WorkerContext, local: _Local, timeout: float) -> None:
    numel = ctx.replica.numel
    members = ctx.peers()
    notices: set[asyncio.Task[bool]] = set()
    t = 0
    while True:
        members = [p for p in members if p in ctx.peers()]
        # All receives start now, so `timeout` counts from the start of the round.
        results = await asyncio.gather(
            *(ctx.recv(p, f"g{t}", timeout=timeout, numel=numel) for p in members)
        )
        grads = {ctx.rank: await local.grads.get()}
        for p, got in zip(members, results, strict=True):
            if isinstance(got, Message):
                grads[p] = (got.payload.to_dense(numel), int(got.meta["samples"]))  # type: ignore[union-attr]
            else:
                _drop(ctx, p, repr(got), notices, tag=f"p{t}")
        members = [p for p in members if p in grads]
        ctx.replica.apply(bsp_aggregate(grads))
        local.rounds_done.put_nowait(t)
        params = Dense(ctx.replica.params())
        sent = await asyncio.gather(*(ctx.send(p, f"p{t}", params) for p in members))
        for p, ok in zip(members, sent, strict=True):
            if not ok:
                ctx.record("ps_drop", worker=p, why="left")
        members = [p for p, ok in zip(members, sent, strict=True) if ok]
        t += 1


async def _asp_local_worker(ctx: WorkerContext, lr_scale: float, batch: int) -> None:
    while True:
        result = await ctx.compute(batch)
        # Same node as the server: apply directly. No await in between, so this cannot
        # interleave with the server role's updates.
        ctx.replica.apply(result.grad * asp_weight(batch, ctx.global_batch, lr_scale))
        ctx.iteration_done(result.loss)


async def _asp_server(ctx: WorkerContext, lr_scale: float, timeout: float) -> None:
    numel = ctx.replica.numel
    last_heard = {p: ctx.now() for p in ctx.peers()}
    replies: set[asyncio.Task[bool]] = set()
    while last_heard:
        got = await ctx.recv(None, "g", timeout=timeout, numel=numel)
        now = ctx.now()
        if isinstance(got, Message) and got.src in last_heard:
            last_heard[got.src] = now
            grad = got.payload.to_dense(numel)  # type: ignore[union-attr]
            ctx.replica.apply(
                grad * asp_weight(int(got.meta["samples"]), ctx.global_batch, lr_scale)
            )
            # Reply in the background: the server keeps serving while the bytes go out.
            _spawn(replies, ctx.send(got.src, "p", Dense(ctx.replica.params())))
        # Otherwise a Timeout, or a gradient from a dropped worker that crossed our notice
        # (the notice stops it): nothing to apply.
        live = set(ctx.peers())
        for p in sorted(last_heard):
            if p not in live or now - last_heard[p] > timeout:
                why = "left" if p not in live else f"silent for {now - last_heard[p]:.3g} s"
                del last_heard[p]
                _drop(ctx, p, why, replies, tag="p")
    ctx.record("ps_no_workers")  # every worker is gone; the server node trains on alone


def _drop(
    ctx: WorkerContext, worker: int, why: str, tasks: set[asyncio.Task[bool]], tag: str
) -> None:
    """Forget a worker and tell it on the tag it waits on, so it stops instead of waiting."""
    ctx.record("ps_drop", worker=worker, why=why)
    _spawn(tasks, ctx.send(worker, tag, Control("dropped", {"why": why})))


def _spawn(tasks: set[asyncio.Task[bool]], coro: Coroutine[object, object, bool]) -> None:
    # Keep a reference until done: the loop holds tasks only weakly.
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
