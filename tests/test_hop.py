"""Hop's rules (PAPERS.md section 1): neighbour graphs, averaging, bounded staleness, backup
workers, iteration skipping, timeouts, and end-to-end training."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from functools import cache
from typing import Any

import pytest
import torch

from dlion.context import WorkerContext
from dlion.core.config import load_config
from dlion.core.errors import ConfigError
from dlion.engines.sim import RunResult, run_sim
from dlion.strategies import get_strategy, hop, parse_options
from dlion.strategies.hop import (
    UpdateQueues,
    average_models,
    current_needed,
    may_proceed,
    neighbour_graph,
    skip_target,
    stale_neighbours,
)
from helpers import FREE_VECTORS, registered, small_config

# ------------------------------------------------------------------------------ graphs


def _edges(graph: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(i, j) for i, nbrs in graph.items() for j in nbrs if i < j}


# Sites chosen so that a site's members are not all ring-adjacent: ranks 0 and 2 share a
# site but are two apart on the ring, as are 1 and 3.
SITES = ["a", "b", "a", "b", "c", "c"]
RING = {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5)}


def test_ring_graph_links_consecutive_ranks_and_wraps() -> None:
    assert _edges(neighbour_graph(SITES, "ring")) == RING


def test_ring_plus_site_adds_every_pair_within_a_site() -> None:
    graph = neighbour_graph(SITES, "ring+site")
    assert _edges(graph) == RING | {(0, 2), (1, 3)}  # (4, 5) is a ring edge already
    assert graph[0] == [1, 2, 5]
    assert graph[4] == [3, 5]


def test_all_graph_is_complete() -> None:
    graph = neighbour_graph(SITES, "all")
    assert _edges(graph) == {(i, j) for i in range(6) for j in range(i + 1, 6)}
    assert graph[3] == [0, 1, 2, 4, 5]


def test_tiny_rings_have_no_self_loops_or_duplicates() -> None:
    assert neighbour_graph(["a", "a"], "ring") == {0: [1], 1: [0]}
    assert neighbour_graph(["a"], "ring+site") == {0: []}
    with pytest.raises(ValueError, match="unknown neighbour graph"):
        neighbour_graph(SITES, "star")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ averaging


def test_average_is_the_uniform_mean_of_own_and_received_models() -> None:
    own = torch.tensor([1.0, 2.0, 3.0])
    a = torch.tensor([3.0, 2.0, -3.0])
    b = torch.tensor([2.0, 5.0, 0.0])
    assert torch.equal(average_models(own, [a, b]), torch.tensor([2.0, 3.0, 0.0]))
    assert torch.equal(average_models(own, [a]), torch.tensor([2.0, 2.0, 0.0]))
    assert torch.equal(average_models(own, []), own)
    assert average_models(own, [a]) is not own  # never aliases the replica


# ------------------------------------------------------------------------------ synchronization


def test_staleness_blocks_only_neighbours_older_than_the_bound() -> None:
    newest = {1: 6, 2: 5, 3: 9}
    assert stale_neighbours(10, newest, staleness=4) == [2]
    assert stale_neighbours(10, newest, staleness=5) == []
    assert stale_neighbours(10, newest, staleness=0) == [1, 2, 3]


def test_backup_waits_for_current_updates_of_all_but_the_backups() -> None:
    assert current_needed(3, backup=1) == 2
    assert current_needed(3, backup=0) == 3
    assert current_needed(1, backup=1) == 1  # never proceeds on staleness alone
    assert current_needed(0, backup=1) == 0
    # t = 10, staleness 4: everyone is recent enough; two of three are current.
    assert may_proceed(10, {1: 10, 2: 11, 3: 7}, staleness=4, backup=1)
    assert not may_proceed(10, {1: 10, 2: 9, 3: 7}, staleness=4, backup=1)
    assert not may_proceed(10, {1: 10, 2: 11, 3: 7}, staleness=4, backup=0)
    # Enough current updates do not excuse a neighbour beyond the staleness bound.
    assert not may_proceed(10, {1: 10, 2: 11, 3: 5}, staleness=4, backup=1)
    assert may_proceed(0, {}, staleness=0, backup=0)  # a worker alone


def test_queue_uses_the_freshest_update_within_the_bound_and_keeps_future_ones() -> None:
    queues = UpdateQueues([1, 2, 3])
    for src, it in [(1, 3), (1, 5), (1, 7), (2, 1), (2, 2), (3, 8)]:
        queues.push(src, it, torch.full((2,), float(10 * src + it)))
    queues.push(9, 6, torch.zeros(2))  # not a neighbour: ignored
    assert queues.newest == {1: 7, 2: 2, 3: 8}
    used = queues.take(6, staleness=4)
    assert {j: it for j, (it, _) in used.items()} == {1: 5, 2: 2}  # 1's 7 and 3's 8 wait
    assert torch.equal(used[1][1], torch.full((2,), 15.0))
    assert queues.pending[1][0][0] == 7 and queues.pending[3][0][0] == 8
    assert queues.pending[2] == []  # 2's iteration-1 update is superseded and dropped
    # Next iteration: 2 has nothing new, so only the updates kept for later are used.
    assert {j: it for j, (it, _) in queues.take(7, staleness=4).items()} == {1: 7}
    # An update older than the bound (8 - 4 = 4) is dropped, never used.
    queues.push(2, 3, torch.zeros(2))
    assert {j: it for j, (it, _) in queues.take(8, staleness=4).items()} == {3: 8}
    assert queues.pending == {1: [], 2: [], 3: []}


def test_skip_jumps_to_the_leading_neighbour_within_the_staleness_bound() -> None:
    # 3 behind the leader: more than the threshold 2, so jump to the leader's iteration.
    assert skip_target(10, {1: 13, 2: 12}, threshold=2, staleness=4) == 13
    assert skip_target(10, {1: 12, 2: 11}, threshold=2, staleness=4) == 10  # within it
    assert skip_target(10, {1: 13}, threshold=None, staleness=4) == 10  # skipping off
    # A worker held back by another neighbour jumps only as far as that one allows.
    assert skip_target(10, {1: 15, 2: 8}, threshold=2, staleness=4) == 12
    assert skip_target(10, {1: 15, 2: 5}, threshold=2, staleness=4) == 10  # never backwards
    assert skip_target(0, {}, threshold=0, staleness=0) == 0


def test_options_reject_a_skip_threshold_that_could_never_fire() -> None:
    spec = get_strategy("hop")
    with pytest.raises(ConfigError, match=r"strategy\.options\.skip_threshold: .*staleness"):
        parse_options(spec, {"staleness": 2, "skip_threshold": 3})
    with pytest.raises(ConfigError, match=r"strategy\.options\.graph"):
        parse_options(spec, {"graph": "star"})
    assert parse_options(spec, {"staleness": 2, "skip_threshold": None})


# ------------------------------------------------------------------------------ in the sim

STALENESS = 4
# Ranks 0 and 1 are 8x faster than rank 2; with 3 ranks the ring is all pairs, so each fast
# worker has one fast and one slow neighbour, and the slow one has two fast neighbours.
HETERO = [
    {"site": "a", "capacity_gflops": 0.08, "count": 2},
    {"site": "a", "capacity_gflops": 0.01},
]


@cache
def _hetero_run(skip_threshold: int | None, backup: int, max_time: float, seed: int = 0) -> Any:
    cfg = small_config(
        workers=HETERO,
        engine=FREE_VECTORS,
        strategy="hop",
        options={
            "graph": "ring",
            "staleness": STALENESS,
            "backup": backup,
            "skip_threshold": skip_threshold,
            "trace": True,
        },
        train={"max_time": max_time, "stop_at_target": False, "seed": seed},
    )
    return run_sim(cfg, progress=False)


def _trace(result: RunResult) -> dict[int, list[dict[str, Any]]]:
    by_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in result.events:
        if event["event"] == "hop":
            by_rank[event["rank"]].append(event)
    return by_rank


def test_updates_used_are_never_staler_than_the_bound() -> None:
    trace = _trace(_hetero_run(None, 1, 0.6))
    ages = [e["iteration"] - it for events in trace.values() for e in events for _, it in e["used"]]
    assert ages and min(ages) >= 0  # never an update from a later iteration
    assert max(ages) == STALENESS  # the bound is reached (the slow worker's updates) ...
    for events in trace.values():  # ... and every iteration held it for every neighbour
        for e in events:
            assert all(e["iteration"] - newest <= STALENESS for _, newest in e["newest"])


def test_without_skipping_the_bound_ties_fast_workers_to_the_slow_one() -> None:
    trace = _trace(_hetero_run(None, 1, 0.6))
    fast, slow = len(trace[0]), len(trace[2])
    assert slow > 10
    # The fast worker runs ahead by its whole allowance, and not one iteration more.
    assert fast == slow + STALENESS + 1


def test_skipping_frees_fast_workers_from_the_slow_ones_pace() -> None:
    trace = _trace(_hetero_run(2, 1, 0.6))
    fast, slow = trace[0], trace[2]
    assert sum(e["skipped"] for e in fast) == 0
    slow_skipped = sum(e["skipped"] for e in slow)
    assert slow_skipped > 0
    # The slow worker's counter keeps up by skipping; fast ones use their compute.
    assert len(fast) >= 3 * len(slow)
    assert fast[-1]["iteration"] <= slow[-1]["iteration"] + STALENESS + 1
    for e in fast:  # skipping never bends the staleness bound
        assert all(e["iteration"] - newest <= STALENESS for _, newest in e["newest"])


def test_backup_workers_let_fast_workers_proceed_without_the_slowest_update() -> None:
    def without_current(result: RunResult, rank: int) -> list[dict[str, Any]]:
        return [
            e
            for e in _trace(result)[rank]
            if any(newest < e["iteration"] for _, newest in e["newest"])
        ]

    with_backup = without_current(_hetero_run(None, 1, 0.6), 0)
    assert len(with_backup) > 10
    # It is always the slow neighbour (rank 2) that was not waited for.
    for e in with_backup:
        assert [j for j, newest in e["newest"] if newest < e["iteration"]] == [2]
    assert without_current(_hetero_run(None, 0, 0.3), 0) == []  # backup 0: wait for all


def test_a_silent_neighbour_times_out_and_is_dropped() -> None:
    async def silent_rank_2(ctx: WorkerContext, _options: Any) -> None:
        if ctx.rank == 2:
            await asyncio.sleep(1e9)  # alive but never sends
        await hop.worker(ctx, hop.Options(graph="ring", wait_timeout=0.2, trace=True))

    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.08, "count": 3}],
        strategy="hop-silent",
        train={"max_time": 0.6, "stop_at_target": False},
    )
    with registered("hop-silent", silent_rank_2):
        result = run_sim(cfg, progress=False)
    lost = [e for e in result.events if e["event"] == "peer_lost"]
    assert {(e["rank"], e["peer"]) for e in lost} == {(0, 2), (1, 2)}
    assert all(e["why"].startswith("timeout") for e in lost)
    # Blocked at iteration STALENESS by the silent worker for one timeout, then onwards.
    assert {e["phase"] for e in lost} == {"hop4"}
    assert all(0.2 <= e["t"] < 0.3 for e in lost)
    trace = _trace(result)
    assert len(trace[0]) > 50 and trace[0][-1]["newest"] == [[1, trace[0][-1]["iteration"]]]


def test_reaches_the_target_on_homogeneous() -> None:
    cfg = load_config("homogeneous", ["strategy.name=hop", "train.max_time=30"])
    assert run_sim(cfg, progress=False).summary["tta_s"] is not None


def test_same_seed_same_run_other_seed_other_run() -> None:
    a, b = _hetero_run(2, 1, 0.3), _hetero_run.__wrapped__(2, 1, 0.3)
    keep = ("eval", "hop", "peer_lost")
    assert [e for e in a.events if e["event"] in keep] == [
        e for e in b.events if e["event"] in keep
    ]
    c = _hetero_run(2, 1, 0.3, seed=1)
    assert [e for e in c.events if e["event"] == "eval"] != [
        e for e in a.events if e["event"] == "eval"
    ]
