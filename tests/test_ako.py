"""Ako's rules (PAPERS.md section 1, baselines): partition count, round robin, asynchrony."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dlion.comm.messages import META_ENTRY_BYTES, VALUE_BYTES
from dlion.core.config import ExperimentConfig, load_config
from dlion.engines.sim import RunResult, run_sim
from dlion.strategies import ako
from dlion.strategies.ako import PartitionedAccumulator, partition_bounds, partitions_for_link
from helpers import run_counting, small_config

# ------------------------------------------------------------------------------ P from the link


def test_partitions_for_link_by_hand() -> None:
    # 1e5 B/s for 10 ms = 1000 B, less 64 B header and two meta entries (24 B) = 912 B:
    # 228 float32 values per message, so 1000 entries need ceil(1000 / 228) = 5 partitions.
    assert partitions_for_link(1000, 1e5, 0.004, 0.01, 64) == 5
    # Charging the 4 ms latency leaves 600 - 88 = 512 B = 128 values: ceil(1000 / 128) = 8.
    assert partitions_for_link(1000, 1e5, 0.004, 0.01, 64, count_latency=True) == 8
    assert partitions_for_link(1000, 1e9, 0.004, 0.01, 64) == 1  # fast link: whole gradient
    assert partitions_for_link(1000, 1.0, 0.004, 0.01, 64) == 1000  # hopeless: one entry
    # Exactly one value fits: 92 B = 64 + 24 + 4.
    assert partitions_for_link(1000, 9200.0, 0.0, 0.01, 64) == 1000
    assert partitions_for_link(1000, 1e5, 0.02, 0.01, 64, count_latency=True) == 1000


@pytest.mark.parametrize("bandwidth", [3e3, 1e4, 5e4, 2.5e5, 1e6])
@pytest.mark.parametrize("numel", [17, 1000, 17226])
def test_partitions_for_link_is_the_smallest_p_that_fits(bandwidth: float, numel: int) -> None:
    budget = bandwidth * 0.01 - 64 - 2 * META_ENTRY_BYTES

    def fits(p: int) -> bool:
        return math.ceil(numel / p) * VALUE_BYTES <= budget

    p = partitions_for_link(numel, bandwidth, 0.0, 0.01, 64)
    assert 1 <= p <= numel
    assert fits(p) or p == numel
    assert p == 1 or not fits(p - 1)


def test_partitions_derived_in_sim_match_the_scenario_by_hand() -> None:
    """microcloud-hetero, rank 0 (site-a, 0.4 GFLOP/s): compute 32 * 85,760 / 4e8 = 6.8608 ms.
    Expected per-link rates to ranks 1..5 (the all-to-all share: each inter-site pipe
    carries 2 x 2 flows): 1000, 20/4, 20/4, 7/4, 7/4 Mbit/s. Budget bytes = bandwidth *
    6.8608 ms - 88: to site-b 625,000 B/s -> 4,200 B = 1,050 values -> ceil(17,226 / 1,050)
    = 17; to site-c 218,750 B/s -> 1,412 B = 353 values -> 49; inside the site the whole
    gradient fits: 1."""
    cfg = load_config("microcloud-hetero", ["strategy.name=ako", "train.max_time=0.05"])
    events = run_sim(cfg, progress=False).events
    first = next(e for e in events if e["event"] == "ako" and e["rank"] == 0)
    assert first["iteration"] == 0
    assert first["partitions"] == [1, 17, 17, 49, 49]


# ------------------------------------------------------------------------------ round robin


def test_partition_bounds() -> None:
    assert partition_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError, match="partitions"):
        partition_bounds(5, 6)


def test_each_partition_goes_once_every_p_sends_with_everything_accumulated() -> None:
    acc = PartitionedAccumulator(10, offset=1)
    starts = []
    for _ in range(8):
        acc.add(torch.ones(10))
        start, values = acc.take(4)
        starts.append(start)
        # The first time a partition goes it carries every iteration so far; afterwards
        # exactly the P = 4 iterations since its last turn.
        assert bool((values == (len(starts) if len(starts) <= 4 else 4)).all())
    # Partitions of 10 in 4: starts 0, 3, 6, 8; offset 1 begins with the second.
    assert starts == [3, 6, 8, 0, 3, 6, 8, 0]


def test_partial_exchange_conserves_the_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    acc = PartitionedAccumulator(103, offset=2)
    total = torch.zeros(103)
    delivered = torch.zeros(103)
    for t in range(50):
        grad = torch.randn(103, generator=gen)
        acc.add(grad)
        total += grad
        start, values = acc.take(7 if t < 25 else 5)  # P may change when re-derived
        delivered[start : start + values.numel()] += values
    assert torch.allclose(delivered + acc.accumulated, total, atol=1e-5)
    assert acc.accumulated.abs().sum() > 0  # some of it is still owed: the test is not vacuous


# ------------------------------------------------------------------------------ in the sim


def test_one_partition_in_lockstep_is_exactly_allreduce() -> None:
    """P = 1 and staleness 0 make Ako synchronous dense exchange: with two workers the
    applied updates, and so the replicas, must equal all-reduce's bit for bit."""

    def cfg(strategy: str, options: dict[str, Any]) -> ExperimentConfig:
        return small_config(
            strategy=strategy, options=options, train={"max_iterations": 8, "max_time": 60.0}
        )

    ako_run = run_sim(cfg("ako", {"partitions": 1, "staleness": 0}), progress=False)
    sync_run = run_sim(cfg("allreduce", {}), progress=False)
    assert ako_run.summary["iterations"] == sync_run.summary["iterations"] == 8
    for a, s in zip(ako_run.replicas, sync_run.replicas, strict=True):
        assert torch.equal(a.flat, s.flat)


def _run_counting(
    cfg: ExperimentConfig, options: ako.Options, die: frozenset[int] = frozenset()
) -> tuple[RunResult, dict[int, int]]:
    return run_counting(cfg, ako.worker, options, die)


def test_workers_never_wait_for_peers_by_default() -> None:
    # Timing pinned without vector charges (tests/test_vector_cost.py pins those).
    cfg = load_config(
        "microcloud-hetero", ["train.max_time=0.5", "engine.charge_vector_work=false"]
    )
    _, counts = _run_counting(cfg, ako.Options())
    # Compute alone: 6.86 ms (site-a), 13.7 ms (site-b), 27.4 ms (site-c) per iteration.
    for rank, per_iteration in [(0, 0.0068608), (2, 0.0137216), (4, 0.0274432)]:
        assert counts[rank] == math.floor(0.5 / per_iteration)


def test_staleness_bound_holds_fast_workers_back() -> None:
    cfg = load_config("microcloud-hetero", ["train.max_time=0.5"])
    _, counts = _run_counting(cfg, ako.Options(staleness=2))
    assert min(counts.values()) > 5
    # Iteration t completes only once every peer delivered a partition of its t - 2.
    assert max(counts.values()) - min(counts.values()) <= 3


def test_a_silent_peer_stops_no_one() -> None:
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.1, "count": 3}],
        strategy="ako",
        train={"max_time": 0.3},
        engine={"recv_timeout": 0.05},
    )
    result, counts = _run_counting(cfg, ako.Options(staleness=1), die=frozenset({1}))
    assert counts[1] == 0 and counts[0] > 20 and counts[2] > 20
    lost = {(e["rank"], e["peer"]) for e in result.events if e["event"] == "peer_lost"}
    assert lost == {(0, 1), (2, 1)}


def test_ako_reaches_the_target_on_homogeneous() -> None:
    cfg = load_config("homogeneous", ["strategy.name=ako", "train.max_time=30"])
    assert run_sim(cfg, progress=False).summary["tta_s"] is not None
