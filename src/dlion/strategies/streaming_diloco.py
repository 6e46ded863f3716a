"""Streaming DiLoCo: DiLoCo with the model synchronised fragment by fragment, overlapped
with computation (Douillard et al., 2025; ../shared/PAPERS.md, section 7).

Rule. The model's layers are split into P = `fragments` fragments, strided over depth
(layer l belongs to fragment l mod P, so every fragment spans the whole network;
`strided_fragments`). Members run inner steps with the replica's configured optimizer
(`train.optimizer`, AdamW in the paper) without pause. After inner step s, when s is a
multiple of H/P (`H`, `fragments`), fragment p = (s / (H/P)) mod P starts its sync: each
member's weighted pseudo-gradient for that fragment, (b_i / G)(theta[p] - theta_i[p]),
is summed by a ring all-reduce that runs in the background while the member goes on with
the next `tau` inner steps. After inner step s + tau the sum must be there (the member
waits for it if not); the outer Nesterov step (`diloco.outer_nesterov`, lr `outer_lr`
0.7, momentum `outer_momentum` 0.9, momentum kept per entry) gives the new global
fragment, and the member merges it into its local one:
    theta_i[p] <- alpha theta_i[p] + (1 - alpha) theta_global[p]      (alpha = `alpha`)
Each fragment is thus synchronised once every H inner steps, one every H/P steps, so the
peak bandwidth is 1/P of DiLoCo's and the all-reduce hides behind tau steps of compute.
Paper constants: alpha 0.5, tau of a few steps; H here is small (default 20) as for
DiLoCo.

Low-bit outer gradients (`bits`, off by default: float32 and a ring all-reduce). With
`bits` b in {1, 2, 4, 8} (the paper uses 4), each member sends its weighted fragment
pseudo-gradient v quantized (`quantize_dense`): in chunks of `quant_chunk` consecutive
entries, scale s = max |v| over the chunk, each entry the nearest of 2^b uniform levels
over [-s, s] (deterministic rounding; no error feedback, as in the paper), on the wire
b bits per entry plus one float32 scale per chunk. The quantized vectors are exchanged
with a ring all-gather (each relayed unchanged, so every member decodes the same bytes)
and every member sums the decoded vectors in rank order: the same sum everywhere.

Buffers (BatchNorm running statistics and other float buffers): travel with fragment 0,
averaged (weighted b_i / G) and merged with the same alpha.

Membership changes: as DiLoCo (`diloco.adopt_leader`). Every inner step checks the
membership epoch; a change, or a failed fragment all-reduce, drops the syncs in flight,
and every member goes back to the global model of the longest-standing member, with its
outer momentum and step counter, before inner steps resume. Checkpoints carry the global
model and the outer momentum.
"""

from __future__ import annotations

import asyncio

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from dlion.comm.collectives import CollectiveFailed, ring_allgather, ring_allreduce
from dlion.comm.messages import QUANT_BITS, Quantized
from dlion.context import WorkerContext
from dlion.strategies.diloco import (
    adopt_leader,
    initial_state,
    inner_step,
    my_batch,
    outer_nesterov,
)

SUMMARY = "Streaming DiLoCo: one strided fragment synced every H/P steps, overlapped, merged"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    H: int = Field(20, ge=1, description="Inner steps between two syncs of one fragment.")
    fragments: int = Field(2, ge=1, description="P: fragments, strided over layers.")
    tau: int = Field(2, ge=0, description="Inner steps a fragment's all-reduce overlaps.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the local fragment in the merge (paper: 0.5)."
    )
    outer_lr: float = Field(0.7, gt=0, description="Outer Nesterov learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum.")
    bits: int | None = Field(
        None, description="Bits per outer-gradient entry (1, 2, 4 or 8; None: float32)."
    )
    quant_chunk: int = Field(
        1024, ge=1, description="Entries sharing one float32 scale when `bits` is set."
    )

    @model_validator(mode="after")
    def _schedule(self) -> Options:
        if self.H % self.fragments:
            raise ValueError(f"H ({self.H}) must be a multiple of fragments ({self.fragments})")
        if self.bits is not None and self.bits not in QUANT_BITS:
            raise ValueError(
                f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {self.bits}"
            )
        if self.tau >= self.H:
            raise ValueError(
                f"tau ({self.tau}) must be below H ({self.H}): a fragment's "
                "sync must be merged before its next one starts"
            )
        return self


# ------------------------------------------------------------------ pure functions (tested)


def layer_sizes(model: nn.Module) -> list[int]:
    """Entries per layer in the replica's flat order: consecutive trainable parameters of
    one module (a layer's weight and bias) form one layer."""
    sizes: list[int] = []
    last = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner == last:
            sizes[-1] += param.numel()
        else:
            sizes.append(param.numel())
            last = owner
    return sizes


def strided_fragments(sizes: list[int], fragments: int) -> list[torch.Tensor]:
    """Flat indices of each fragment: layer l (of the given sizes, in order) goes to
    fragment l mod `fragments`. ValueError if there are fewer layers than fragments."""
    if len(sizes) < fragments:
        raise ValueError(
            f"strategy.options.fragments: {fragments}, but the model has {len(sizes)} layers"
        )
    parts: list[list[torch.Tensor]] = [[] for _ in range(fragments)]
    start = 0
    for layer, size in enumerate(sizes):
        parts[layer % fragments].append(torch.arange(start, start + size))
        start += size
    return [torch.cat(p) for p in parts]


def quantize_dense(v: torch.Tensor, bits: int, chunk: int) -> Quantized:
    """v in `bits` bits per entry, one scale per `chunk` consecutive entries (the chunk's
    largest magnitude), each entry the nearest of 2**bits uniform levels over [-s, s]."""
    n = v.numel()
    top = 2**bits - 1
    pad = (-n) % chunk
    parts = torch.cat([v, torch.zeros(pad)]).reshape(-1, chunk)
    scales = parts.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((parts / safe[:, None] + 1.0) * (top / 2.0)).clamp(0, top)
    # A zero chunk: the code nearest 0 (its value is 0 times the level anyway).
    codes = torch.where(scales[:, None] > 0, codes, torch.full_like(codes, (top + 1) // 2))
    codes = codes.reshape(-1)[:n].to(torch.uint8)
    return Quantized(torch.zeros(0, dtype=torch.int64), codes, scales, n, bits, chunk)


async def quantized_sum(
    ctx: WorkerContext,
    vector: torch.Tensor,
    tag: str,
    *,
    ranks: list[int],
    epoch: int | None,
    bits: int,
    chunk: int,
) -> torch.Tensor:
    """The sum over `ranks` of each member's `vector` quantized (`quantize_dense`),
    exchanged by a ring all-gather and decoded and summed in rank order by every member.
    Raises CollectiveFailed as the ring all-reduce does."""
    n = vector.numel()
    async with ctx.charged("quant", n):
        payload = quantize_dense(vector, bits, chunk)
    got = await ring_allgather(ctx, payload, {}, tag, ranks=ranks, epoch=epoch, numel=n)
    async with ctx.charged("sum", n * len(got)):
        total = torch.zeros(n)
        for r in sorted(got):
            q = got[r][0]
            if not isinstance(q, Quantized):
                raise CollectiveFailed(f"quantized sum {tag}: rank {r} sent {type(q).__name__}")
            total += q.to_dense(n)
    return total


def merge(local: torch.Tensor, global_: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * local + (1 - alpha) * global."""
    return alpha * local + (1 - alpha) * global_


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    frags = strided_fragments(layer_sizes(ctx.replica.model), opt.fragments)
    period = opt.H // opt.fragments
    state = initial_state(ctx, "streaming.global")
    epoch: int | None = ctx.epoch if ctx.peer_since(ctx.rank) == 0 else None
    members = sorted([ctx.rank, *ctx.peers()])
    # Syncs in flight: (inner step after which to merge, fragment, all-reduce task).
    pending: list[tuple[int, int, asyncio.Future[torch.Tensor]]] = []
    while True:
        if epoch != ctx.epoch:
            # The syncs in flight fail at once (guarded receives); let them finish.
            await asyncio.gather(*(task for _, _, task in pending), return_exceptions=True)
            pending.clear()
            epoch, members = await adopt_leader(ctx, "streaming", state)
        batch = my_batch(ctx, members)
        if not await inner_step(ctx, batch, epoch):
            continue
        state.step += 1
        step = state.step
        if step % period == 0:
            p = (step // period) % opt.fragments
            weight = batch / ctx.global_batch
            idx = frags[p]
            async with ctx.charged("axpy", 2 * idx.numel(), 2):
                vector = (state.model[idx] - ctx.replica.flat[idx]) * weight
                if p == 0:
                    vector = torch.cat([vector, ctx.replica.buffers * weight])
            tag = f"sd{epoch}.{step}"
            if opt.bits is None:
                exchange = ring_allreduce(ctx, vector, tag, ranks=members, epoch=epoch)
            else:
                exchange = quantized_sum(
                    ctx,
                    vector,
                    tag,
                    ranks=members,
                    epoch=epoch,
                    bits=opt.bits,
                    chunk=opt.quant_chunk,
                )
            task = asyncio.ensure_future(exchange)
            pending.append((step + opt.tau, p, task))
        while pending and pending[0][0] <= step:
            _, p, task = pending.pop(0)
            try:
                total = await task
            except CollectiveFailed as exc:
                ctx.record("collective_failed", tag=f"sd{epoch}.fragment{p}", why=str(exc))
                epoch = None  # re-form before the next step
                break
            idx = frags[p]
            # The outer step (an SGD-with-momentum step), then the merge (two axpys).
            async with ctx.charged("sgd", idx.numel()):
                theta, momentum = outer_nesterov(
                    state.model[idx],
                    total[: idx.numel()],
                    state.momentum[idx],
                    opt.outer_lr,
                    opt.outer_momentum,
                )
                state.model[idx] = theta
                state.momentum[idx] = momentum
            async with ctx.charged("axpy", 2 * idx.numel(), 2):
                flat = ctx.replica.flat
                flat[idx] = merge(flat[idx], theta, opt.alpha)
            if p == 0 and ctx.replica.buffers.numel():
                state.model[numel:] = total[idx.numel() :]
                buffers = ctx.replica.buffers
                buffers.copy_(merge(buffers, state.model[numel:], opt.alpha))
