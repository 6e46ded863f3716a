"""Fixed per-step costs: the equal-step-time split (strategies/wdb.py), the sim charging the
overhead, and DLion's WDB balancing real step times under it."""

from __future__ import annotations

from typing import Any

import pytest

from dlion.cluster.topology import Cluster
from dlion.cluster.vector_cost import shipped_model
from dlion.context import WorkerContext
from dlion.data import load_dataset
from dlion.engines.sim import run_sim
from dlion.strategies.dlion import wdb_batch_sizes
from dlion.strategies.wdb import (
    StepCostMeter,
    costs_drifted,
    equal_time_batches,
    step_time,
)
from dlion.training.models import build_model, train_flops_per_sample
from helpers import registered, small_config


def test_equal_time_split_hand_computed() -> None:
    # a = (10 ms, 0), s = (1000, 2000) samples/s, G = 100:
    # T = (100 + 1000 * 0.01) / 3000 = 0.036667; b = (1000 * 0.026667, 2000 * 0.036667)
    # = (26.67, 73.33) -> (27, 73). Both steps then take about 36.7 ms.
    assert equal_time_batches(100, [1000, 2000], [0.01, 0.0]) == [27, 73]
    times = [step_time(27, 1000, 0.01), step_time(73, 2000, 0.0)]
    assert times[0] == pytest.approx(times[1], abs=0.001)
    # Speed-proportional WDB from the speeds a batch of 50 shows (50 / 60 ms = 833 vs 2000)
    # gives the slow worker more: 29 vs 71, so its step is 39 ms against 35.5 ms.
    assert wdb_batch_sizes(100, [50 / 0.06, 2000]) == [29, 71]


def test_equal_time_split_without_overheads_is_proportional() -> None:
    # T = 12 / 4 = 3 s: b = (9, 3).
    assert equal_time_batches(12, [3, 1], [0, 0]) == [9, 3]
    # Equal overheads cancel: T = (30 + 3 * 0.5) / 3 = 10.5; b = 10 each.
    assert equal_time_batches(30, [1, 1, 1], [0.5, 0.5, 0.5]) == [10, 10, 10]


def test_an_overhead_longer_than_the_common_time_gets_the_smallest_batch() -> None:
    # a = (0.1, 0), s = (1000, 1000), G = 50: unclamped T = (50 + 100) / 2000 = 0.075 < a_0,
    # so b_0 = b_min = 2 and the other takes 48 (T = 0.048 for it, 0.102 for worker 0).
    assert equal_time_batches(50, [1000, 1000], [0.1, 0.0], b_min=2) == [2, 48]
    # b_max binds the other way: the fast worker is capped and the rest is shared.
    # a = 0, s = (100, 1, 1), G = 30, b_max = 20: 20 + (5, 5).
    assert equal_time_batches(30, [100, 1, 1], [0, 0, 0], b_max=20) == [20, 5, 5]


def test_equal_time_split_rounds_keeping_the_sum_and_rejects_bad_input() -> None:
    # Reals (2.33, 2.33, 2.33) for G = 7: one extra sample to the lowest index.
    assert equal_time_batches(7, [1, 1, 1], [0, 0, 0]) == [3, 2, 2]
    with pytest.raises(ValueError, match="cannot split"):
        equal_time_batches(10, [1, 1, 1], [0, 0, 0], b_min=4)
    with pytest.raises(ValueError, match="overheads"):
        equal_time_batches(10, [1, 1], [0.0])
    with pytest.raises(ValueError, match="speeds"):
        equal_time_batches(10, [1, 0], [0.0, 0.0])


def _flops_per_sample() -> int:
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, hidden=[32])
    return train_flops_per_sample(model, ds.input_shape)


def test_the_sim_charges_the_step_overhead_before_the_flops() -> None:
    seen: list[float] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        start = ctx.now()
        await ctx.compute(10)
        seen.append(ctx.now() - start)
        assert ctx.step_overhead == pytest.approx(0.004 if ctx.rank == 0 else 0.0)

    workers = [
        {"site": "a", "capacity_gflops": 0.5, "step_overhead_ms": 4.0},
        {"site": "a", "capacity_gflops": 0.5},
    ]
    with registered("t-overhead", worker):
        run_sim(small_config(workers=workers, strategy="t-overhead"), progress=False)
    work = _flops_per_sample() * 10 / 0.5e9
    assert sorted(seen) == pytest.approx(sorted([0.004 + work, work]), rel=1e-12)


def test_zero_overhead_leaves_compute_time_bit_identical() -> None:
    cfg = small_config(workers=[{"site": "a", "capacity_gflops": 0.7, "count": 2}])
    cluster = Cluster.from_config(cfg.cluster)
    assert cluster.compute_time(0, 12345.0) == 12345.0 / 0.7e9


def test_dlion_wdb_equalises_step_times_under_fixed_overheads() -> None:
    """Two workers, equal per-sample speed; worker 0 pays 20 ms more per step. WDB gives it a
    smaller batch, so that both steps take as long (the proportional split would not)."""
    flops = _flops_per_sample()
    workers = [
        {"site": "a", "capacity_gflops": 0.01, "step_overhead_ms": 20.0},
        {"site": "a", "capacity_gflops": 0.01, "step_overhead_ms": 0.001},
    ]
    # The configured overheads alone (the measured vector work has its own test below).
    options = {"dkt": False, "pge": False, "wdb_vector_work": False}
    cfg = small_config(workers=workers, options=options, train={"max_time": 1.0})
    result = run_sim(cfg, progress=False)
    wdb = [e for e in result.events if e["event"] == "wdb"]
    assert wdb, "DLion never re-balanced its batches"
    batches = wdb[-1]["batches"]
    assert sum(batches) == 32 and batches[0] < batches[1]
    speed = 0.01e9 / flops  # samples/s of the per-sample work
    expected = equal_time_batches(32, [speed, speed], [0.020, 0.000001])
    assert batches == expected
    t0, t1 = (step_time(b, speed, a) for b, a in zip(batches, [0.020, 0.000001], strict=True))
    # Equal within one sample's time.
    assert abs(t0 - t1) <= 1.0 / speed + 1e-9


def test_step_cost_meter_is_the_overhead_plus_an_ema_of_the_step_vector_seconds() -> None:
    meter = StepCostMeter(overhead=0.001, weight=0.5)
    # First iteration paid 4 ms: a = 1 + 4 ms.
    assert meter.observe(0.004) == pytest.approx(0.005, rel=1e-12)
    # Second paid 6 ms: EMA 0.5 x 6 + 0.5 x 4 = 5 ms, a = 6 ms.
    assert meter.observe(0.006) == pytest.approx(0.006, rel=1e-12)


def test_costs_drift_when_first_known_or_moved_by_more_than_the_threshold() -> None:
    assert costs_drifted({0: 0.0, 1: 0.0}, None, 0.2)
    assert costs_drifted({0: 0.001, 1: 0.0}, {0: 0.0, 1: 0.0}, 0.2)  # first measured
    assert not costs_drifted({0: 0.0011, 1: 0.0}, {0: 0.001, 1: 0.0}, 0.2)  # 10%
    assert costs_drifted({0: 0.0013, 1: 0.0}, {0: 0.001, 1: 0.0}, 0.2)  # 30%
    assert costs_drifted({0: 0.001}, {0: 0.001, 1: 0.0}, 0.2)  # the pool changed


def test_dlion_wdb_counts_each_workers_measured_vector_work() -> None:
    """Two workers in one site, 1.0 and 0.25 GFLOP/s, no configured overhead. Per iteration
    each pays, at its speed ratio k (vector_cost.py), one weighting axpy (the leader, rank
    0, adds the remote sum in the same block: 2 calls), the sum of its shard of the
    all-reduce (2 parts) and one SGD step over all parameters. WDB then splits the 32
    samples for equal step times with those seconds as the fixed costs."""
    flops = _flops_per_sample()
    workers = [
        {"site": "a", "capacity_gflops": 1.0},
        {"site": "a", "capacity_gflops": 0.25},
    ]
    cfg = small_config(workers=workers, options={"pge": False}, train={"max_time": 0.3})
    result = run_sim(cfg, progress=False)
    numel = next(e for e in result.events if e["event"] == "start")["parameters"]
    model = shipped_model()
    shard = numel - numel // 2  # tensor_split: the first shard takes the odd element

    def cost(capacity: float, axpy_ops: int, shard_numel: int) -> float:
        k = model.speed_ratio(0.0, capacity, flops, 16)
        host = (
            model.host_seconds("axpy", numel, axpy_ops)
            + model.host_seconds("sum", 2 * shard_numel)
            + model.host_seconds("sgd", numel)
        )
        return k * host

    expected_costs = [cost(1e9, 2, shard), cost(0.25e9, 1, numel // 2)]
    wdb = [e for e in result.events if e["event"] == "wdb"]
    measured = [e for e in wdb if e["costs"][0] > 0 and e["costs"][1] > 0]
    assert measured, "the measured vector work never reached WDB"
    assert measured[0]["iteration"] == 1  # re-balanced as soon as it was known
    assert measured[-1]["costs"] == pytest.approx(expected_costs, rel=1e-9)
    speeds = [1e9 / flops, 0.25e9 / flops]
    assert measured[-1]["batches"] == equal_time_batches(32, speeds, expected_costs)
    # The slow worker's vector work is 4x the fast one's (1 axpy call fewer): it gets
    # fewer samples than the split by speed alone gives it.
    assert measured[-1]["batches"][1] < wdb_batch_sizes(32, speeds)[1]
