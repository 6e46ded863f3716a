"""Gaia: geo-distributed ML with significance-filtered exchange between sites.

Hsieh et al., "Gaia: Geo-Distributed Machine Learning Approaching LAN Speeds", NSDI '17
(../shared/PAPERS.md, section 1, baselines).

Gaia runs a parameter-server system per data center (here: per site) and decouples the
fast local synchronization from the slow wide-area one:

- Inside a site: bulk-synchronous every iteration, as a *sharded* parameter server. The
  site's live members (sorted by rank) split the flat parameter vector into equal shards;
  member k is the server of shard k. Each iteration every worker sends shard j of its
  weighted gradient (batch / G, equal batches) to member j (reduce-scatter), member k
  sums shard k, adds the remote updates it received for shard k, and sends the result to
  every member (all-gather). All members apply the same vector, so a site keeps one model
  (bit-identical replicas), as Gaia's per-data-center parameter server does.
- Across sites: only *significant* updates travel. The server of shard k keeps, per
  remote site, an accumulator of its site's updates of shard k (Gaia's "accumulated
  update"). Entry i is significant when lr_t * |acc_i| > threshold_t * |w_i|, i.e. the
  parameter change it would make is more than threshold_t of the parameter's value, with
  threshold_t = threshold * lr_t / lr_0 (lowered as the learning rate decays, read from
  `ctx.replica.lr`). Significant entries are sent (Sparse) to the remote site's server of
  those indices and cleared; insignificant ones keep accumulating and are never lost.
  The shard-to-shard links between sites carry the traffic in parallel, as Gaia's
  parameter-server shards talk to their counterparts in other data centers.
- Remote updates are applied as updates: the receiving server adds them into the site's
  summed gradient for its shard, so they pass through the same SGD-momentum step as local
  ones (Gaia's servers add received updates to the parameters; here replicas are
  optimizer-driven, and every replica processes local and remote updates alike).

Synchronization across sites (option `staleness`, Gaia's "mirror clock"): with
`staleness = s`, a site at iteration t first waits (bounded by the engine's receive
timeout) until it holds every relevant remote server's message of iteration >= t - s,
then applies whatever else has arrived; every server then sends one message per
iteration (possibly empty: the clock) and waits for its previous one to a destination to
have left before sending the next, so nothing queues without bound. With `staleness:
null` (the default, Gaia's ASP between data centers) a site never waits for another: it
applies whatever significant updates have arrived; a server whose link to a destination
is still busy skips that send and keeps accumulating (nothing is lost, the next send
carries more).

Options (defaults in `Options`): `threshold` (0.01, the paper's initial 1%), `staleness`
(null: ASP across sites). ASP is the default because with sites of unequal speed a mirror
clock ties the fastest site to the slowest (microcloud-hetero, seed 0: time to target
1.8 s with ASP, 4.7 s with staleness 0 or 4, 3.9 s with 16).

Left out: Gaia's "ASP selective barrier" (a small control message announcing large
significant updates so receivers wait for them); the mirror clock covers the bounded
wait. When site membership changes (a peer leaves, or stays silent past the engine's
receive timeout in an exchange that waits for it), shards are recomputed from the live
members; a remote update that still arrives for indices this worker no longer serves is
applied to its own replica only (recorded as `gaia_stray`). Under ASP a remote site
never waits for a silent server, so it keeps routing that shard's updates to it until
the engine reports it gone. Joins: iteration t's layout is built from `ctx.members(t)`,
so a joiner (admitted from an iteration nobody has started, with a live peer's model) is
given a shard by every member of its site in the same iteration; a peer dropped in one
incarnation is served again when it returns.

Buffers (BatchNorm running statistics and other float buffers): Gaia exchanges
updates only, so each replica's buffers follow its own batches (never synchronised).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.comm.messages import Dense, Message, Sparse
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches

SUMMARY = "Gaia: BSP inside a site, only significant updates (|update|/|w| > 1%) across sites"

REMOTE_TAG = "gaia/x"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        0.01,
        gt=0,
        description="Initial significance threshold: send an entry across sites when its "
        "accumulated update exceeds this fraction of the parameter's value (the paper's 1%); "
        "scaled by lr_t / lr_0 as the learning rate decays.",
    )
    staleness: int | None = Field(
        None,
        ge=0,
        description="Mirror clock: a site waits until it holds every remote server's updates "
        "of iteration t - staleness. None: asynchronous across sites (Gaia's ASP).",
    )


# ------------------------------------------------------------------ pure functions (tested)


def shard_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """[start, end) of n contiguous shards, sizes as torch.tensor_split (first ones larger)."""
    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    base, extra = divmod(numel, n)
    bounds = []
    start = 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def significance_threshold(threshold: float, lr: float, lr0: float) -> float:
    """threshold_t = threshold * lr_t / lr_0: smaller steps need a lower bar to be sent.

    The accumulators hold gradients and the update they make is lr_t * acc, so an entry is
    significant when |acc| > threshold * |w| / lr_0: the lowered bar exactly follows the
    smaller steps, as in the paper, where updates are already scaled by the learning rate.
    """
    if lr0 <= 0:
        raise ValueError(f"initial learning rate must be positive, got {lr0}")
    return threshold * lr / lr0


def significant(
    accumulated: torch.Tensor, params: torch.Tensor, lr: float, threshold: float
) -> torch.Tensor:
    """Mask of entries whose parameter change lr * |acc| exceeds threshold * |w|.

    Written as a product, not a ratio: a zero parameter makes any nonzero update
    significant, and a zero update is never significant.
    """
    return lr * accumulated.abs() > threshold * params.abs()


class SignificanceFilter:
    """Updates one worker owes one remote site: accumulate, send the significant, keep the rest."""

    def __init__(self, numel: int) -> None:
        self.accumulated = torch.zeros(numel)

    def add(self, start: int, update: torch.Tensor) -> None:
        """Accumulate `update` into entries [start, start + len(update))."""
        self.accumulated[start : start + update.numel()] += update

    def take(
        self,
        params: torch.Tensor,
        lr: float,
        threshold: float,
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of the significant entries (within `allowed`), cleared here."""
        mask = significant(self.accumulated, params, lr, threshold)
        if allowed is not None:
            mask &= allowed
        idx = mask.nonzero().flatten()
        values = self.accumulated[idx].clone()
        self.accumulated[idx] = 0.0
        return idx, values


def site_layout(
    ranks: Sequence[int], site_of: Callable[[int], str], numel: int
) -> dict[str, list[tuple[int, int, int]]]:
    """Per site, (rank, start, end) of the shard each live member serves, members by rank."""
    members: dict[str, list[int]] = {}
    for r in sorted(ranks):
        members.setdefault(site_of(r), []).append(r)
    return {
        site: [(r, s, e) for r, (s, e) in zip(rs, shard_bounds(numel, len(rs)), strict=True)]
        for site, rs in members.items()
    }


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _absorb(
    ctx: WorkerContext,
    msg: Message,
    shard: tuple[int, int],
    remote: torch.Tensor,
    stray: torch.Tensor,
    latest: dict[int, int],
) -> None:
    """Add a remote server's significant entries to my shard's update (`remote`); entries
    outside my shard (sent under an older layout) go to `stray`, applied to my replica only."""
    if not isinstance(msg.payload, Sparse):
        ctx.record("rejected", src=msg.src, tag=msg.tag, why="expected a sparse update")
        return
    latest[msg.src] = max(latest.get(msg.src, -1), int(msg.meta.get("it", -1)))
    idx, values = msg.payload.indices, msg.payload.values
    a, b = shard
    inside = (idx >= a) & (idx < b)
    remote.index_add_(0, idx[inside] - a, values[inside])
    if not bool(inside.all()):
        stray.index_add_(0, idx[~inside], values[~inside])
        ctx.record("gaia_stray", src=msg.src, entries=int((~inside).sum()))


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    G = ctx.global_batch
    lr0 = ctx.replica.lr
    me = ctx.rank
    my_site = ctx.site(me)
    # (rank, incarnation) of peers that failed an exchange: excluded until they return.
    lost: set[tuple[int, int]] = set()
    filters: dict[str, SignificanceFilter] = {}  # per remote site
    remote_sends: dict[int, asyncio.Task[bool]] = {}  # last send to each remote server
    latest: dict[int, int] = {}  # newest iteration received from each remote server
    t = ctx.iteration  # a joiner starts at the iteration it was admitted from
    while True:
        ranks = [r for r in ctx.members(t) if r == me or (r, ctx.incarnation(r)) not in lost]
        layout = site_layout(ranks, ctx.site, numel)
        members = layout[my_site]
        a, b = next((s, e) for r, s, e in members if r == me)
        others = [(r, s, e) for r, s, e in members if r != me]

        batch = equal_batches(G, len(ranks))[ranks.index(me)]
        result = await ctx.compute(batch)
        # Weight b_i / G: the sum over every worker of the cluster is the global-batch gradient.
        async with ctx.charged("axpy", numel):
            weighted = result.grad * (batch / G)

        # 1. Reduce-scatter inside the site: member r serves shard [s, e).
        tag = f"gaia/rs{t}"
        local_sends = [
            asyncio.ensure_future(ctx.send(r, tag, Dense(weighted[s:e].clone())))
            for r, s, e in others
        ]
        got = await asyncio.gather(*(ctx.recv(r, tag, numel=b - a) for r, _, _ in others))
        parts = {me: weighted[a:b]}
        for (r, _, _), msg in zip(others, got, strict=True):
            if isinstance(msg, Message):
                parts[r] = msg.payload.values  # type: ignore[union-attr]
            else:
                lost.add((r, ctx.incarnation(r)))
                ctx.record("peer_lost", peer=r, phase=tag, why=repr(msg))
        async with ctx.charged("sum", (b - a) * len(parts)):
            local = torch.zeros(b - a)
            for r in sorted(parts):  # rank order: the same inputs give the same sum
                local += parts[r]

        # 2. Significance filter per remote site, routed to that site's server of each index.
        lr = ctx.replica.lr
        threshold = significance_threshold(opt.threshold, lr, lr0)
        for site, servers in layout.items():
            if site == my_site:
                continue
            filt = filters.setdefault(site, SignificanceFilter(numel))
            async with ctx.charged("axpy", b - a):
                filt.add(a, local)
            if opt.staleness is not None:
                # Mirror clock: every iteration's message must go out, in order; wait for
                # the previous one to this server to have left (bounded by the link).
                for r, _, _ in servers:
                    if r in remote_sends:
                        await remote_sends.pop(r)
            free = [
                (r, s, e) for r, s, e in servers if r not in remote_sends or remote_sends[r].done()
            ]
            allowed = torch.zeros(numel, dtype=torch.bool)
            for _, s, e in free:
                allowed[s:e] = True
            async with ctx.charged("scan", numel):
                idx, values = filt.take(ctx.replica.flat, lr, threshold, allowed)
            for r, s, e in free:
                sel = (idx >= s) & (idx < e)
                clock = opt.staleness is not None and _overlaps((s, e), (a, b))
                if bool(sel.any()) or clock:
                    payload = Sparse(idx[sel], values[sel], numel)
                    remote_sends[r] = asyncio.ensure_future(
                        ctx.send(r, REMOTE_TAG, payload, {"it": float(t)})
                    )

        # 3. Remote significant updates for my shard: wait per the mirror clock, then drain.
        remote = torch.zeros(b - a)
        stray = torch.zeros(numel)

        if opt.staleness is not None:
            need = t - opt.staleness
            for site, servers in layout.items():
                for r, s, e in servers:
                    if site == my_site or not _overlaps((s, e), (a, b)):
                        continue
                    while latest.get(r, -1) < need:
                        msg = await ctx.recv(r, REMOTE_TAG, numel=numel)
                        if not isinstance(msg, Message):
                            # Waited the engine's receive timeout: treat the server as gone.
                            lost.add((r, ctx.incarnation(r)))
                            ctx.record("peer_lost", peer=r, phase="mirror clock", why=repr(msg))
                            break
                        _absorb(ctx, msg, (a, b), remote, stray, latest)
        while isinstance(
            msg := await ctx.recv(None, REMOTE_TAG, timeout=0.0, numel=numel), Message
        ):
            _absorb(ctx, msg, (a, b), remote, stray, latest)

        # 4. All-gather inside the site: everyone applies the same update vector.
        combined = local + remote
        tag = f"gaia/ag{t}"
        local_sends += [
            asyncio.ensure_future(ctx.send(r, tag, Dense(combined))) for r, _, _ in others
        ]
        got = await asyncio.gather(*(ctx.recv(r, tag, numel=e - s) for r, s, e in others))
        total = stray
        total[a:b] += combined
        for (r, s, e), msg in zip(others, got, strict=True):
            if isinstance(msg, Message):
                total[s:e] += msg.payload.values  # type: ignore[union-attr]
            else:
                lost.add((r, ctx.incarnation(r)))
                ctx.record("peer_lost", peer=r, phase=tag, why=repr(msg))
        async with ctx.charged("sum", numel + (b - a) * len(others)):
            pass  # the all-gather's pieces were added into `total` above
        await ctx.apply(total)
        await asyncio.gather(*local_sends)
        t += 1
        ctx.iteration_done(result.loss)
