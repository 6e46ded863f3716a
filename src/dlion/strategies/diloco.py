"""DiLoCo: distributed low-communication training (Douillard et al., 2023).

Implementations: torchft, OpenDiLoCo, INTELLECT-1 (../shared/PAPERS.md, section 7).

Rule. Every member starts a round from the shared global model theta and runs `H` inner
steps on its own batches with the *inner optimizer*, which is the replica's configured
optimizer (`train.optimizer`, `train.lr`, `train.schedule`; the paper uses AdamW, and
the suite runs DiLoCo with `train.optimizer: adamw`). Then the pseudo-gradient
Delta = sum_i (b_i / G) (theta - theta_i) (the mean over members, weighted by their
batches; equal batches give the plain mean) is summed by a ring all-reduce and applied by
the *outer optimizer*, Nesterov SGD in PyTorch's form (`outer_nesterov`):
    v <- mu v + Delta;   theta <- theta - lr_out (Delta + mu v)
with lr_out = `outer_lr` (0.7) and mu = `outer_momentum` (0.9), the paper's constants.
Every member computes the same sum (the ring reduces each chunk once), so theta and v
stay identical everywhere; each member continues from theta with its own inner optimizer
state. One synchronisation (and one barrier: everyone waits for the slowest member) every
`H` inner steps. `H` is 500 in the paper for language models; far fewer suit the small
models here (default 20, searched in the suite). Batches: the global batch G split
equally over the members at every inner step, as all-reduce does.

Buffers (BatchNorm running statistics and other float buffers): averaged (weighted
b_i / G) in the same all-reduce as the pseudo-gradient and adopted by every member at the
sync; no outer step is applied to them.

Membership changes (torchft's rule: a round whose membership changed is discarded). Each
inner step checks the membership epoch before it applies its update; a changed epoch,
or a failed all-reduce, abandons the round: every member goes back to the last global
model and the longest-standing member (`longest_member`) sends its global model, outer
momentum and round counter to the others (`adopt_leader`), so all members agree again
before the next round. A joiner is admitted with a live peer's state (engine) and takes
the leader's global model the same way. At most one round of local progress is lost per
change. Strategy state in checkpoints: the global model and the outer momentum.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.collectives import CollectiveFailed, longest_member, ring_allreduce
from dlion.comm.messages import Dense, Message
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "DiLoCo: H inner steps, averaged pseudo-gradient applied by outer Nesterov SGD"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    H: int = Field(20, ge=1, description="Inner steps per round (one all-reduce per round).")
    outer_lr: float = Field(0.7, gt=0, description="Outer Nesterov learning rate (paper: 0.7).")
    outer_momentum: float = Field(
        0.9, ge=0, lt=1, description="Outer Nesterov momentum (paper: 0.9)."
    )


# ------------------------------------------------------------------ pure functions (tested)


def outer_nesterov(
    theta: torch.Tensor, delta: torch.Tensor, momentum: torch.Tensor, lr: float, mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer Nesterov SGD step on the pseudo-gradient `delta` (torch.optim.SGD with
    nesterov=True): v' = mu v + delta, theta' = theta - lr (delta + mu v'). Returns
    (theta', v'); the inputs are not modified."""
    v = mu * momentum + delta
    return theta - lr * (delta + mu * v), v


@dataclass
class GlobalState:
    """What the members of a DiLoCo-family group agree on: the global model (parameters
    and float buffers, `model_numel`), the outer momentum (`numel`) and a step counter."""

    model: torch.Tensor
    momentum: torch.Tensor
    step: int = 0

    def pack(self) -> torch.Tensor:
        return torch.cat([self.model, self.momentum])

    def unpack(self, vector: torch.Tensor, step: int) -> None:
        n = self.model.numel()
        self.model = vector[:n].clone()
        self.momentum = vector[n:].clone()
        self.step = step


def initial_state(ctx: WorkerContext, name: str, momentum: bool = True) -> GlobalState:
    """The global state a member starts from (its own model, zero momentum; no momentum
    entries without `momentum`), or the one its checkpoint carried; registered so that
    checkpoints carry it."""
    state = GlobalState(
        ctx.replica.model_state(), torch.zeros(ctx.replica.numel if momentum else 0)
    )
    restored = ctx.restored_state(name)
    if restored is not None and restored.numel() == state.pack().numel():
        state.unpack(restored.to(torch.float32), 0)
        ctx.replica.set_model_state(state.model)
    ctx.keep_state(name, state.pack)
    return state


async def adopt_leader(
    ctx: WorkerContext, prefix: str, state: GlobalState
) -> tuple[int, list[int]]:
    """Re-form the group after a membership change: the longest-standing live member sends
    its global state to every other live member, which adopts it; everyone's replica goes
    back to the global model (the interrupted round is discarded). Retries until an epoch
    holds through the exchange. Returns (epoch, sorted members)."""
    numel = state.pack().numel()
    while True:
        epoch = ctx.epoch
        leader = longest_member(ctx)
        members = sorted([ctx.rank, *ctx.peers()])
        tag = f"{prefix}.sync{epoch}"
        if leader == ctx.rank:
            packed = Dense(state.pack())
            for peer in members:
                if peer != ctx.rank:
                    await ctx.send(peer, tag, packed, {"step": float(state.step)})
        else:
            got = await ctx.recv(leader, tag, numel=numel, epoch=epoch)
            if not isinstance(got, Message) or not isinstance(got.payload, Dense):
                continue  # the view changed again (or the leader went): re-plan
            state.unpack(got.payload.values, int(got.meta.get("step", 0)))
        if epoch == ctx.epoch:
            ctx.replica.set_model_state(state.model)
            ctx.record(f"{prefix}_regroup", epoch=epoch, leader=leader, members=len(members))
            return epoch, members


async def inner_step(ctx: WorkerContext, batch: int, epoch: int) -> bool:
    """One inner step with the replica's optimizer; False (and nothing applied) when the
    membership changed before the update could be applied."""
    if ctx.epoch != epoch:
        return False
    result = await ctx.compute(batch)
    if ctx.epoch != epoch:
        return False
    await ctx.apply(result.grad)
    ctx.iteration_done(result.loss)
    return True


def my_batch(ctx: WorkerContext, members: list[int]) -> int:
    return equal_batches(ctx.global_batch, len(members))[members.index(ctx.rank)]


def weighted_delta(ctx: WorkerContext, state: GlobalState, weight: float) -> torch.Tensor:
    """weight * (theta - theta_i) followed by weight * this replica's float buffers."""
    numel = ctx.replica.numel
    delta = (state.model[:numel] - ctx.replica.flat) * weight
    return torch.cat([delta, ctx.replica.buffers * weight])


async def rounds(
    ctx: WorkerContext,
    prefix: str,
    short: str,
    state: GlobalState,
    inner_steps: int,
    exchange: Callable[[int, list[int], int, str], Awaitable[None]],
) -> None:
    """DiLoCo's and SparseLoCo's rounds: `inner_steps` steps, then `exchange(epoch, members,
    batch, tag)`; a changed epoch or a CollectiveFailed discards the round and re-forms."""
    # Members present from the start share the initial model; a joiner re-forms first.
    epoch: int | None = ctx.epoch if ctx.peer_since(ctx.rank) == 0 else None
    members = sorted([ctx.rank, *ctx.peers()])
    while True:
        if epoch != ctx.epoch:
            epoch, members = await adopt_leader(ctx, prefix, state)
        batch = my_batch(ctx, members)
        for _ in range(inner_steps):
            if not await inner_step(ctx, batch, epoch):
                break
        if ctx.epoch != epoch:
            continue
        tag = f"{short}{epoch}.{state.step}"
        try:
            await exchange(epoch, members, batch, tag)
        except CollectiveFailed as exc:
            ctx.record("collective_failed", tag=tag, why=str(exc))
            epoch = None  # re-form before the next round


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    state = initial_state(ctx, "diloco.global")

    async def exchange(epoch: int, members: list[int], batch: int, tag: str) -> None:
        async with ctx.charged("axpy", 2 * numel, 2):
            vector = weighted_delta(ctx, state, batch / ctx.global_batch)
        total = await ring_allreduce(ctx, vector, tag, ranks=members, epoch=epoch)
        # The outer step is an SGD-with-momentum step; then the replica takes the model.
        async with ctx.charged("sgd", numel):
            theta, state.momentum = outer_nesterov(
                state.model[:numel], total[:numel], state.momentum, opt.outer_lr, opt.outer_momentum
            )
            state.model = torch.cat([theta, total[numel:]])
        state.step += 1
        async with ctx.charged("axpy", numel):
            ctx.replica.set_model_state(state.model)

    await rounds(ctx, "diloco", "dl", state, opt.H, exchange)
