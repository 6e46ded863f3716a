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

Membership changes (transient servers): the server role belongs to `server_rank` while it
is live, else to the lowest live rank (`current_server`). When the server node leaves or
its crash is detected, every worker switches to the new server, which continues from its
own replica (the model it last pulled); if `server_rank` returns (it joins with the
acting server's current model), the acting server finishes its round and hands the role
back. A server serves every live worker that is not dropped, joiners included; batches
are re-split over the live workers.

Options (both modes): `server_rank` (0), `timeout_s` (None: the engine's recv timeout).
A worker whose gradient does not arrive within `timeout_s` (BSP: of the round's start;
ASP: of its last one), or that left, is dropped for good: the server records `ps_drop`
and tells it (Control "dropped"); the worker records `ps_dropped` and stops instead of
waiting. A worker that loses the server records `ps_server_lost` and stops. ASP only:
`lr_scale` (1.0).

Buffers (BatchNorm running statistics and other float buffers): workers pull the server
replica's parameters and buffers together, so a worker evaluates with the server's
statistics; the server's own buffers follow its own batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import Control, Dense, Message, RecvResult, ViewChanged
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


def current_server(ctx: WorkerContext, preferred: int) -> int:
    """`preferred` while it is live, else the lowest live rank (every worker computes the
    same from the same membership)."""
    live = [ctx.rank, *ctx.peers()]
    return preferred if preferred in live else min(live)


def _my_batch(ctx: WorkerContext) -> int:
    """Equal share of the global batch over the live workers."""
    ranks = sorted([ctx.rank, *ctx.peers()])
    return equal_batches(ctx.global_batch, len(ranks))[ranks.index(ctx.rank)]


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
    timeout = opt.timeout_s if opt.timeout_s is not None else ctx.recv_timeout
    while True:
        server = current_server(ctx, opt.server_rank)
        if server != ctx.rank:
            if not await _remote_worker(ctx, opt.server_rank, server, timeout, mode):
                return  # dropped, or the server went silent: stop
        elif mode == "bsp":
            await _bsp_server(ctx, opt.server_rank, timeout)
        else:
            await asyncio.gather(
                _asp_server(ctx, opt.server_rank, lr_scale, timeout),
                _asp_local_worker(ctx, opt.server_rank, lr_scale),
            )
        ctx.record("ps_role", server=current_server(ctx, opt.server_rank))


async def _remote_worker(
    ctx: WorkerContext, preferred: int, server: int, timeout: float, mode: Mode
) -> bool:
    """Compute, push the gradient, wait for the parameters, train on them; both modes.
    Returns True when the server role moved (go on with the new server), False to stop."""
    numel = ctx.replica.model_numel  # pulled models carry the server's buffers too
    # Under BSP the server may itself wait `timeout` for a straggler before it replies.
    wait = 2 * timeout if mode == "bsp" else timeout
    while True:
        batch = _my_batch(ctx)
        result = await ctx.compute(batch)
        if current_server(ctx, preferred) != server:
            return True
        if not await ctx.send(server, "g", Dense(result.grad), {"samples": batch}):
            ctx.record("ps_server_lost", server=server, why="server left")
            return True
        deadline = ctx.now() + wait
        while True:
            # Guarded: a membership change wakes us, in case the role moved meanwhile.
            got = await ctx.recv(
                server, "p", timeout=max(0.0, deadline - ctx.now()), numel=numel, epoch=ctx.epoch
            )
            if not isinstance(got, ViewChanged):
                break
            if current_server(ctx, preferred) != server:
                ctx.record("ps_server_lost", server=server, why="role moved")
                return True
        if not isinstance(got, Message):
            ctx.record("ps_server_lost", server=server, why=repr(got))
            return server not in ctx.peers()  # gone: switch; silent but live: stop
        if isinstance(got.payload, Control):  # the server dropped us
            ctx.record("ps_dropped", server=server, why=got.payload.data.get("why", ""))
            return False
        async with ctx.charged("axpy", numel):
            ctx.replica.set_model_state(got.payload.to_dense(numel))  # type: ignore[union-attr]
        ctx.iteration_done(result.loss)


async def _bsp_server(ctx: WorkerContext, preferred: int, timeout: float) -> None:
    """Serve rounds while this node holds the role; the node trains too (its gradient is
    computed while it waits for the others', as a worker beside the server would)."""
    numel = ctx.replica.numel
    dropped: set[tuple[int, int]] = set()  # (rank, incarnation): a returning worker is served
    notices: set[asyncio.Task[bool]] = set()
    batch = _my_batch(ctx)
    own = asyncio.ensure_future(ctx.compute(batch))
    while True:
        members = [p for p in ctx.peers() if (p, ctx.incarnation(p)) not in dropped]
        results = await _gather_round(ctx, preferred, members, timeout)
        if results is None:  # the role moved during the round: hand it over
            own.cancel()
            return
        mine = await own
        grads = {ctx.rank: (mine.grad, batch)}
        for p, got in zip(members, results, strict=True):
            if isinstance(got, Message):
                grads[p] = (got.payload.to_dense(numel), int(got.meta["samples"]))  # type: ignore[union-attr]
            elif p in ctx.peers():
                dropped.add((p, ctx.incarnation(p)))
                _drop(ctx, p, repr(got), notices, tag="p")
            else:
                ctx.record("ps_drop", worker=p, why="left")
        members = [p for p in members if p in grads]
        async with ctx.charged("sum", numel * len(grads)):
            total = bsp_aggregate(grads)
        await ctx.apply(total)
        ctx.iteration_done(mine.loss)
        serving = current_server(ctx, preferred) == ctx.rank
        if serving:
            batch = _my_batch(ctx)
            own = asyncio.ensure_future(ctx.compute(batch))
        params = Dense(ctx.replica.model_state())
        sent = await asyncio.gather(*(ctx.send(p, "p", params) for p in members))
        for p, ok in zip(members, sent, strict=True):
            if not ok:
                ctx.record("ps_drop", worker=p, why="left")
        if not serving:
            return


async def _gather_round(
    ctx: WorkerContext, preferred: int, members: list[int], timeout: float
) -> list[RecvResult] | None:
    """Every member's gradient of this round (or why it is missing); None if the server
    role moved meanwhile. All receives start now, so `timeout` counts from the start of
    the round; a membership change wakes them (guarded) to check the role, then the
    receives still missing go on until the same deadline."""
    numel = ctx.replica.numel
    deadline = ctx.now() + timeout
    got: dict[int, RecvResult] = {}
    while True:
        waiting = [p for p in members if p not in got]
        results = await asyncio.gather(
            *(
                ctx.recv(
                    p, "g", timeout=max(0.0, deadline - ctx.now()), numel=numel, epoch=ctx.epoch
                )
                for p in waiting
            )
        )
        changed = False
        for p, result in zip(waiting, results, strict=True):
            if isinstance(result, ViewChanged):
                changed = True
            else:
                got[p] = result
        if not changed:
            return [got[p] for p in members]
        if current_server(ctx, preferred) != ctx.rank:
            return None


async def _asp_local_worker(ctx: WorkerContext, preferred: int, lr_scale: float) -> None:
    while current_server(ctx, preferred) == ctx.rank:
        batch = _my_batch(ctx)
        result = await ctx.compute(batch)
        # Same node as the server: apply directly. The step itself runs before the charge's
        # wait, so it cannot interleave with the server role's updates.
        await ctx.apply(result.grad * asp_weight(batch, ctx.global_batch, lr_scale))
        ctx.iteration_done(result.loss)


async def _asp_server(ctx: WorkerContext, preferred: int, lr_scale: float, timeout: float) -> None:
    numel = ctx.replica.numel
    last_heard = {p: ctx.now() for p in ctx.peers()}
    dropped: set[tuple[int, int]] = set()  # (rank, incarnation): a returning worker is served
    replies: set[asyncio.Task[bool]] = set()
    alone = False
    while current_server(ctx, preferred) == ctx.rank:
        # Guarded: a membership change wakes the server (a joiner to serve, a role to hand back).
        got = await ctx.recv(None, "g", timeout=timeout, numel=numel, epoch=ctx.epoch)
        now = ctx.now()
        if (
            isinstance(got, Message)
            and got.src in ctx.peers()
            and (got.src, ctx.incarnation(got.src)) not in dropped
        ):
            last_heard[got.src] = now  # a joiner, or a worker whose server left, is served too
            grad = got.payload.to_dense(numel)  # type: ignore[union-attr]
            await ctx.apply(grad * asp_weight(int(got.meta["samples"]), ctx.global_batch, lr_scale))
            # Reply in the background: the server keeps serving while the bytes go out.
            _spawn(replies, ctx.send(got.src, "p", Dense(ctx.replica.model_state())))
        # Otherwise a Timeout, a membership change, or a gradient from a dropped worker that
        # crossed our notice (the notice stops it): nothing to apply.
        live = set(ctx.peers())
        for p in sorted(last_heard):
            if p not in live or now - last_heard[p] > timeout:
                why = "left" if p not in live else f"silent for {now - last_heard[p]:.3g} s"
                del last_heard[p]
                if p in live:
                    dropped.add((p, ctx.incarnation(p)))
                    _drop(ctx, p, why, replies, tag="p")
                else:
                    ctx.record("ps_drop", worker=p, why=why)
        if not last_heard and not alone:
            ctx.record("ps_no_workers")  # every worker is gone; the server node trains on alone
        alone = not last_heard


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
