"""DLion for micro-clouds on shared site pipes: the default `dlion` (issue 17).

DLion (Hong & Chandra, HPDC '21; ../shared/PAPERS.md section 1) with its three techniques
kept and the exchange reorganised around the sites, in the spirit of Gaia and HALoS
(PAPERS.md sections 1 and 7). The paper-faithful variant is `dlion-hpdc21`
(dlion_hpdc21.py), whose pure functions this file reuses.

Rules, per iteration t of worker i in site s:
- WDB across all workers: b_i = round(G * C_i / sum_j C_j) over every live worker, from
  measured speeds (EMA of samples/s of pure compute), gradient weight b_i / G. Speeds and
  loss EMAs ride on the messages: inside a site on the all-reduce, across sites on the
  leaders' updates; the leader passes the remote ones to its members. Re-balanced every
  `reprofile_every` iterations, at once on a drift above `drift_threshold` or a change of
  the member set (as in dlion-hpdc21). With `wdb_vector_work` (default) each worker's
  fixed step cost (its configured overhead + the measured vector work of its step:
  weighting, shard sum, optimizer) enters as well, and the split equalises step times
  (wdb.py).
- Inside a site, dense and synchronous: the members all-reduce their weighted gradients
  (`sharded_allreduce`: reduce-scatter + all-gather, two latencies) and apply the same
  total, so a site keeps one model, as Gaia's per-site server does.
- Across sites, one update per site pair: the site leader (the longest-standing live
  member, then the lowest rank: a departure hands the role to the next one) adds the
  site's sum into one residual per remote site and a pump per remote site sends the top-k
  of it (PGE, error feedback: what is not sent stays in the residual) to that site's
  leader, sized to the pipe's *measured* bandwidth (`ctx.bandwidth`) times `rho` x this
  site's last iteration time (compute + all-reduce). The pump sends when its previous
  message has left, so the pipe is always busy but never queues, and a slower pipe (or a
  bandwidth drop) gets smaller or rarer updates, never a backlog.
- Significance against noise (`significance_z`, default 1): the top-k is taken only among
  entries whose accumulation r_i stands out from the noise of what was added to it since
  its last send, r_i^2 > z^2 * v_i, v_i the sum of squares of those site sums (a
  one-sample test: pure noise passes about 32% of the time at z = 1, a consistent drift
  of n updates has r^2 / v = n). Why: plain top-k spends the budget on the noisiest
  entries, whose delayed arrival adds noise the receiving site cannot average out; on
  microcloud-hetero (seeds 10-12, lr 0.1) the same bytes with the test reach the target
  in 1.4 s against 2.0 s, and it lets the rate go to 0.2 (1.0 s against 1.6 s, seeds 0-2;
  RESULTS.md section 14b). Cost: an entry is held until it has shown a drift (a single
  update never passes at z = 1), which delays the part of a remote site's update that
  differs from the receiver's own data: on the non-IID variants it is 3-8% slower at lr
  0.1 and fails 2 of 3 seeds at lr 0.2 without the gate below. Gaia's filter (PAPERS.md
  section 1, baselines) also sends only significant updates, but relative to the weight,
  which does not scale with the gradient noise; this test needs no constant beyond z.
- Agreement gate (`agreement_gate`, default on): the test runs on the pipe to site s
  unless a = cos(O, R_s) < 0, O the decayed sum of this site's own updates and R_s that of
  the updates received from s (both decayed by AGREEMENT_DECAY = 0.99 per own iteration,
  so about the last 100 iterations: long enough for the noise, which grows as the square
  root of the window, to fall under a shared drift, which grows with it); otherwise the
  pipe sends the plain top-k (a = 0 before anything is received: the test stays on).
  Why: the test trades the remote noise against the remote signal; when sites hold the
  same distribution the remote signal is what the site already has (its noise is what
  hurts), when they hold skewed data the remote update carries what the site lacks and
  must go without delay. Measured (microcloud-hetero, seed 0, lr 0.2):
  a stays at 0.35-0.54 on IID data and falls to -0.15..-0.78 on Dirichlet(0.1) data
  (RESULTS.md section 14c). The threshold is the sign; the decay is a choice (0.9, about
  10 iterations, gave IID cosines of -0.16..0.43, no separation), not fitted to a preset.
- Overlap with the slower sites, lock-step with the equal-paced ones (the default,
  `max_delay: null`, `lockstep_slack: 0.25`): a leader never waits on a remote site whose
  iteration time, from the measured speeds, exceeds (1 + slack) x its own; it adds
  whatever remote updates have arrived to its own contribution to the next all-reduce, so
  the whole site applies them together. From every other site (equal pace or faster) it
  first takes the update of iteration t - 1 (one iteration of pipelining; waiting on a
  site that keeps up costs at most the slack), and that pipe's message budget leaves its
  latency out of the iteration time. Why: late full-weight updates between sites of equal
  pace go through momentum and oscillate (network-hetero never reached the target with
  overlap everywhere; RESULTS.md section 14), while a slower site's updates are few and
  its own gradient dominates. `lockstep_slack: null` overlaps everywhere; `max_delay: d`
  makes every leader wait for every remote site's update of t - d (1: lock-step sites).
- Synchronous equal-paced sites (`site_sync`, default on; `pipe_mode`): with a remote site
  whose iteration time is within (1 + slack) of this site's both ways, and a pipe whose
  measured latency is under this site's last iteration time (compute + all-reduce), the
  leader does not take that site's update of t - 1 before the all-reduce: after it, it
  adds the site's sum to the pipes and wakes the pumps at once, waits for that site's
  update of iteration t, and a second all-reduce inside the site (`sharded_allreduce`,
  the members add zeros) hands what arrived to every member before the step; the
  budget of such a pipe is the iteration time net of its latency, as for lock-step.
  Why: lock-step applies two thirds of the update (three equal sites) one iteration late,
  and through momentum 0.9 the largest stable step of heavy-ball SGD on a quadratic falls
  from eta h = 3.8 to 0.15 (`benchmarks/tools17/delay_stability.py`); the part a pipe
  carries on time removes that delay (the rest, held back by the budget and the test,
  stays late). Costs: the pipe time (about one more iteration time) and a second
  intra-site collective; network-hetero at lr 0.2 reaches the target on 3 of 3 seeds
  instead of 0 of 3 (RESULTS.md section 14d). A faster remote site stays lock-step (its
  update of t - 1 is always there), a slower one overlapped. A delay correction inside
  momentum (the late part caught up in the buffer, as if it had arrived one step
  earlier) only doubles that edge (0.32): not adopted.
- DKT across sites: every `dkt_every` iterations each leader compares site losses (mean
  loss EMA of a site's members, from the numbers it holds); the leader of the best site
  sends its model to the leaders of sites worse by more than `dkt_margin`. A leader that
  receives one computes delta = gamma * (w_best - w_site) and hands it to its members
  through the next all-reduce's metadata, so the whole site merges the same delta.

Membership: iteration t's sites and leaders are built from `ctx.members(t)` less the
peers that failed an exchange. A remote update or model that reaches a worker that is not
(or no longer) its site's leader is forwarded to the leader. A pump whose send finds the
destination gone puts the update back into its residual. A departed leader's residuals
are lost with it (recorded as `leader_changed`); the new leader starts fresh ones. A
joiner starts from a live peer's model (the engine's rule) and then adopts its site
leader's state, so a site keeps one model.

Buffers (BatchNorm running statistics): local to each replica, as in dlion-hpdc21; DKT
moves them with the parameters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field

from dlion.comm.collectives import sharded_allreduce
from dlion.comm.messages import Dense, Message, Payload, Sparse
from dlion.context import WorkerContext
from dlion.strategies.allreduce import equal_batches
from dlion.strategies.dlion_hpdc21 import (
    SharedOptions,
    dkt_plan,
    ema,
    link_budget_entries,
    should_rebalance,
    wdb_batch_sizes,
)
from dlion.strategies.wdb import StepCostMeter, costs_drifted, equal_time_batches

SUMMARY = "DLion: site all-reduce, one top-k update per site pair, paced by measured speeds; WDB"

REMOTE_TAG = "dlion/x"  # a site leader's update to another site's leader
MODEL_TAG = "dlion/m"  # a knowledge transfer (best site's model) to another site's leader


class Options(SharedOptions):
    """The site-aware DLion's options; the shared ones are SharedOptions'."""

    wdb_scope: Literal["site", "all"] = Field(
        "site",
        description="site: batches follow measured speeds inside each site, whose share of "
        "G is its share of the workers, so sites run at their own pace and none waits for "
        "another. all: over every worker (HPDC '21's rule): sites run in step, each "
        "applying every site's gradient once per iteration, late.",
    )
    wdb_vector_work: bool = Field(
        True,
        description="WDB counts the vector work of each worker's step (weighting, its "
        "all-reduce shard's sum, optimizer step; measured, EMA) as a fixed step cost "
        "and equalises step times (wdb.py): it does not shrink with the batch, and a slow "
        "worker pays it slowly (RESULTS.md section 14g). False: only the configured "
        "step overhead.",
    )
    pge: bool = Field(
        True, description="Prioritized (top-k, error feedback) updates across sites; else dense."
    )
    dkt: bool = Field(
        False,
        description="Direct knowledge transfer between sites. Off by default: with one model "
        "per site and every site's gradient delivered (error feedback), merging half of the "
        "best site's model measured 12-18% slower, IID and non-IID (RESULTS.md section 14).",
    )
    lockstep_slack: float | None = Field(
        0.25,
        ge=0,
        description="With max_delay unset: a site leader waits for (lock-step, one iteration "
        "of pipelining) every remote site whose iteration time, from the measured speeds, is "
        "at most (1 + slack) x its own, so waiting costs at most that share; slower sites "
        "stay overlapped. Late full-weight updates between equal-paced sites otherwise "
        "oscillate through momentum (RESULTS.md section 14). None: always overlap.",
    )
    significance_z: float | None = Field(
        1.0,
        gt=0,
        description="Across sites, send only entries whose accumulated update stands out "
        "from its own noise: r_i^2 > z^2 * (sum of squares of the site sums added to it "
        "since it was last sent), the largest first, up to the pipe's budget. Pure noise "
        "passes about 32% of the time at z = 1 (one standard deviation); a drift of n "
        "consistent updates gives r^2 / v = n. None: plain top-k of the accumulation "
        "(faster when sites hold skewed data: RESULTS.md section 14b).",
    )
    agreement_gate: bool = Field(
        True,
        description="With significance_z: a pipe runs the test unless the cosine between this "
        "site's own recent updates and those received from that remote site (decayed sums, "
        "see `agreement`) is negative: sites whose data agree (IID) keep the test, sites "
        "whose updates disagree (skewed data) send the plain top-k, which carries what the "
        "receiver's own data lacks without delay. False: the test everywhere.",
    )
    site_sync: bool = Field(
        True,
        description="With lockstep_slack: a leader exchanges with an equal-paced site "
        "synchronously (it waits for that site's update of the current iteration, and a "
        "second collective hands it to the members before the step) when the pipe's "
        "measured latency is under this site's last iteration time; else one iteration "
        "late (lock-step). A late update between equal-paced sites goes through momentum "
        "and shrinks the stable step 25x (RESULTS.md sections 14c, 14d). False: lock-step.",
    )
    max_delay: int | None = Field(
        None,
        ge=1,
        description="None: the inter-site exchange overlaps compute (nobody waits on the "
        "WAN). d: a site leader waits until it holds every remote site's update of "
        "iteration t - d (1: lock-step sites).",
    )
    rho: float = Field(
        1.0,
        gt=0,
        description="Inter-site message budget as a multiple of the site's iteration time: "
        "1 sends about what the pipe carries while the site computes one iteration.",
    )
    min_link_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="With max_delay set, a pipe whose latency exceeds the budget still "
        "sends for this share of it (no pipe starves).",
    )
    dkt_margin: float = Field(
        0.0, ge=0, description="Transfer only to sites whose loss is worse by more than this."
    )


# ------------------------------------------------------------------ pure functions (tested)


def site_iteration_times(
    groups: dict[str, list[int]],
    known: dict[int, tuple[float, float]],
    global_batch: int,
    n: int,
) -> dict[str, float | None]:
    """Each site's compute time per iteration from measured speeds: its share of the global
    batch (its share of the workers) over its members' summed samples per second; None for a
    site with a member whose speed is not known yet."""
    out: dict[str, float | None] = {}
    for site, members in groups.items():
        speeds = [known[r][0] for r in members if r in known]
        if len(speeds) < len(members) or sum(speeds) <= 0:
            out[site] = None
        else:
            out[site] = global_batch * len(members) / n / sum(speeds)
    return out


PipeMode = Literal["overlap", "lockstep", "sync"]


def pipe_mode(
    pace: float | None,
    my_pace: float | None,
    latency: float,
    iteration_s: float | None,
    slack: float,
    sync: bool,
) -> PipeMode:
    """How a leader exchanges with one remote site, from measured numbers: overlap (never
    wait) when the remote site's iteration time `pace` exceeds (1 + slack) x this site's
    (or either is not known yet); synchronously (wait for its update of the current
    iteration) when the two paces are within (1 + slack) of each other, `sync` is on and
    the pipe's latency is under this site's last iteration time `iteration_s` (compute +
    site all-reduce), so the wait costs about one iteration at most; else lock-step (its
    update of the previous iteration: a faster site's is always there)."""
    if pace is None or my_pace is None or pace > (1 + slack) * my_pace:
        return "overlap"
    equal = my_pace <= (1 + slack) * pace
    if sync and equal and iteration_s is not None and latency < iteration_s:
        return "sync"
    return "lockstep"


def site_groups(ranks: Sequence[int], site_of: Callable[[int], str]) -> dict[str, list[int]]:
    """Live members of each site, in rank order; sites in order of their lowest rank."""
    groups: dict[str, list[int]] = {}
    for r in sorted(ranks):
        groups.setdefault(site_of(r), []).append(r)
    return groups


def site_leader(members: Sequence[int], since: Callable[[int], int]) -> int:
    """The longest-standing member (lowest admission iteration), then the lowest rank: a
    returning or new worker never takes the role (and the residuals) from a live leader."""
    return min(members, key=lambda r: (since(r), r))


def site_losses(losses: dict[int, float], groups: dict[str, list[int]]) -> dict[str, float] | None:
    """Mean loss EMA of each site's members; None until every member's is known."""
    if any(r not in losses for rs in groups.values() for r in rs):
        return None
    return {s: sum(losses[r] for r in rs) / len(rs) for s, rs in groups.items()}


def _restored_or_zeros(numel: int, restored: torch.Tensor | None) -> torch.Tensor:
    if restored is not None and restored.shape == (numel,) and restored.is_floating_point():
        return restored.to(torch.float32).clone()
    return torch.zeros(numel)


class PipeResidual:
    """What a site owes one remote site: site sums are added as they come, and each send
    takes the top-k entries of the accumulation (error feedback: the rest stays).

    Beside the accumulation r it keeps, per entry, the sum of squares v of the site sums
    added since the entry was last sent. With `z` given, only entries whose accumulation
    stands out from their own noise, r_i^2 > z^2 * v_i, may be sent (the largest of those
    first): under pure noise r_i^2 / v_i is about chi-square with one degree of freedom,
    while a consistent drift of n updates gives n. The rest keeps accumulating."""

    def __init__(
        self,
        numel: int,
        restored: torch.Tensor | None = None,
        restored_squares: torch.Tensor | None = None,
    ) -> None:
        # A resumed leader continues with the residual (and squares) its checkpoint carried.
        self.residual = _restored_or_zeros(numel, restored)
        self.squares = _restored_or_zeros(numel, restored_squares)

    def add(self, update: torch.Tensor) -> None:
        self.residual += update
        self.squares += update * update

    def take(self, k: int, dense_fraction: float = 0.5, z: float | None = None) -> Payload:
        """The k largest entries by magnitude (Sparse), or all of them (Dense) when k covers
        `dense_fraction` of the vector; with `z`, among the significant entries only (see
        the class), so fewer than k may go. What is taken is cleared."""
        numel = self.residual.numel()
        score = self.residual.abs()
        if z is not None:
            significant = self.residual * self.residual > (z * z) * self.squares
            k = min(k, int(significant.sum()))
            score = torch.where(significant, score, torch.full_like(score, -1.0))
        if k >= dense_fraction * numel:
            if z is None or k == numel:
                out = Dense(self.residual.clone())
                self.residual.zero_()
                self.squares.zero_()
                return out
            idx = torch.topk(score, k, sorted=False).indices
            values = torch.zeros(numel)
            values[idx] = self.residual[idx]
            self.residual[idx] = 0.0
            self.squares[idx] = 0.0
            return Dense(values)
        if k <= 0:
            return Sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), numel)
        # topk on CPU is deterministic for a given input, so runs stay reproducible.
        idx = torch.topk(score, k, sorted=False).indices
        values = self.residual[idx]  # advanced indexing copies
        self.residual[idx] = 0.0
        self.squares[idx] = 0.0
        return Sparse(idx, values, numel)

    def put_back(self, payload: Payload) -> None:
        """An update that could not be delivered is owed again."""
        if isinstance(payload, Dense | Sparse):
            dense = payload.to_dense(self.residual.numel())
            self.residual += dense
            self.squares += dense * dense


AGREEMENT_DECAY = 0.99  # per own iteration: sums over about the last 100 iterations


def agreement(own: torch.Tensor, received: torch.Tensor) -> float:
    """Cosine between a site's own decayed update sum and the decayed sum of what one remote
    site sent it; 0 while either is zero (nothing measured yet)."""
    norm = float(own.norm()) * float(received.norm())
    if norm <= 0.0:
        return 0.0
    return float(torch.dot(own, received)) / norm


def gated_z(z: float | None, cosine: float) -> float | None:
    """The significance threshold of one pipe: z unless the two sites' long-run updates are
    measured to disagree (cosine < 0: None, plain top-k). Nothing measured yet (0) keeps z."""
    if z is None or cosine < 0.0:
        return None
    return z


def knowledge_meta(known: dict[int, tuple[float, float]], ranks: Sequence[int]) -> dict[str, float]:
    """Speeds and loss EMAs of `ranks` as message metadata: {"s<r>": speed, "l<r>": loss}."""
    meta: dict[str, float] = {}
    for r in ranks:
        if r in known:
            meta[f"s{r}"], meta[f"l{r}"] = known[r]
    return meta


def read_knowledge(meta: dict[str, float]) -> dict[int, tuple[float, float]]:
    """The inverse of `knowledge_meta` (other keys are ignored)."""
    out: dict[int, tuple[float, float]] = {}
    for key, value in meta.items():
        if key[0] == "s" and key[1:].isdigit() and f"l{key[1:]}" in meta:
            out[int(key[1:])] = (value, meta[f"l{key[1:]}"])
    return out


# ------------------------------------------------------------------ the inter-site pumps


class _Pipe:
    """A leader's sending side towards one remote site."""

    def __init__(
        self, site: str, residual: PipeResidual, received: torch.Tensor | None = None
    ) -> None:
        self.site = site
        self.residual = residual
        self.fresh = asyncio.Event()  # a new site sum was added since the last send
        self.dst: int | None = None  # the remote site's leader, as this worker sees it
        self.budget_s = 0.0  # time budget of the next message
        self.lockstep = False  # the leader waits for this pipe's updates (budget net of latency)
        self.meta: dict[str, float] = {}  # iteration and the site's speeds and losses
        self.z: float | None = None  # the significance threshold of the next message
        # Decayed sum of what the remote site sent (for `agreement`); a resumed leader's own.
        self.received = _restored_or_zeros(residual.residual.numel(), received)
        self.task: asyncio.Task[None] | None = None


async def _pump(ctx: WorkerContext, pipe: _Pipe, opt: Options) -> None:
    """Send the top-k of the residual each time a new site sum came in and the previous
    message has left: the pipe stays busy with the freshest entries, never with a queue."""
    while True:
        await pipe.fresh.wait()
        pipe.fresh.clear()
        dst = pipe.dst
        if dst is None:
            continue
        if opt.pge:
            latency = ctx.latency(dst) if pipe.lockstep else 0.0
            k = link_budget_entries(
                ctx.bandwidth(dst),
                latency,
                pipe.budget_s,
                ctx.header_bytes,
                opt.min_link_fraction if pipe.lockstep else 0.0,
            )
        else:
            k = pipe.residual.residual.numel()
        async with ctx.charged("topk", pipe.residual.residual.numel()):
            payload = pipe.residual.take(k, opt.dense_fraction, pipe.z)
        if not await ctx.send(dst, REMOTE_TAG, payload, dict(pipe.meta)):
            pipe.residual.put_back(payload)
            ctx.record("pipe_send_failed", site=pipe.site, peer=dst)


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    model_numel = ctx.replica.model_numel
    G = ctx.global_batch
    me = ctx.rank
    my_site = ctx.site(me)
    t = ctx.iteration  # a joiner starts at the iteration it was admitted from
    lost: set[tuple[int, int]] = set()  # (rank, incarnation) that failed an exchange
    known: dict[int, tuple[float, float]] = {}  # newest (speed, loss EMA) of every rank
    batches: dict[int, int] = {}
    alloc_speeds: dict[int, float] | None = None
    speed: float | None = None
    loss_ema: float | None = None
    iteration_s: float | None = None  # compute + all-reduce of the last iteration
    restored_s = ctx.restored_state("iteration_s")  # a resumed worker's (for `pipe_mode`)
    if restored_s is not None and restored_s.numel() == 1 and float(restored_s[0]) > 0:
        iteration_s = float(restored_s[0])
    ctx.keep_state("iteration_s", lambda: torch.tensor([iteration_s or 0.0], dtype=torch.float64))
    pipes: dict[str, _Pipe] = {}  # leader only: one per remote site
    latest: dict[str, int] = {}  # newest iteration received from each remote site
    gate = opt.agreement_gate and opt.significance_z is not None
    absorb_ops = 2 if gate else 1  # a received update goes into remote (and received)
    own_sum = _restored_or_zeros(numel, ctx.restored_state("own_sum"))  # leader: decayed
    ctx.keep_state("own_sum", lambda: own_sum)  # sum of the site's own updates (agreement)
    was_leader = False
    modes: dict[str, PipeMode] = {}  # leader: how it last exchanged with each remote site
    overheads: dict[int, float] = {}  # fixed per-step costs of the site's members (wdb.py)
    meter = StepCostMeter(ctx.step_overhead, opt.speed_ema)  # this worker's
    my_cost = ctx.step_overhead  # sent in the next all-reduce's meta, so all see the same
    alloc_costs: dict[int, float] | None = None
    background: set[asyncio.Task[bool]] = set()

    def spawn(coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        background.add(task)
        task.add_done_callback(background.discard)

    def absorb(msg: Message, into: torch.Tensor) -> None:
        update = msg.payload.to_dense(numel)  # type: ignore[union-attr]
        into += update
        known.update(read_knowledge(msg.meta))
        src_site = ctx.site(int(msg.meta.get("src", msg.src)))
        if gate and src_site in pipes:
            pipes[src_site].received += update
        latest[src_site] = max(latest.get(src_site, -1), int(msg.meta.get("it", -1)))

    async def feed_pipes(
        own: torch.Tensor,
        sites: dict[str, list[int]],
        it: int,
        budget_s: float,
        send_first: bool = False,
    ) -> None:
        """Leader: add the site's own sum of iteration `it` (no remote part: what came from
        other sites goes back nowhere) to every live pipe's residual and wake its pump.
        `send_first` (synchronous sites wait for these messages): wake the pumps before the
        agreement gate's bookkeeping, whose threshold then applies from the next message."""
        pipe_meta = {"it": float(it), "src": float(me)} | knowledge_meta(known, sites[my_site])
        live = [(s, pipe) for s, pipe in pipes.items() if s in sites]

        async def feed(pipe: _Pipe) -> None:
            async with ctx.charged("axpy", 3 * numel, 3):  # residual, squares
                pipe.residual.add(own)
            pipe.budget_s = budget_s
            pipe.meta = pipe_meta

        async def decay_own_sum() -> None:
            async with ctx.charged("axpy", 2 * numel, 2):  # decay, add
                own_sum.mul_(AGREEMENT_DECAY).add_(own)

        async def gate_pipe(s: str, pipe: _Pipe) -> None:
            async with ctx.charged("axpy", 4 * numel, 4):  # dot, two norms, decay
                cosine = agreement(own_sum, pipe.received)
                pipe.received.mul_(AGREEMENT_DECAY)
            pipe.z = gated_z(opt.significance_z, cosine)
            if it % 100 == 0:
                ctx.record("agreement", iteration=it, site=s, cosine=cosine)

        if send_first:
            for _, pipe in live:
                await feed(pipe)
                pipe.fresh.set()
            if gate:
                await decay_own_sum()
                for s, pipe in live:
                    await gate_pipe(s, pipe)
            return
        if gate:
            await decay_own_sum()
        for s, pipe in live:
            await feed(pipe)
            pipe.z = opt.significance_z
            if gate:
                await gate_pipe(s, pipe)
            pipe.fresh.set()

    if ctx.peer_since(me) > 0:
        # A joiner took a live peer's model; a site keeps one model, so adopt the site's.
        mates = [r for r in ctx.members(t) if r != me and ctx.site(r) == my_site]
        if mates:
            since = t
            if await ctx.fetch_state(site_leader(mates, ctx.peer_since)):
                ctx.iteration = since

    while True:
        ranks = [r for r in ctx.members(t) if r == me or (r, ctx.incarnation(r)) not in lost]
        groups = site_groups(ranks, ctx.site)
        mates = groups[my_site]
        leaders = {s: site_leader(rs, ctx.peer_since) for s, rs in groups.items()}
        leader = leaders[my_site]
        is_leader = leader == me
        if is_leader != was_leader:
            if was_leader:  # a longer-standing member is back in view: it leads
                for pipe in pipes.values():
                    if pipe.task is not None:
                        pipe.task.cancel()
                    ctx.drop_state(f"residual.{pipe.site}")
                    ctx.drop_state(f"squares.{pipe.site}")
                    ctx.drop_state(f"received.{pipe.site}")
                pipes.clear()
            ctx.record("leader_changed", iteration=t, site=my_site, leader=leader)
            was_leader = is_leader
        if is_leader:
            for s in groups:
                if s != my_site and s not in pipes:
                    residual = PipeResidual(
                        numel,
                        ctx.restored_state(f"residual.{s}"),
                        ctx.restored_state(f"squares.{s}"),
                    )
                    pipe = _Pipe(s, residual, ctx.restored_state(f"received.{s}"))
                    pipe.z = opt.significance_z  # the gate's threshold before any measure
                    # mypy cannot infer the type of a lambda with a default argument.
                    ctx.keep_state(f"residual.{s}", lambda p=pipe: p.residual.residual)  # type: ignore[misc]
                    ctx.keep_state(f"squares.{s}", lambda p=pipe: p.residual.squares)  # type: ignore[misc]
                    ctx.keep_state(f"received.{s}", lambda p=pipe: p.received)  # type: ignore[misc]
                    pipe.task = asyncio.ensure_future(_pump(ctx, pipe, opt))
                    pipes[s] = pipe
            for s, pipe in pipes.items():
                pipe.dst = leaders.get(s)

        batch = batches.get(me) or equal_batches(G, len(ranks))[ranks.index(me)]
        result = await ctx.compute(batch)
        sample_speed = result.samples / result.seconds
        if ctx.step_overhead > 0:  # samples/s of the per-sample work alone (wdb.py)
            sample_speed = result.samples / max(result.seconds - ctx.step_overhead, 1e-9)
        speed = sample_speed if speed is None else ema(speed, sample_speed, opt.speed_ema)
        loss_ema = result.loss if loss_ema is None else ema(loss_ema, result.loss, 1 - opt.loss_ema)
        known[me] = (speed, loss_ema)
        weighted = result.grad * (batch / G)

        # Remote updates and knowledge transfers: the leader takes them, others forward.
        remote = torch.zeros(numel)
        delta: torch.Tensor | None = None
        sync_sites: list[str] = []  # leader: remote sites whose iteration-t update it awaits
        if is_leader:
            for s in groups:
                delay = opt.max_delay
                if delay is None and opt.lockstep_slack is not None and s != my_site:
                    paces = site_iteration_times(groups, known, G, len(ranks))
                    mode = pipe_mode(
                        paces.get(s),
                        paces.get(my_site),
                        ctx.latency(leaders[s]),
                        iteration_s,
                        opt.lockstep_slack,
                        opt.site_sync,
                    )
                    if modes.get(s) != mode:
                        ctx.record("pipe_mode", iteration=t, site=s, mode=mode)
                        modes[s] = mode
                    delay = None if mode == "overlap" else 1
                    if mode == "sync" and s in pipes:
                        sync_sites.append(s)
                        pipes[s].lockstep = True
                        continue  # awaited once the site's own sum is formed (below)
                if s in pipes:
                    pipes[s].lockstep = delay is not None
                if s == my_site or delay is None:
                    continue
                need = t - delay
                while latest.get(s, -1) < need:
                    msg = await ctx.recv(None, REMOTE_TAG, numel=numel)
                    if not isinstance(msg, Message):
                        ctx.record("remote_wait_timeout", site=s, iteration=t, why=repr(msg))
                        break
                    async with ctx.charged("axpy", absorb_ops * numel, absorb_ops):
                        absorb(msg, remote)
        for tag, size in ((REMOTE_TAG, numel), (MODEL_TAG, model_numel)):
            while isinstance(msg := await ctx.recv(None, tag, timeout=0.0, numel=size), Message):
                if not is_leader:
                    spawn(ctx.send(leader, tag, msg.payload, msg.meta))
                elif tag == REMOTE_TAG:
                    async with ctx.charged("axpy", absorb_ops * numel, absorb_ops):
                        absorb(msg, remote)
                else:
                    best = msg.payload.to_dense(model_numel)  # type: ignore[union-attr]
                    delta = opt.dkt_gamma * (best - ctx.replica.model_state())

        # Dense, synchronous sum inside the site; the leader's part carries the remote ones.
        meta = {"s": speed, "l": loss_ema, "dkt": 0.0 if delta is None else 1.0}
        if sync_sites:
            meta["sync"] = 1.0
        if my_cost > 0:
            meta["o"] = my_cost
        if is_leader:
            meta |= knowledge_meta(known, [r for r in known if ctx.site(r) != my_site])
        sync_start = ctx.now()
        paid = ctx.charged_here()  # WDB's fixed cost: the work every member does (wdb.py)
        # The weighting above and the leader's addition of the remote updates.
        async with ctx.charged("axpy", numel, 2 if is_leader else 1):
            vector = weighted + remote if is_leader else weighted
        got = await sharded_allreduce(ctx, vector, f"dl{t}", mates, meta)
        step_vector_s = ctx.charged_here() - paid
        total = got.total
        fed = False
        budget_s = 0.0
        if got.metas.get(leader, {}).get("sync", 0.0) == 1.0:
            # Synchronous sites: the leader sends the site's sum at once, waits for every
            # such site's update of this iteration, and a second collective hands them on.
            # The pipes' budget is this iteration's compute + all-reduce (no wait in it).
            budget_s = opt.rho * (result.seconds + (ctx.now() - sync_start))
            arrived = torch.zeros(numel)
            if is_leader:
                await feed_pipes(got.total - remote, groups, t, budget_s, send_first=True)
                fed = True
                for s in sync_sites:
                    while s in groups and latest.get(s, -1) < t:
                        msg = await ctx.recv(None, REMOTE_TAG, numel=numel)
                        if not isinstance(msg, Message):
                            ctx.record("remote_wait_timeout", site=s, iteration=t, why=repr(msg))
                            break
                        async with ctx.charged("axpy", absorb_ops * numel, absorb_ops):
                            absorb(msg, arrived)
            live = [r for r in mates if r not in got.lost]
            shared = await sharded_allreduce(ctx, arrived, f"ds{t}", live)
            for r in shared.lost:
                lost.add((r, ctx.incarnation(r)))
                ctx.record("peer_lost", peer=r, phase=f"ds{t}")
            async with ctx.charged("axpy", numel):
                total = got.total + shared.total
        paid = ctx.charged_here()
        await ctx.apply(total)
        step_vector_s += ctx.charged_here() - paid
        my_cost = meter.observe(step_vector_s if opt.wdb_vector_work else 0.0)
        # Compute + all-reduce (+ the step when not synchronous, whose wait is left out).
        step_s = result.seconds + (ctx.now() - sync_start)
        iteration_s = budget_s / opt.rho if fed else step_s
        for r in got.lost:
            lost.add((r, ctx.incarnation(r)))
            ctx.record("peer_lost", peer=r, phase=f"dl{t}")
        for r, m in got.metas.items():
            known[r] = (m["s"], m["l"])
            if "o" in m:
                overheads[r] = m["o"]
            if r == leader and not is_leader:
                known.update({q: v for q, v in read_knowledge(m).items() if ctx.site(q) != my_site})

        if is_leader and pipes and not fed:
            # This site's sum alone: the remote ones go back nowhere.
            await feed_pipes(got.total - remote, groups, t, opt.rho * step_s)

        # Knowledge transfer: the site applies the delta its leader announced.
        if got.metas.get(leader, {}).get("dkt", 0.0) == 1.0:
            tag = f"dlion/k{t}"
            if is_leader and delta is not None:
                for r in mates:
                    if r != me:
                        spawn(ctx.send(r, tag, Dense(delta)))
            elif not is_leader:
                msg = await ctx.recv(leader, tag, numel=model_numel)
                delta = msg.payload.to_dense(model_numel) if isinstance(msg, Message) else None  # type: ignore[union-attr]
            if delta is not None:
                async with ctx.charged("axpy", model_numel):
                    ctx.replica.set_model_state(ctx.replica.model_state() + delta)
        if is_leader and opt.dkt and t > 0 and t % opt.dkt_every == 0 and len(groups) > 1:
            losses = site_losses({r: v[1] for r, v in known.items()}, groups)
            if losses is not None:
                best, targets = dkt_plan({leaders[s]: v for s, v in losses.items()}, opt.dkt_margin)
                if best == me and targets:
                    state = Dense(ctx.replica.model_state())
                    for r in targets:
                        spawn(ctx.send(r, MODEL_TAG, state))
                    ctx.record("dkt", iteration=t, best=best, receivers=targets)

        # WDB over the site (its share of G follows its share of the workers) or over
        # every live worker, from the speeds this worker holds.
        pool = mates if opt.wdb_scope == "site" else ranks
        equal = equal_batches(G, len(ranks))
        share = sum(equal[ranks.index(r)] for r in pool)
        speeds = {r: known[r][0] for r in pool if r in known}
        if len(speeds) == len(pool) and len(ranks) > 1:
            costs = {r: overheads.get(r, 0.0) for r in pool}
            if opt.wdb and (
                should_rebalance(t, speeds, alloc_speeds, opt.reprofile_every, opt.drift_threshold)
                or costs_drifted(costs, alloc_costs, opt.drift_threshold)
            ):
                b_min = max(opt.b_min, ctx.replica.min_batch)  # BatchNorm needs two samples
                if any(costs.values()):  # fixed step costs: equalise step times (wdb.py)
                    sizes = equal_time_batches(
                        share, [speeds[r] for r in pool], list(costs.values()), b_min, opt.b_max
                    )
                else:
                    sizes = wdb_batch_sizes(share, [speeds[r] for r in pool], b_min, opt.b_max)
                batches = dict(zip(pool, sizes, strict=True))
                alloc_speeds = speeds
                alloc_costs = costs
                if me == pool[0]:
                    ctx.record(
                        "wdb",
                        iteration=t,
                        batches=sizes,
                        speeds=[speeds[r] for r in pool],
                        costs=list(costs.values()),
                    )
            elif not opt.wdb:
                batches = {}
        elif len(ranks) == 1:
            batches = {me: G}  # alone: the whole global batch (re-balanced when peers come)
        else:
            batches = {}  # someone's speed is not known yet: equal shares until it is
        t += 1
        ctx.iteration_done(result.loss)
