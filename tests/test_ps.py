"""Parameter server rules (PAPERS.md section 1 baselines): BSP sums every round, ASP never waits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dlion.core.config import ExperimentConfig, load_config
from dlion.engines.sim import run_sim
from dlion.strategies import ps
from dlion.training.experiment import make_replica, prepare
from helpers import FREE_VECTORS, run_counting, small_config

# ------------------------------------------------------------------------------ pure functions


def test_bsp_aggregate_weights_each_gradient_by_its_share_of_the_batch() -> None:
    grads = {
        1: (torch.tensor([3.0, -2.0]), 48),
        0: (torch.tensor([1.0, 2.0]), 16),
    }
    # 16/64 * [1, 2] + 48/64 * [3, -2]
    assert torch.equal(ps.bsp_aggregate(grads), torch.tensor([2.5, -1.0]))
    # A dropped worker: the rest are re-weighted over the samples that arrived.
    assert torch.equal(ps.bsp_aggregate({0: grads[0]}), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one"):
        ps.bsp_aggregate({})


def test_asp_weight_is_the_linear_scaling_share() -> None:
    assert ps.asp_weight(32, 192) == pytest.approx(1 / 6)
    assert ps.asp_weight(32, 192, lr_scale=3.0) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ helpers


def _three_workers(strategy: str, **kw: Any) -> ExperimentConfig:
    workers = [
        {"site": "a", "capacity_gflops": 0.02},
        {"site": "a", "capacity_gflops": 0.05},
        {"site": "a", "capacity_gflops": 0.01},
    ]
    return small_config(workers=workers, strategy=strategy, **kw)


# ------------------------------------------------------------------------------ BSP


def test_bsp_first_round_is_exactly_the_weighted_sum_of_all_gradients() -> None:
    cfg = _three_workers("ps-bsp", train={"max_iterations": 1})
    result = run_sim(cfg, progress=False)
    # By hand: every worker's first gradient on the common initial model, equal batches.
    prep = prepare(cfg, 3)
    server = make_replica(cfg, prep, 0)
    total = torch.zeros(server.numel)
    for rank in range(3):
        grad, _ = make_replica(cfg, prep, rank).gradient(16)
        total += grad * (16 / 48)
    server.apply(total)
    for replica in result.replicas:
        assert torch.allclose(replica.flat, server.flat, atol=1e-7, rtol=0)


@pytest.mark.parametrize(("rounds", "server_rank"), [(1, 0), (4, 0), (7, 2)])
def test_bsp_replicas_equal_the_server_model_after_every_round(
    rounds: int, server_rank: int
) -> None:
    cfg = _three_workers(
        "ps-bsp", train={"max_iterations": rounds}, options={"server_rank": server_rank}
    )
    result = run_sim(cfg, progress=False)
    server = result.replicas[server_rank].flat
    assert not torch.equal(server, make_replica(cfg, prepare(cfg, 3), 0).flat)  # it trained
    for replica in result.replicas:
        assert torch.equal(replica.flat, server)


def test_bsp_computes_the_same_model_as_synchronous_allreduce() -> None:
    """Both apply sum_i (b_i / G) g_i with the same momentum: only the summation order differs."""
    bsp = run_sim(_three_workers("ps-bsp", train={"max_iterations": 6}), progress=False)
    ar = run_sim(_three_workers("allreduce", train={"max_iterations": 6}), progress=False)
    assert torch.allclose(bsp.replicas[0].flat, ar.replicas[0].flat, atol=1e-5, rtol=0)


def test_bsp_waits_for_the_slowest_worker() -> None:
    workers = [{"site": "a", "capacity_gflops": 0.1}, {"site": "a", "capacity_gflops": 0.01}]
    cfg = small_config(workers=workers, strategy="t-ps", train={"max_time": 2.0})
    _, counts = run_counting(cfg, ps.bsp_worker, ps.Options())
    assert counts[0] > 20
    assert abs(counts[0] - counts[1]) <= 1


def test_bsp_drops_a_silent_worker_and_goes_on() -> None:
    cfg = _three_workers("t-ps", train={"max_time": 2.0})
    options = ps.Options(timeout_s=0.5)
    result, counts = run_counting(cfg, ps.bsp_worker, options, die=frozenset({2}))
    drops = [e for e in result.events if e["event"] == "ps_drop"]
    assert [(e["rank"], e["worker"]) for e in drops] == [(0, 2)]
    assert drops[0]["t"] == pytest.approx(0.5)
    assert counts[2] == 0 and counts[0] > 10 and abs(counts[0] - counts[1]) <= 1


def test_bsp_tells_a_dropped_straggler_so_it_stops_waiting() -> None:
    workers = [
        {"site": "a", "capacity_gflops": 0.1, "count": 2},
        {"site": "a", "capacity_gflops": 0.0002},  # its first gradient takes 0.81 s
    ]
    cfg = small_config(workers=workers, strategy="t-ps", train={"max_time": 1.0})
    result, counts = run_counting(cfg, ps.bsp_worker, ps.Options(timeout_s=0.3))
    events = {(e["event"], e.get("rank")) for e in result.events}
    assert ("ps_drop", 0) in events and ("ps_dropped", 2) in events
    assert counts[2] == 0 and counts[0] > 10


# ------------------------------------------------------------------------------ ASP


@pytest.mark.parametrize("server_rank", [0, 1])
def test_asp_fast_worker_never_waits_for_the_slow_one(server_rank: int) -> None:
    """Capacities 1:10 (rank 0 slow): the fast worker does about 10x the iterations,
    whichever node holds the server role."""
    workers = [{"site": "a", "capacity_gflops": 0.002}, {"site": "a", "capacity_gflops": 0.02}]
    cfg = small_config(
        workers=workers, strategy="t-ps", train={"max_time": 2.0}, engine=FREE_VECTORS
    )
    _, counts = run_counting(cfg, ps.asp_worker, ps.AspOptions(server_rank=server_rank))
    assert counts[0] >= 20
    assert 8.0 <= counts[1] / counts[0] <= 10.5


@pytest.mark.parametrize("lr_scale", [1.0, 2.0])
def test_asp_server_applies_each_gradient_on_arrival_with_weight_b_over_g(
    lr_scale: float,
) -> None:
    """One remote worker and a server node too slow to finish a gradient: the model is
    exactly the sequence x <- SGD step(x, lr_scale * b / G * g(x)) on the worker's batches,
    and the worker holds the server's latest model after each iteration."""
    workers = [{"site": "a", "capacity_gflops": 1e-6}, {"site": "a", "capacity_gflops": 0.02}]
    cfg = small_config(
        workers=workers, strategy="t-ps", train={"max_time": 0.5}, engine=FREE_VECTORS
    )
    result, counts = run_counting(cfg, ps.asp_worker, ps.AspOptions(lr_scale=lr_scale))
    assert counts[0] == 0 and counts[1] > 10
    prep = prepare(cfg, 2)
    by_hand = make_replica(cfg, prep, 1)  # the worker's shard and batch order
    by_hand.set_params(make_replica(cfg, prep, 0).flat)  # the server's model and momentum
    for _ in range(counts[1]):
        grad, _ = by_hand.gradient(16)
        by_hand.apply(grad * (lr_scale * 16 / 32))
    assert torch.equal(result.replicas[1].flat, by_hand.flat)


def test_asp_drops_a_silent_worker_without_hanging() -> None:
    cfg = _three_workers("t-ps", train={"max_time": 2.0})
    options = ps.AspOptions(timeout_s=0.5)
    result, counts = run_counting(cfg, ps.asp_worker, options, die=frozenset({1}))
    drops = [e for e in result.events if e["event"] == "ps_drop"]
    assert [(e["rank"], e["worker"]) for e in drops] == [(0, 1)]
    assert counts[1] == 0 and counts[0] > 10 and counts[2] > 10


def test_server_rank_must_exist() -> None:
    cfg = small_config(strategy="ps-bsp", options={"server_rank": 5})
    with pytest.raises(ValueError, match="server_rank"):
        run_sim(cfg, progress=False)


def test_asp_is_deterministic_per_seed() -> None:
    def evals(seed: int) -> list[dict[str, Any]]:
        cfg = _three_workers("ps-asp", train={"max_time": 0.5, "seed": seed})
        return [e for e in run_sim(cfg, progress=False).events if e["event"] == "eval"]

    assert evals(0) == evals(0)
    assert evals(0) != evals(1)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", ["ps-bsp", "ps-asp"])
def test_reaches_the_target_on_homogeneous(name: str) -> None:
    cfg = load_config("homogeneous", [f"strategy.name={name}", "train.max_time=30"])
    assert run_sim(cfg, progress=False).summary["tta_s"] is not None
