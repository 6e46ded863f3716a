"""The default `dlion` (issue 17): site groups and leaders, the per-pipe residual, the
sharded all-reduce inside a site, and the behaviour in the sim (one model per site, one
update per site pair, leader hand-over)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dlion.comm.collectives import sharded_allreduce
from dlion.comm.messages import Dense, Sparse
from dlion.context import WorkerContext
from dlion.core.config import MembershipEvent, with_membership
from dlion.engines.sim import run_sim
from dlion.strategies.dlion import (
    AGREEMENT_DECAY,
    PipeResidual,
    agreement,
    gated_z,
    knowledge_meta,
    pipe_mode,
    read_knowledge,
    site_groups,
    site_iteration_times,
    site_leader,
    site_losses,
)
from helpers import FREE_VECTORS, run_counting, small_config

SITES = {0: "a", 1: "a", 2: "b", 3: "c", 4: "b"}


def test_site_groups_are_in_rank_order() -> None:
    assert site_groups([4, 0, 2, 1, 3], SITES.__getitem__) == {
        "a": [0, 1],
        "b": [2, 4],
        "c": [3],
    }


def test_the_longest_standing_member_leads_then_the_lowest_rank() -> None:
    since = {0: 0, 1: 0, 2: 7, 4: 3}
    assert site_leader([0, 1], since.__getitem__) == 0
    assert site_leader([1], since.__getitem__) == 1  # 0 left: the next one leads
    # 0 came back (admitted at 9): 1 keeps the role, and with it the residuals.
    assert site_leader([0, 1], {0: 9, 1: 0}.__getitem__) == 1
    assert site_leader([2, 4], since.__getitem__) == 4


def test_site_losses_are_member_means_once_all_are_known() -> None:
    groups = {"a": [0, 1], "b": [2]}
    assert site_losses({0: 0.5, 1: 0.3, 2: 0.9}, groups) == pytest.approx({"a": 0.4, "b": 0.9})
    assert site_losses({0: 0.5, 2: 0.9}, groups) is None


def test_pipe_residual_sends_the_largest_accumulated_entries() -> None:
    pipe = PipeResidual(5)
    pipe.add(torch.tensor([1.0, -4.0, 0.5, 0.0, 2.0]))
    pipe.add(torch.tensor([1.5, 0.0, 0.0, -3.0, 0.0]))  # accumulates: [2.5, -4, 0.5, -3, 2]
    payload = pipe.take(2)
    assert isinstance(payload, Sparse)
    assert sorted(payload.indices.tolist()) == [1, 3]
    assert torch.equal(pipe.residual, torch.tensor([2.5, 0.0, 0.5, 0.0, 2.0]))
    assert isinstance(pipe.take(3, dense_fraction=0.5), Dense)  # 3 >= 2.5: all of it
    assert torch.equal(pipe.residual, torch.zeros(5))
    empty = pipe.take(0)
    assert isinstance(empty, Sparse) and empty.indices.numel() == 0


def test_pipe_residual_sends_only_significant_entries_with_z() -> None:
    """r^2 > z^2 * v, v the sum of squares since the last send. Two updates:
    entry 0: 1 + 1 = 2, v = 2, r^2 = 4 > 2 (a consistent drift);
    entry 1: 3 - 3 = 0, v = 18 (pure noise: never);
    entry 2: 5 - 1 = 4, v = 26, r^2 = 16 < 26 (large but noisy: kept, though top-k would
    send it first); entry 3: 0 + 0.5, v = 0.25, r^2 = 0.25, not > 0.25 (one update alone)."""
    pipe = PipeResidual(4)
    pipe.add(torch.tensor([1.0, 3.0, 5.0, 0.0]))
    pipe.add(torch.tensor([1.0, -3.0, -1.0, 0.5]))
    payload = pipe.take(2, z=1.0)  # budget 2, one significant entry: one goes
    assert isinstance(payload, Sparse)
    assert payload.indices.tolist() == [0] and payload.values.tolist() == [2.0]
    assert torch.equal(pipe.residual, torch.tensor([0.0, 0.0, 4.0, 0.5]))
    assert torch.equal(pipe.squares, torch.tensor([0.0, 18.0, 26.0, 0.25]))
    # z = 0.5: entry 2 now passes (16 > 0.25 * 26 = 6.5), entry 3 too (0.25 > 0.0625).
    payload = pipe.take(1, z=0.5)
    assert isinstance(payload, Sparse) and payload.indices.tolist() == [2]
    # Without z: plain top-k by magnitude.
    pipe = PipeResidual(4)
    pipe.add(torch.tensor([1.0, 3.0, 5.0, 0.0]))
    pipe.add(torch.tensor([1.0, -3.0, -1.0, 0.5]))
    assert pipe.take(1).indices.tolist() == [2]  # type: ignore[union-attr]


def test_agreement_is_the_cosine_of_the_decayed_sums_and_zero_before_any() -> None:
    """own = [3, 4, 0] (norm 5), received = [4, 0, 3] (norm 5): dot 12, cosine 12 / 25."""
    own, received = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([4.0, 0.0, 3.0])
    assert agreement(own, received) == pytest.approx(0.48)
    assert agreement(own, -received) == pytest.approx(-0.48)
    assert agreement(own, torch.zeros(3)) == 0.0  # nothing received yet: no agreement
    assert agreement(torch.zeros(3), received) == 0.0


def test_gated_z_keeps_the_test_only_while_the_sites_agree() -> None:
    """The rule: z unless the two sites' long-run updates are measured to oppose (cosine < 0:
    plain top-k, None); nothing measured yet (0) keeps z; nothing when the test is off."""
    assert gated_z(1.0, 0.48) == 1.0
    assert gated_z(1.5, 0.01) == 1.5
    assert gated_z(1.0, 0.0) == 1.0
    assert gated_z(1.0, -0.01) is None
    assert gated_z(1.0, -0.48) is None
    assert gated_z(None, 0.9) is None


def test_agreement_over_decayed_sums_separates_a_shared_drift_from_opposed_ones() -> None:
    """Hand-computed with the module's decay d: own updates [1, 0] every iteration, remote
    ones [1, 1] (IID-like: a shared drift) or [-1, 1] (skewed: opposed on the shared
    entry). After n iterations both sums are (1 - d^n) / (1 - d) times the update, so the
    cosine is that of the updates: 1/sqrt(2) and -1/sqrt(2); the gate follows its sign."""
    d = AGREEMENT_DECAY
    own, same, opposed = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    for _ in range(50):
        own.mul_(d).add_(torch.tensor([1.0, 0.0]))
        same.mul_(d).add_(torch.tensor([1.0, 1.0]))
        opposed.mul_(d).add_(torch.tensor([-1.0, 1.0]))
    assert float(own[0]) == pytest.approx((1 - d**50) / (1 - d), rel=1e-5)
    assert agreement(own, same) == pytest.approx(2**-0.5, rel=1e-5)
    assert agreement(own, opposed) == pytest.approx(-(2**-0.5), rel=1e-5)
    assert gated_z(1.0, agreement(own, same)) == 1.0
    assert gated_z(1.0, agreement(own, opposed)) is None


def test_pipe_residual_with_z_goes_dense_over_half_and_keeps_the_rest() -> None:
    pipe = PipeResidual(4)
    pipe.add(torch.tensor([1.0, 2.0, 3.0, 1.0]))
    pipe.add(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # 0, 1, 2 significant; 3 is noise
    payload = pipe.take(4, dense_fraction=0.5, z=1.0)
    assert isinstance(payload, Dense)
    assert payload.values.tolist() == [2.0, 4.0, 6.0, 0.0]
    assert torch.equal(pipe.residual, torch.zeros(4))  # entry 3 accumulated to 0
    assert torch.equal(pipe.squares, torch.tensor([0.0, 0.0, 0.0, 2.0]))


def test_pipe_residual_resumes_with_its_squares() -> None:
    """A resumed leader's test sees the sums of squares it had: 2^2 = 4 > 2 passes, and a
    malformed saved tensor is ignored (zeros)."""
    pipe = PipeResidual(2, torch.tensor([2.0, 2.0]), torch.tensor([2.0, 5.0]))
    assert pipe.take(2, dense_fraction=1.5, z=1.0).indices.tolist() == [0]  # type: ignore[union-attr]
    assert torch.equal(PipeResidual(2, None, torch.ones(3)).squares, torch.zeros(2))


def test_pipe_residual_loses_nothing_and_puts_back_what_failed() -> None:
    """Per pipe: everything sent + the residual = every site sum added (error feedback);
    an undelivered update is owed again."""
    gen = torch.Generator().manual_seed(0)
    pipe = PipeResidual(200)
    added = torch.zeros(200)
    sent = torch.zeros(200)
    for it in range(40):
        update = torch.randn(200, generator=gen)
        pipe.add(update)
        added += update
        payload = pipe.take([0, 3, 20, 150][it % 4], z=1.0 if it % 2 else None)
        if it % 7 == 3:
            pipe.put_back(payload)  # the destination was gone
        else:
            sent += payload.to_dense(200)
    assert torch.allclose(sent + pipe.residual, added, atol=1e-4)


def test_knowledge_meta_round_trip() -> None:
    known = {2: (100.0, 0.5), 5: (25.0, 1.5)}
    meta = knowledge_meta(known, [2, 5, 7])
    assert meta == {"s2": 100.0, "l2": 0.5, "s5": 25.0, "l5": 1.5}
    assert read_knowledge({**meta, "it": 3.0, "src": 2.0, "s": 1.0}) == known


def test_sharded_allreduce_sums_exactly_and_shares_metadata() -> None:
    """Three members, vectors r * [1..7]: every member gets the same sum 6 * [1..7] and
    every member's metadata."""
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 1.0, "count": 3}],
        train={"max_time": 0.05, "stop_at_target": False},
    )
    got: dict[int, Any] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        vec = (ctx.rank + 1) * torch.arange(1.0, 8.0)
        got[ctx.rank] = await sharded_allreduce(ctx, vec, "t", [0, 1, 2], {"x": float(ctx.rank)})
        while True:
            await ctx.compute(1)
            ctx.iteration_done(0.0)

    run_counting(cfg, worker, None)
    for r in range(3):
        assert torch.equal(got[r].total, 6 * torch.arange(1.0, 8.0))
        assert got[r].metas == {q: {"x": float(q)} for q in range(3)}
        assert got[r].lost == []


@pytest.mark.parametrize(
    "views",
    [
        {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2, 3]},
        {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2]},
    ],
)
def test_sharded_allreduce_agrees_when_members_start_with_different_views(
    views: dict[int, list[int]],
) -> None:
    """On real processes a departure reaches survivors at different moments: some plan
    without member 3 while others still count it, and 3 is silent. The members narrow to
    the common group {0, 1, 2}: all three get the same exact sum 6 * [1..7] (nobody waits
    on a message sized for another group, nothing sent for the larger group is summed)
    and those that counted 3 report it as lost."""
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 1.0, "count": 4}],
        train={"max_time": 0.05, "stop_at_target": False},
        engine={"recv_timeout": 0.01},
    )
    got: dict[int, Any] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank in views:
            vec = (ctx.rank + 1) * torch.arange(1.0, 8.0)
            got[ctx.rank] = await sharded_allreduce(ctx, vec, "t", views[ctx.rank])
        while True:
            await ctx.compute(1)
            ctx.iteration_done(0.0)

    run_counting(cfg, worker, None)
    for r in views:
        assert torch.equal(got[r].total, 6 * torch.arange(1.0, 8.0)), r
        assert sorted(got[r].metas) == [0, 1, 2]
    for r in views:
        assert got[r].lost == ([3] if 3 in views[r] else []), r


def _three_sites(
    gflops: tuple[float, float, float] = (0.4, 0.2, 0.1),
    pipes: tuple[tuple[float, float], ...] = ((20, 4), (10, 6), (7, 8)),
    **options: Any,
) -> Any:
    """Sites a, b, c of two workers each (`gflops` per site); `pipes`: (Mbit/s, ms) of the
    a-b, b-c and a-c site pipes."""
    pairs = (["a", "b"], ["b", "c"], ["a", "c"])
    return small_config(
        workers=[
            {"site": site, "capacity_gflops": g, "count": 2}
            for site, g in zip("abc", gflops, strict=True)
        ],
        sites=[{"name": "a"}, {"name": "b"}, {"name": "c"}],
        links=[
            {"sites": pair, "bandwidth_mbps": mbps, "latency_ms": ms}
            for pair, (mbps, ms) in zip(pairs, pipes, strict=True)
        ],
        options=options,
        train={"max_time": 1.0, "stop_at_target": False},
        engine=FREE_VECTORS,
    )


def test_a_site_keeps_one_model_and_sites_differ() -> None:
    """Members of a site apply the same total every iteration: after each iteration their
    parameters are bit-identical; sites differ (sparse, late exchange across sites)."""
    result, after = _models_after_each_iteration(_three_sites())
    pairs = [(0, 1), (2, 3), (4, 5)]
    compared = 0
    for a, b in pairs:
        for (rank, it), flat in after.items():
            if rank == a and (b, it) in after:
                assert torch.equal(flat, after[b, it])
                compared += 1
    assert compared > 50
    last = max(it for r, it in after if r == 4)
    assert not torch.equal(after[0, last], after[4, last])
    assert result.summary["final_acc"] >= 0.85


def test_only_site_leaders_talk_across_sites_one_flow_per_pipe() -> None:
    """Everything a non-leader sends stays in its site (the all-reduce); the leaders'
    inter-site updates never exceed one message in flight per pipe."""
    cfg = _three_sites()
    seen: list[tuple[int, int, str]] = []

    from dlion.strategies import get_strategy, parse_options

    spec = get_strategy("dlion")

    async def spying(ctx: WorkerContext, opt: Any) -> None:
        send = ctx.send

        async def logged(dst: int, tag: str, payload: Any, meta: Any = None) -> bool:
            seen.append((ctx.rank, dst, tag))
            return await send(dst, tag, payload, meta)

        ctx.send = logged  # type: ignore[method-assign]
        await spec.worker(ctx, opt)

    run_counting(cfg, spying, parse_options(spec, {}))
    site = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    across = {(s, d) for s, d, _ in seen if site[s] != site[d]}
    assert across == {(0, 2), (0, 4), (2, 0), (2, 4), (4, 0), (4, 2)}
    assert all(tag == "dlion/x" for s, d, tag in seen if site[s] != site[d])


def test_lockstep_sites_wait_for_each_other() -> None:
    """max_delay 1: a leader at iteration t holds every remote site's update of t - 1, so
    the sites' iteration counts never drift apart by more than that."""
    result = run_sim(_three_sites(max_delay=1), progress=False)
    free = run_sim(_three_sites(lockstep_slack=None), progress=False)
    assert result.summary["final_acc"] >= 0.85
    assert not [e for e in result.events if e["event"] == "remote_wait_timeout"]
    # Waiting costs time: fewer iterations in the same second than the overlapped default.
    assert result.summary["iterations"] < free.summary["iterations"]


def test_site_iteration_times_follow_measured_speeds() -> None:
    groups = {"a": [0, 1], "b": [2, 3], "c": [4]}
    known = {0: (400.0, 1.0), 1: (400.0, 1.0), 2: (100.0, 1.0), 3: (100.0, 1.0)}
    # G = 50 over 5 workers: a's share is 20 samples at 800 samples/s, b's 20 at 200.
    times = site_iteration_times(groups, known, 50, 5)
    assert times == {"a": pytest.approx(0.025), "b": pytest.approx(0.1), "c": None}


def test_a_departed_leader_hands_the_role_to_the_next_member() -> None:
    cfg = with_membership(_three_sites(), [MembershipEvent(at_s=0.4, rank=0, event="leave")])
    result = run_sim(cfg, progress=False)
    changes = [(e["rank"], e["leader"]) for e in result.events if e["event"] == "leader_changed"]
    assert (1, 1) in changes  # rank 1 now leads site a
    late = [p for p in result.points if p.t >= 0.5]
    assert late[-1].iteration > late[0].iteration
    assert result.summary["final_acc"] >= 0.85


def test_pipe_mode_follows_measured_paces_and_latency() -> None:
    # Paces in s per iteration; slack 0.25; this site's iteration time 0.015 s.
    # A remote site 1.3x slower: overlap (never wait on it).
    assert pipe_mode(0.013, 0.010, 0.002, 0.015, 0.25, True) == "overlap"
    # A remote site 1.3x faster: lock-step (its previous update is always there).
    assert pipe_mode(0.010, 0.013, 0.002, 0.015, 0.25, True) == "lockstep"
    # Within 1.25x both ways and latency 10 ms < 15 ms: synchronous.
    assert pipe_mode(0.012, 0.010, 0.010, 0.015, 0.25, True) == "sync"
    assert pipe_mode(0.010, 0.012, 0.010, 0.015, 0.25, True) == "sync"
    # The same pair over a pipe whose latency (15 ms) is not under the iteration: lock-step.
    assert pipe_mode(0.012, 0.010, 0.015, 0.015, 0.25, True) == "lockstep"
    # Switched off, or the iteration time not measured yet: lock-step.
    assert pipe_mode(0.012, 0.010, 0.010, 0.015, 0.25, False) == "lockstep"
    assert pipe_mode(0.012, 0.010, 0.010, None, 0.25, True) == "lockstep"
    # A pace not known yet: overlap.
    assert pipe_mode(None, 0.010, 0.002, 0.015, 0.25, True) == "overlap"


def _equal_sites(**options: Any) -> Any:
    return _three_sites((0.02, 0.02, 0.02), ((100, 2), (20, 3), (20, 3)), **options)


def _models_after_each_iteration(cfg: Any) -> tuple[Any, dict[tuple[int, int], torch.Tensor]]:
    from dlion.strategies import get_strategy, parse_options

    spec = get_strategy("dlion")
    after: dict[tuple[int, int], torch.Tensor] = {}

    async def spying(ctx: WorkerContext, opt: Any) -> None:
        done = ctx.iteration_done

        def logged(loss: float) -> None:
            after[ctx.rank, ctx.iteration] = ctx.replica.flat.clone()
            done(loss)

        ctx.iteration_done = logged  # type: ignore[method-assign]
        await spec.worker(ctx, opt)

    options = parse_options(spec, cfg.strategy.options)
    result, _ = run_counting(cfg, spying, options)
    return result, after


def test_equal_paced_sites_exchange_synchronously() -> None:
    """Three equal sites, dense exchange, no significance test: with site_sync every site
    applies every site's sum of iteration t in iteration t, so all sites keep (up to the
    order of the float sums) one model; one iteration late (site_sync off) they drift."""
    dense = {"pge": False, "significance_z": None}
    result, after = _models_after_each_iteration(_equal_sites(**dense))
    modes = {(e["rank"], e["site"]): e["mode"] for e in result.events if e["event"] == "pipe_mode"}
    assert modes == {
        (0, "b"): "sync",
        (0, "c"): "sync",
        (2, "a"): "sync",
        (2, "c"): "sync",
        (4, "a"): "sync",
        (4, "b"): "sync",
    }
    assert not [e for e in result.events if e["event"] == "remote_wait_timeout"]
    _, late = _models_after_each_iteration(_equal_sites(site_sync=False, **dense))
    last = max(it for r, it in after if r == 4) - 1
    assert last > 20
    for models in (after, late):
        assert torch.equal(models[0, last], models[1, last])  # one model per site
    gap = float((after[0, last] - after[4, last]).abs().max())
    late_gap = float((late[0, last] - late[4, last]).abs().max())
    assert gap < 1e-5
    assert late_gap > 100 * gap
    assert result.summary["final_acc"] >= 0.85


def test_a_synchronous_leader_that_leaves_hands_over_without_a_stall() -> None:
    cfg = with_membership(_equal_sites(), [MembershipEvent(at_s=0.4, rank=0, event="leave")])
    result = run_sim(cfg, progress=False)
    changes = [(e["rank"], e["leader"]) for e in result.events if e["event"] == "leader_changed"]
    assert (1, 1) in changes
    assert any(e["event"] == "pipe_mode" and e["rank"] == 1 for e in result.events)
    late = [p for p in result.points if p.t >= 0.5]
    assert late[-1].iteration > late[0].iteration + 10
    assert result.summary["final_acc"] >= 0.85
