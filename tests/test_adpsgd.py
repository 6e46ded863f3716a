"""AD-PSGD rules (PAPERS.md section 1 baselines): atomic pairwise averaging, no deadlock."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dlion.context import WorkerContext
from dlion.core.config import ExperimentConfig, load_config
from dlion.engines.sim import RunResult, run_sim
from dlion.strategies import adpsgd
from helpers import registered, small_config

# ------------------------------------------------------------------------------ pure functions


def test_neighbour_graphs() -> None:
    ranks = list(range(6))
    assert adpsgd.neighbours(0, ranks, "all") == [1, 2, 3, 4, 5]
    assert adpsgd.neighbours(0, ranks, "ring") == [1, 5]
    assert adpsgd.neighbours(3, ranks, "ring") == [2, 4]
    assert adpsgd.neighbours(1, [0, 1, 2], "ring") == [0, 2]
    assert adpsgd.neighbours(1, [0, 1], "ring") == [0]


def test_bipartite_split_active_even_positions_talk_to_passive_odd_ones() -> None:
    ranks = list(range(6))
    assert adpsgd.bipartite_targets(0, ranks, adpsgd.neighbours(0, ranks, "all")) == [1, 3, 5]
    assert adpsgd.bipartite_targets(4, ranks, adpsgd.neighbours(4, ranks, "ring")) == [3, 5]
    assert adpsgd.bipartite_targets(1, ranks, adpsgd.neighbours(1, ranks, "all")) == []
    # Odd ring: the wrap-around edge joins two active workers and is not used.
    assert adpsgd.bipartite_targets(0, [0, 1, 2], [1, 2]) == [1]


def test_pairwise_average_is_the_mean_and_symmetric_to_the_bit() -> None:
    a = torch.tensor([1.0, -3.0, 0.1])
    b = torch.tensor([3.0, 1.0, 0.7])
    assert torch.allclose(adpsgd.pairwise_average(a, b), torch.tensor([2.0, -1.0, 0.4]))
    assert torch.equal(adpsgd.pairwise_average(a, b), adpsgd.pairwise_average(b, a))


def test_busy_worker_queues_higher_ranks_and_declines_lower_ones() -> None:
    assert adpsgd.serve_now(2, 0, initiating=False) is True
    assert adpsgd.serve_now(2, 5, initiating=False) is True
    assert adpsgd.serve_now(2, 5, initiating=True) is None  # waits for our own averaging
    assert adpsgd.serve_now(2, 0, initiating=True) is False  # declined: no wait cycles


# ------------------------------------------------------------------------------ helpers


def _gossip_only(
    cfg: ExperimentConfig, options: adpsgd.Options, start: dict[int, float]
) -> tuple[RunResult, dict[int, int]]:
    """Run AD-PSGD with gradient steps switched off (lr 0) from constant models x_r = start[r],
    so only averaging changes them. Returns the result and each rank's iteration count."""
    counts: dict[int, int] = {}

    async def gossip(ctx: WorkerContext, _: Any) -> None:
        ctx.replica.lr = 0.0
        ctx.replica.set_params(torch.full((ctx.replica.numel,), start[ctx.rank]))
        try:
            await adpsgd.worker(ctx, options)
        finally:
            counts[ctx.rank] = ctx.iteration

    with registered("t-gossip", gossip):
        result = run_sim(cfg, progress=False)
    return result, counts


HETERO = [
    {"site": "a", "capacity_gflops": 0.02},
    {"site": "a", "capacity_gflops": 0.05},
    {"site": "b", "capacity_gflops": 0.01},
    {"site": "b", "capacity_gflops": 0.03},
    {"site": "c", "capacity_gflops": 0.004},
    {"site": "c", "capacity_gflops": 0.02},
]
SITES = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
LINKS = [
    {"sites": ["a", "b"], "bandwidth_mbps": 20, "latency_ms": 2},
    {"sites": ["b", "c"], "bandwidth_mbps": 5, "latency_ms": 3},
    {"sites": ["a", "c"], "bandwidth_mbps": 10, "latency_ms": 7},
]


# ------------------------------------------------------------------------------ in the sim


@pytest.mark.parametrize("pairing", ["bipartite", "any"])
def test_one_averaging_makes_both_models_exactly_their_average(pairing: str) -> None:
    workers = [{"site": "a", "capacity_gflops": 0.02, "count": 2}]
    cfg = small_config(workers=workers, strategy="t-gossip", train={"max_time": 0.3})
    result, counts = _gossip_only(cfg, adpsgd.Options(pairing=pairing), {0: 0.0, 1: 3.0})
    assert min(counts.values()) > 5
    for replica in result.replicas:
        assert torch.equal(replica.flat, torch.full((replica.numel,), 1.5))


@pytest.mark.parametrize(
    ("pairing", "topology"), [("bipartite", "all"), ("any", "all"), ("any", "ring")]
)
def test_concurrent_averaging_is_pairwise_and_atomic(pairing: str, topology: str) -> None:
    """Six unequal workers over unequal links average concurrently (requests cross, busy
    workers queue or decline). Pairwise atomic averaging conserves the sum of all models;
    a lost update, an average taken from a model that changed mid-flight, or a one-sided
    pull would not. The models must also have mixed (many averagings happened)."""
    start = {r: float(4 * r) for r in range(6)}
    cfg = small_config(
        workers=HETERO, sites=SITES, links=LINKS, strategy="t-gossip", train={"max_time": 1.0}
    )
    options = adpsgd.Options(pairing=pairing, topology=topology)
    result, counts = _gossip_only(cfg, options, start)
    assert min(counts.values()) >= 10
    models = torch.stack([r.flat for r in result.replicas])
    assert torch.allclose(models.sum(0), torch.full_like(models[0], sum(start.values())))
    assert float(models.max() - models.min()) < 0.05 * (max(start.values()) - min(start.values()))


def test_training_is_deterministic_per_seed() -> None:
    def run(seed: int) -> RunResult:
        cfg = small_config(
            workers=HETERO,
            sites=SITES,
            links=LINKS,
            strategy="adpsgd",
            options={"pairing": "any"},
            train={"max_time": 0.5, "seed": seed},
        )
        return run_sim(cfg, progress=False)

    a, b, c = run(0), run(0), run(1)
    evals = [[e for e in r.events if e["event"] == "eval"] for r in (a, b, c)]
    assert evals[0] == evals[1] != evals[2]
    for x, y in zip(a.replicas, b.replicas, strict=True):
        assert torch.equal(x.flat, y.flat)


def test_silent_neighbour_is_dropped_and_training_goes_on() -> None:
    counts: dict[int, int] = {}

    async def one_dead(ctx: WorkerContext, _: Any) -> None:
        try:
            if ctx.rank != 1:  # rank 1, the only passive worker, crashed at the start
                await adpsgd.worker(ctx, adpsgd.Options(timeout_s=0.25))
        finally:
            counts[ctx.rank] = ctx.iteration

    workers = [{"site": "a", "capacity_gflops": 0.02, "count": 3}]
    with registered("t-dead", one_dead):
        cfg = small_config(workers=workers, strategy="t-dead", train={"max_time": 1.0})
        result = run_sim(cfg, progress=False)
    drops = [e for e in result.events if e["event"] == "adpsgd_drop"]
    assert sorted((e["rank"], e["peer"]) for e in drops) == [(0, 1), (2, 1)]
    assert all(e["t"] == pytest.approx(0.25, abs=0.01) for e in drops)
    assert counts[1] == 0 and counts[0] > 20 and counts[2] > 20


@pytest.mark.parametrize("pairing", ["bipartite", "any"])
def test_reaches_the_target_on_homogeneous(pairing: str) -> None:
    cfg = load_config(
        "homogeneous",
        ["strategy.name=adpsgd", f"strategy.options.pairing={pairing}", "train.max_time=30"],
    )
    assert run_sim(cfg, progress=False).summary["tta_s"] is not None
