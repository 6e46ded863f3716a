"""DLion as published: decentralized training in micro-clouds (Hong & Chandra, HPDC '21).

Registered as `dlion-hpdc21`: the paper-faithful variant, every worker exchanging with
every peer each iteration (bulk-synchronous by default). The default `dlion` (dlion.py)
keeps its three techniques and adds the site hierarchy; its pure functions come from here.

Three techniques, each switchable off for an ablation (see ../shared/PAPERS.md, section 1):
- WDB, weighted dynamic batching: batch b_i proportional to measured speed, sum = G,
  gradient weight b_i / G, so the aggregate is the gradient of the global batch.
- PGE, per-link prioritized gradient exchange: on each link send the top-k entries of
  (weighted gradient + that link's residual) that fit its measured bandwidth within the
  compute-time budget; keep the rest as the residual (error feedback, nothing is lost).
- DKT, direct knowledge transfer: every `dkt_every` iterations the worker with the best
  training-loss EMA sends its parameters to the worse ones, which merge them in.

Speeds and loss EMAs ride along on the gradient messages (message meta), so every worker
makes the same WDB and DKT decisions from the same numbers without extra round trips.

Changing resources (PAPERS.md 1a re-profiling): speeds are measured (EMA of samples per
second of pure compute), so a capacity change shows in the next iterations' speeds and
batches are re-balanced at once when one drifts by more than `drift_threshold`; link
budgets use the measured bandwidth (`ctx.bandwidth`, an EMA of observed throughput), so a
slower link gets a smaller top-k. Membership: iteration t exchanges with `ctx.members(t)`
(a joiner is admitted from an iteration nobody has started, starting from a live peer's
model, with a fresh residual per link); a peer that leaves or fails a receive is dropped
and its residual discarded; any change of the member set re-balances batches at once.

Buffers (BatchNorm running statistics and other float buffers): PGE exchanges gradients
only, so each replica's buffers follow its own batches; DKT sends the best replica's
parameters and buffers together and merges both with the same gamma.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import INDEX_BYTES, VALUE_BYTES, Dense, Message, Payload, Sparse
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches
from dlion.strategies.wdb import equal_time_batches

SUMMARY = "DLion as in HPDC '21: WDB, per-link prioritized all-to-all exchange, knowledge transfer"


class SharedOptions(BaseModel):
    """The options both DLion variants have, with the same meaning (dlion.py adds its own)."""

    model_config = ConfigDict(extra="forbid")

    wdb: bool = Field(True, description="Weighted dynamic batching.")
    reprofile_every: int = Field(20, ge=1, description="Re-balance batches every N iterations.")
    drift_threshold: float = Field(
        0.2, gt=0, description="Re-balance at once when a speed drifts by more than this."
    )
    speed_ema: float = Field(
        0.5, gt=0, le=1, description="Weight of the newest speed sample in the speed EMA."
    )
    b_min: int = Field(1, ge=1, description="Smallest local batch.")
    b_max: int | None = Field(None, ge=1, description="Largest local batch (None: no cap).")
    dense_fraction: float = Field(
        0.5, gt=0, le=1, description="Send dense when top-k would cover this much of it."
    )
    dkt_every: int = Field(50, ge=1, description="Knowledge-transfer period in iterations.")
    dkt_gamma: float = Field(0.5, gt=0, le=1, description="Merge weight of the best model.")
    loss_ema: float = Field(0.9, ge=0, lt=1, description="History weight of the loss EMA.")


class Options(SharedOptions):
    pge: bool = Field(True, description="Per-link prioritized gradient exchange (else dense).")
    dkt: bool = Field(True, description="Direct knowledge transfer.")
    rho: float = Field(
        1.0, gt=0, description="Link time budget as a multiple of this iteration's compute."
    )
    min_link_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Every link may send for at least this share of the time budget, "
        "even when its latency exceeds the budget (no link starves).",
    )
    dkt_margin: float = Field(
        0.0, ge=0, description="Transfer only to workers whose loss EMA is worse by more."
    )
    staleness: int = Field(
        0, ge=0, description="Run up to this many iterations ahead of peers' messages."
    )


# ------------------------------------------------------------------ pure functions (tested)


def wdb_batch_sizes(
    global_batch: int, speeds: Sequence[float], b_min: int = 1, b_max: int | None = None
) -> list[int]:
    """b_i = round(G * C_i / sum C), clamped to [b_min, b_max], remainders to the fastest."""
    n = len(speeds)
    cap = global_batch if b_max is None else b_max
    if n * b_min > global_batch or n * cap < global_batch:
        raise ValueError(
            f"cannot split global batch {global_batch} over {n} workers within "
            f"[b_min={b_min}, b_max={cap}]"
        )
    total = sum(speeds)
    sizes = [min(cap, max(b_min, round(global_batch * s / total))) for s in speeds]
    fastest_first = sorted(range(n), key=lambda i: (-speeds[i], i))
    while sum(sizes) != global_batch:
        step = 1 if sum(sizes) < global_batch else -1
        for i in fastest_first:
            if sum(sizes) == global_batch:
                break
            if b_min <= sizes[i] + step <= cap:
                sizes[i] += step
    return sizes


def link_budget_entries(
    bandwidth: float,
    latency: float,
    time_budget: float,
    header_bytes: int = 0,
    min_fraction: float = 0.0,
) -> int:
    """How many (index, value) pairs fit in bandwidth * (time_budget - latency) bytes.

    A link whose latency alone exceeds the budget would never carry anything, and its
    residual would grow without ever being delivered; `min_fraction` keeps at least
    bandwidth * min_fraction * time_budget bytes for it (the message pays latency anyway
    under bulk-synchronous exchange).
    """
    send_time = max(time_budget - latency, min_fraction * time_budget)
    budget = bandwidth * send_time - header_bytes
    if budget <= 0:
        return 0
    return int(budget // (INDEX_BYTES + VALUE_BYTES))


class LinkResidual:
    """What one worker still owes one peer: c = weighted grad + residual; send top-k of c."""

    def __init__(self, numel: int, restored: torch.Tensor | None = None) -> None:
        # A resumed worker continues with the residual its checkpoint carried.
        self.residual = torch.zeros(numel)
        if restored is not None and restored.shape == (numel,) and restored.is_floating_point():
            self.residual = restored.to(torch.float32).clone()

    def step(self, weighted_grad: torch.Tensor, k: int, dense_fraction: float = 0.5) -> Payload:
        candidate = weighted_grad + self.residual
        numel = candidate.numel()
        if k >= dense_fraction * numel:
            self.residual.zero_()
            return Dense(candidate)
        if k <= 0:
            self.residual = candidate
            return Sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), numel)
        # topk on CPU is deterministic for a given input, so runs stay reproducible.
        idx = torch.topk(candidate.abs(), k, sorted=False).indices
        values = candidate[idx]  # advanced indexing copies
        candidate[idx] = 0.0
        self.residual = candidate
        return Sparse(idx, values, numel)


def dkt_merge(own: torch.Tensor, best: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_j <- (1 - gamma) * w_j + gamma * w_best."""
    return (1.0 - gamma) * own + gamma * best


def dkt_plan(losses: dict[int, float], margin: float) -> tuple[int, list[int]]:
    """(best worker, workers that receive its model): lowest loss EMA wins, ties to lower rank."""
    best = min(losses, key=lambda r: (losses[r], r))
    receivers = [r for r in sorted(losses) if r != best and losses[r] > losses[best] + margin]
    return best, receivers


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    G = ctx.global_batch
    me = ctx.rank
    t = ctx.iteration  # a joiner starts at the iteration it was admitted from
    # Per-peer link state, with the incarnation it belongs to: a returning peer starts afresh.
    links: dict[int, tuple[int, LinkResidual]] = {}
    lost: set[tuple[int, int]] = set()  # (rank, incarnation) that failed a receive
    ranks = ctx.members(t)
    batches = dict(zip(ranks, equal_batches(G, len(ranks)), strict=True))
    alloc_speeds: dict[int, float] | None = None
    speed: float | None = None
    loss_ema: float | None = None
    own_meta: dict[int, dict[str, float]] = {}
    in_flight: dict[int, list[asyncio.Task[bool]]] = {}
    receivers: dict[int, list[int]] = {}  # peers each iteration's gradient went to
    awaiting_model: list[tuple[int, str]] = []  # DKT transfers to merge when they arrive
    background: set[asyncio.Task[bool]] = set()

    def exchange_peers(iteration: int) -> list[int]:
        return [
            p for p in ctx.members(iteration) if p != me and (p, ctx.incarnation(p)) not in lost
        ]

    while True:
        for src, tag in list(awaiting_model):
            msg = ctx.poll(src, tag)
            if msg is not None:
                best = msg.payload.to_dense(ctx.replica.model_numel)  # type: ignore[union-attr]
                async with ctx.charged("axpy", 2 * ctx.replica.model_numel, 2):
                    merged = dkt_merge(ctx.replica.model_state(), best, opt.dkt_gamma)
                    ctx.replica.set_model_state(merged)
                awaiting_model.remove((src, tag))

        batch = batches.get(me, max(1, G // len(ranks)))
        result = await ctx.compute(batch)
        sample_speed = result.samples / result.seconds
        if ctx.step_overhead > 0:  # samples/s of the per-sample work alone (wdb.py)
            sample_speed = result.samples / max(result.seconds - ctx.step_overhead, 1e-9)
        speed = sample_speed if speed is None else ema(speed, sample_speed, opt.speed_ema)
        loss_ema = result.loss if loss_ema is None else ema(loss_ema, result.loss, 1 - opt.loss_ema)
        own_meta[t] = {"speed": speed, "loss": loss_ema}
        if ctx.step_overhead > 0:
            own_meta[t]["overhead"] = ctx.step_overhead
        async with ctx.charged("axpy", numel):
            weighted = result.grad * (batch / G)

        peers = exchange_peers(t)
        sends = []
        for p in peers:
            if p not in links or links[p][0] != ctx.incarnation(p):
                link = LinkResidual(numel, ctx.restored_state(f"residual.{p}"))
                links[p] = (ctx.incarnation(p), link)
                ctx.keep_state(f"residual.{p}", lambda link=link: link.residual)
            if opt.pge:
                k = link_budget_entries(
                    ctx.bandwidth(p),
                    ctx.latency(p),
                    opt.rho * result.seconds,
                    ctx.header_bytes,
                    opt.min_link_fraction,
                )
                async with ctx.charged("topk", numel):
                    payload = links[p][1].step(weighted, k, opt.dense_fraction)
                await ctx.charge("axpy", 2 * numel, 2)  # the residual's add and clear
            else:
                payload = Dense(weighted)
            sends.append(asyncio.ensure_future(ctx.send(p, f"g{t}", payload, own_meta[t])))
        in_flight[t] = sends
        receivers[t] = peers

        # Gather iteration t - s from every peer (t itself under bulk-synchronous s = 0):
        # the peers both sides exchanged with in that iteration.
        src_it = t - opt.staleness
        received: dict[int, torch.Tensor] = {}
        metas: dict[int, dict[str, float]] = {}
        if src_it in own_meta:
            senders = [p for p in exchange_peers(src_it) if p in receivers[src_it]]
            results = await asyncio.gather(
                *(ctx.recv(p, f"g{src_it}", numel=numel) for p in senders)
            )
            for p, got in zip(senders, results, strict=True):
                if isinstance(got, Message):
                    received[p] = got.payload.to_dense(numel)  # type: ignore[union-attr]
                    metas[p] = got.meta
                else:
                    ctx.record("peer_lost", peer=p, phase=f"g{src_it}", why=repr(got))
                    lost.add((p, ctx.incarnation(p)))
                    links.pop(p, None)
                    ctx.drop_state(f"residual.{p}")
            metas[me] = own_meta.pop(src_it)
            receivers.pop(src_it)
            await asyncio.gather(*in_flight.pop(src_it))

        # Own contribution plus peers', summed in rank order so equal inputs give equal sums.
        async with ctx.charged("sum", numel * (1 + len(received))):
            total = torch.zeros(numel)
            for r in sorted([me, *received]):
                total += weighted if r == me else received[r]
        await ctx.apply(total)

        if len(metas) > 1:
            speeds = {r: m["speed"] for r, m in metas.items() if "speed" in m}
            if opt.wdb and should_rebalance(
                src_it, speeds, alloc_speeds, opt.reprofile_every, opt.drift_threshold
            ):
                order = sorted(speeds)
                b_min = max(opt.b_min, ctx.replica.min_batch)  # BatchNorm needs two samples
                overheads = [metas[r].get("overhead", 0.0) for r in order]
                if any(overheads):  # fixed step costs: equalise step times (wdb.py)
                    sizes = equal_time_batches(
                        G, [speeds[r] for r in order], overheads, b_min, opt.b_max
                    )
                else:
                    sizes = wdb_batch_sizes(G, [speeds[r] for r in order], b_min, opt.b_max)
                batches = dict(zip(order, sizes, strict=True))
                alloc_speeds = speeds
                if me == order[0]:
                    ctx.record("wdb", iteration=t, batches=sizes, speeds=[speeds[r] for r in order])
            elif not opt.wdb:
                batches = dict(zip(sorted(metas), equal_batches(G, len(metas)), strict=True))
            if opt.dkt and src_it > 0 and src_it % opt.dkt_every == 0:
                losses = {r: m["loss"] for r, m in metas.items()}
                best, targets = dkt_plan(losses, opt.dkt_margin)
                tag = f"dkt{src_it}"
                if me == best:
                    params = Dense(ctx.replica.model_state())
                    for r in targets:
                        task = asyncio.ensure_future(ctx.send(r, tag, params))
                        background.add(task)
                        task.add_done_callback(background.discard)
                    if targets:
                        ctx.record("dkt", iteration=t, best=best, receivers=targets)
                elif me in targets:
                    awaiting_model.append((best, tag))
        elif len(metas) == 1 and set(batches) != {me}:
            batches = {me: G}  # alone: the whole global batch (re-balanced when peers come)
        ranks = sorted([me, *(p for p in exchange_peers(t + 1))])
        t += 1
        ctx.iteration_done(result.loss)


def ema(old: float, sample: float, weight_of_new: float) -> float:
    return (1 - weight_of_new) * old + weight_of_new * sample


def should_rebalance(
    iteration: int,
    speeds: dict[int, float],
    alloc_speeds: dict[int, float] | None,
    reprofile_every: int,
    drift_threshold: float,
) -> bool:
    """Re-balance when the member set changed, every `reprofile_every` iterations, or at
    once when a speed drifted by more than `drift_threshold` from the one allocated for."""
    if alloc_speeds is None or set(speeds) != set(alloc_speeds):
        return True
    if (iteration + 1) % reprofile_every == 0:
        return True
    return any(
        not math.isclose(speeds[r], alloc_speeds[r], rel_tol=drift_threshold) for r in speeds
    )
