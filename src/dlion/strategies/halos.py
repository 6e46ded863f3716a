"""HALoS: hierarchical asynchronous local SGD over slow networks (Kim et al., ICML '25).

../shared/PAPERS.md, section 7.

Roles. Every site has a local parameter server (LPS) and the cluster one global
parameter server (GPS). As in `ps`, a server is a role on a node that also trains: the
LPS of a site is its longest-standing live member, the GPS the longest-standing live
member overall (so it also holds its site's LPS). Each role runs as its own coroutine
beside the node's worker; between roles of one node nothing is sent.

Rule.
- Worker i starts from the model theta_0 its LPS last returned, runs H_i local steps with
  the replica's configured optimizer (`train.optimizer`), and sends its change
  g = theta_0 - theta_{H_i} (a pseudo-gradient) to its LPS. Slower workers run fewer
  steps: H_i = max(1, round(H * speed_i / fastest)), with speed_i this worker's measured
  samples per second (EMA) and `fastest` the largest speed the servers have seen (it
  rides on their replies), so updates arrive at about the same pace from every worker.
- The LPS applies every arriving g at once with delayed Nesterov (`DelayedNesterov`):
  a plain step theta_L -= lr_L g / N at every arrival, and every N arrivals the momentum
  step m <- mu_L m + mean of those N g, theta_L -= lr_L mu_L m (over N arrivals this is
  exactly one Nesterov step on their mean), with N the live workers of its site. It
  returns its current model to that worker at once.
- After every K worker updates the LPS sends its accumulated change (its model at the
  previous push, merged, minus its current model) to the GPS, which applies it with
  delayed Nesterov (N = live sites, lr_G, mu_G) and returns the global model theta_G; the
  LPS merges it into the model it pushed,
      theta_L <- (1 - m) theta_L,push + m theta_G + (updates applied since the push),
  with m = `merge` (0.75, the paper's). Updates that arrived during the round trip are
  kept and go with the next push; the LPS keeps serving its workers meanwhile.
Constants: merge 0.75 is the paper's; lr and momentum of both servers, H and K are ours
(the paper tunes them for its models): defaults lr_L 0.5, mu_L 0.5, lr_G 1.0, mu_G 0 (no
global momentum), H 20, K 2, from a short tuning on microcloud-hetero, digits, seed 0,
6 simulated s: time to 94.5% 3.3 s; with no momentum anywhere and both lr 1.0, 5.5 s;
DiLoCo's outer constants at the LPS (0.7, 0.9) with (0.7, 0.5) at the GPS oscillate and
never reach it (final 66% after 10 s); (1.0, 0.5) at both, 86% after 6 s. The inner
optimizer is the replica's (`train.optimizer`; SGD with momentum in those runs). Batches:
the global batch split equally over the live workers.

Buffers (BatchNorm running statistics and other float buffers): workers send theirs with
each update, a server replaces its own by the mean of its own and the arriving ones, and
every reply carries the server's buffers (adopted with the model).

Membership changes. Nobody waits on a barrier: a worker whose LPS leaves sends its next
update (which then also holds the lost round's change, measured from the model it last
received) to the new LPS, the site's next longest-standing member, which starts serving
from its own model; likewise a new GPS starts from its LPS's model, and an LPS whose push
got no answer keeps the change and sends it with its next push. A joiner starts from a
live peer's model (engine) and trains under its site's LPS. Replies are matched to
requests by sequence number, so a late reply is never taken for a newer one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.collectives import longest_member
from dlion.comm.messages import Dense, Message, RecvResult, ViewChanged
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "HALoS: site parameter servers apply local-SGD updates at once, merge with a global one"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    H: int = Field(20, ge=1, description="Local steps of the fastest worker per update.")
    K: int = Field(2, ge=1, description="Worker updates an LPS applies between two pushes.")
    lps_lr: float = Field(0.5, gt=0, description="LPS delayed-Nesterov learning rate.")
    lps_momentum: float = Field(0.5, ge=0, lt=1, description="LPS delayed-Nesterov momentum.")
    gps_lr: float = Field(1.0, gt=0, description="GPS delayed-Nesterov learning rate.")
    gps_momentum: float = Field(0.0, ge=0, lt=1, description="GPS delayed-Nesterov momentum.")
    merge: float = Field(
        0.75, ge=0, le=1, description="Weight of the global model in the LPS merge (paper)."
    )
    speed_ema: float = Field(0.5, gt=0, le=1, description="Weight of the newest speed sample.")
    timeout_s: float | None = Field(
        None, gt=0, description="Wait this long for a server's reply (None: engine.recv_timeout)."
    )


# ------------------------------------------------------------------ pure parts (tested)


class DelayedNesterov:
    """Server model with delayed Nesterov: every arriving pseudo-gradient g is applied at
    once as model -= lr g / N; every N arrivals, m <- mu m + (sum of those g) / N and
    model -= lr mu m. `delay` (N) may change between arrivals (a membership change)."""

    def __init__(self, model: torch.Tensor, lr: float, mu: float) -> None:
        self.model = model.clone()
        self.momentum = torch.zeros_like(model)
        self.pending = torch.zeros_like(model)
        self.count = 0
        self.lr = lr
        self.mu = mu

    def step(self, g: torch.Tensor, delay: int) -> None:
        self.model -= self.lr * g / delay
        self.pending += g
        self.count += 1
        if self.count >= delay:
            self.momentum = self.mu * self.momentum + self.pending / self.count
            self.model -= self.lr * self.mu * self.momentum
            self.pending.zero_()
            self.count = 0


def lps_merge(
    pushed: torch.Tensor, current: torch.Tensor, global_: torch.Tensor, m: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new LPS model, new push reference): the model that was pushed merged with the
    global one, (1 - m) pushed + m global, plus what was applied since the push."""
    reference = (1 - m) * pushed + m * global_
    return reference + (current - pushed), reference


def local_steps(H: int, speed: float | None, fastest: float | None) -> int:
    """max(1, round(H * speed / fastest)); H while speeds are unknown."""
    if speed is None or not fastest:
        return H
    return max(1, min(H, round(H * speed / fastest)))


class Server:
    """One server role's state (LPS or GPS): a delayed-Nesterov model, its buffers and the
    fastest worker speed it knows."""

    def __init__(self, state: torch.Tensor, numel: int, lr: float, mu: float) -> None:
        self.numel = numel
        self.opt = DelayedNesterov(state[:numel], lr, mu)
        self.buffers = state[numel:].clone()
        self.fastest = 0.0

    def apply(self, update: torch.Tensor, delay: int, speed: float) -> torch.Tensor:
        """Apply one arriving update (pseudo-gradient then buffers); return the model state."""
        self.opt.step(update[: self.numel], delay)
        if self.buffers.numel():
            self.buffers = 0.5 * (self.buffers + update[self.numel :])
        self.fastest = max(self.fastest, speed)
        return self.state()

    def state(self) -> torch.Tensor:
        return torch.cat([self.opt.model, self.buffers])


# ------------------------------------------------------------------ the node


def site_server(ctx: WorkerContext, site: str) -> int:
    """The LPS of `site`: its longest-standing live member (lowest admission, then rank)."""
    live = [r for r in [ctx.rank, *ctx.peers()] if ctx.site(r) == site]
    return min(live, key=lambda r: (ctx.peer_since(r), r))


class Node:
    """The roles one node holds and the coroutines serving them."""

    def __init__(self, ctx: WorkerContext, opt: Options) -> None:
        self.ctx = ctx
        self.opt = opt
        self.numel = ctx.replica.numel
        self.timeout = opt.timeout_s if opt.timeout_s is not None else ctx.recv_timeout
        self.lps: Server | None = None
        self.gps: Server | None = None
        self.reference = torch.zeros(0)  # the LPS model the next push is measured from
        self.updates = 0  # worker updates the LPS applied since its last push
        self.pushing = False
        self.seq = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def take_roles(self) -> None:
        """Start serving the roles this node holds now (a holder keeps its role while it
        lives: a joiner is never longer-standing than a live member)."""
        ctx = self.ctx
        if self.lps is None and site_server(ctx, ctx.site(ctx.rank)) == ctx.rank:
            self.lps = Server(
                ctx.replica.model_state(), self.numel, self.opt.lps_lr, self.opt.lps_momentum
            )
            self.reference = self.lps.opt.model.clone()
            ctx.record("halos_role", role="lps", site=ctx.site(ctx.rank))
            self.spawn(self.serve_lps())
        if self.gps is None and longest_member(ctx) == ctx.rank and self.lps is not None:
            self.gps = Server(self.lps.state(), self.numel, self.opt.gps_lr, self.opt.gps_momentum)
            ctx.record("halos_role", role="gps")
            self.spawn(self.serve_gps())

    def site_workers(self) -> int:
        me = self.ctx.site(self.ctx.rank)
        return sum(1 for r in [self.ctx.rank, *self.ctx.peers()] if self.ctx.site(r) == me)

    def live_sites(self) -> int:
        return len({self.ctx.site(r) for r in [self.ctx.rank, *self.ctx.peers()]})

    # ---------------------------------------------------------------- LPS
    def lps_apply(self, update: torch.Tensor, speed: float) -> torch.Tensor:
        assert self.lps is not None
        reply = self.lps.apply(update, self.site_workers(), speed)
        self.updates += 1
        if self.updates >= self.opt.K and not self.pushing:
            self.pushing = True
            self.spawn(self.push())
        return reply

    async def serve_lps(self) -> None:
        ctx = self.ctx
        while True:
            got = await ctx.recv(None, "h.up", numel=ctx.replica.model_numel)
            if not isinstance(got, Message) or not isinstance(got.payload, Dense):
                continue  # a quiet spell
            # The LPS's delayed Nesterov step is an SGD-with-momentum step.
            async with ctx.charged("sgd", self.numel):
                reply = self.lps_apply(got.payload.values, got.meta.get("speed", 0.0))
            meta = {"fastest": self.lps.fastest}  # type: ignore[union-attr]
            tag = f"h.down{int(got.meta.get('seq', 0))}"
            self.spawn(ctx.send(got.src, tag, Dense(reply), meta))

    async def push(self) -> None:
        """Send the accumulated change to the GPS and merge the global model it returns."""
        assert self.lps is not None
        ctx = self.ctx
        self.take_roles()  # the GPS role may have come to this node since the last round
        async with ctx.charged("axpy", 2 * self.numel, 2):
            pushed = self.lps.opt.model.clone()
            change = torch.cat([self.reference - pushed, self.lps.buffers])
        self.updates = 0
        gps = longest_member(ctx)
        speed = self.lps.fastest
        if gps == ctx.rank and self.gps is not None:
            async with ctx.charged("sgd", self.numel):
                reply: torch.Tensor | None = self.gps.apply(change, self.live_sites(), speed)
            fastest = self.gps.fastest
        else:
            reply, fastest = await self.request(gps, "h.push", "h.pull", change, speed)
        if reply is not None:
            async with ctx.charged("axpy", 3 * self.numel, 3):
                new, self.reference = lps_merge(
                    pushed, self.lps.opt.model, reply[: self.numel], self.opt.merge
                )
            self.lps.opt.model = new
            self.lps.buffers = reply[self.numel :].clone()
            self.lps.fastest = max(self.lps.fastest, fastest)
        self.pushing = False

    # ---------------------------------------------------------------- GPS
    async def serve_gps(self) -> None:
        ctx = self.ctx
        while True:
            got = await ctx.recv(None, "h.push", numel=ctx.replica.model_numel)
            if not isinstance(got, Message) or not isinstance(got.payload, Dense):
                continue
            assert self.gps is not None
            async with ctx.charged("sgd", self.numel):
                reply = self.gps.apply(
                    got.payload.values, self.live_sites(), got.meta.get("speed", 0)
                )
            tag = f"h.pull{int(got.meta.get('seq', 0))}"
            self.spawn(ctx.send(got.src, tag, Dense(reply), {"fastest": self.gps.fastest}))

    # ---------------------------------------------------------------- requests
    async def request(
        self, server: int, tag: str, reply_tag: str, update: torch.Tensor, speed: float
    ) -> tuple[torch.Tensor | None, float]:
        """Send an update to `server` and wait for its model; (None, 0) when it left or
        stayed silent past the timeout."""
        ctx = self.ctx
        self.seq += 1
        meta = {"speed": speed, "seq": float(self.seq)}
        if not await ctx.send(server, tag, Dense(update), meta):
            return None, 0.0
        got = await self.wait_reply(server, f"{reply_tag}{self.seq}")
        if not isinstance(got, Message) or not isinstance(got.payload, Dense):
            ctx.record("halos_no_reply", server=server, tag=tag, why=repr(got))
            return None, 0.0
        return got.payload.values, got.meta.get("fastest", 0.0)

    async def wait_reply(self, server: int, tag: str) -> RecvResult:
        ctx = self.ctx
        deadline = ctx.now() + self.timeout
        while True:
            # Guarded: a membership change wakes us to check that the server is still there.
            got = await ctx.recv(
                server,
                tag,
                timeout=max(0.0, deadline - ctx.now()),
                numel=ctx.replica.model_numel,
                epoch=ctx.epoch,
            )
            if not isinstance(got, ViewChanged) or server not in ctx.peers():
                return got


async def worker(ctx: WorkerContext, opt: Options) -> None:
    node = Node(ctx, opt)
    numel = ctx.replica.numel
    start = ctx.replica.model_state()  # the model this worker's local steps started from
    speed: float | None = None
    fastest: float | None = None
    while True:
        node.take_roles()
        live = sorted([ctx.rank, *ctx.peers()])
        batch = equal_batches(ctx.global_batch, len(live))[live.index(ctx.rank)]
        for _ in range(local_steps(opt.H, speed, fastest)):
            result = await ctx.compute(batch)
            sample = result.samples / result.seconds
            speed = (
                sample if speed is None else (1 - opt.speed_ema) * speed + opt.speed_ema * sample
            )
            await ctx.apply(result.grad)
            ctx.iteration_done(result.loss)
        async with ctx.charged("axpy", numel):
            update = torch.cat([start[:numel] - ctx.replica.flat, ctx.replica.buffers])
        lps = site_server(ctx, ctx.site(ctx.rank))
        assert speed is not None
        if lps == ctx.rank:
            node.take_roles()
            async with ctx.charged("sgd", numel):
                reply: torch.Tensor | None = node.lps_apply(update, speed)
            told = node.lps.fastest  # type: ignore[union-attr]
        else:
            reply, told = await node.request(lps, "h.up", "h.down", update, speed)
        if reply is None:
            continue  # the LPS left or is silent: the next update carries this one too
        fastest = max(told, fastest or 0.0)
        async with ctx.charged("axpy", 2 * numel, 2):
            ctx.replica.set_model_state(reply)
            start = reply.clone()
