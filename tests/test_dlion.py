"""DLion as published (`dlion-hpdc21`, PAPERS.md section 1): WDB, PGE conservation and budgets,
DKT, replicas. The default `dlion` (site hierarchy) is pinned in test_dlion_sites.py."""

from __future__ import annotations

import math

import pytest
import torch

from dlion.comm.messages import INDEX_BYTES, VALUE_BYTES, Dense, Sparse
from dlion.core.config import load_config
from dlion.engines.sim import run_sim
from dlion.strategies.dlion_hpdc21 import (
    LinkResidual,
    dkt_merge,
    dkt_plan,
    link_budget_entries,
    wdb_batch_sizes,
)
from helpers import FREE_VECTORS, small_config

# ------------------------------------------------------------------------------ WDB


@pytest.mark.parametrize(
    ("G", "speeds", "expected"),
    [
        (192, [4, 4, 2, 2, 1, 1], [55, 55, 27, 27, 14, 14]),
        (100, [1, 1, 1, 1], [25, 25, 25, 25]),
        (10, [3, 1], [8, 2]),  # 7.5 rounds to 8, 2.5 rounds (banker's) to 2: sum 10
        (7, [1, 1, 1], [3, 2, 2]),  # remainder goes to the fastest (ties: lowest rank)
        (12, [1, 1, 100], [1, 1, 10]),  # b_min clamps the slow ones, taken from the fastest
    ],
)
def test_wdb_batches_are_proportional_and_sum_to_global_batch(
    G: int, speeds: list[float], expected: list[int]
) -> None:
    sizes = wdb_batch_sizes(G, speeds, b_min=1)
    assert sizes == expected
    assert sum(sizes) == G


def test_wdb_respects_b_max_and_rejects_impossible_bounds() -> None:
    sizes = wdb_batch_sizes(40, [10, 1, 1, 1], b_min=2, b_max=16)
    assert sum(sizes) == 40 and max(sizes) <= 16 and min(sizes) >= 2
    with pytest.raises(ValueError, match="cannot split"):
        wdb_batch_sizes(10, [1, 1, 1], b_min=4)


def test_wdb_in_sim_balances_batches_to_measured_speed() -> None:
    cfg = load_config(
        "microcloud-hetero",
        ["train.max_time=0.3", "strategy.name=dlion-hpdc21", "strategy.options.dkt=false"],
    )
    result = run_sim(cfg, progress=False)
    wdb = [e for e in result.events if e["event"] == "wdb"]
    assert wdb, "DLion never re-balanced its batches"
    batches = wdb[0]["batches"]
    assert sum(batches) == 192
    assert batches == wdb_batch_sizes(192, [4, 4, 2, 2, 1, 1])
    # Measured speeds (samples/s) are in the configured capacity ratio 4:4:2:2:1:1.
    speeds = wdb[0]["speeds"]
    assert [s / speeds[-1] for s in speeds] == pytest.approx([4, 4, 2, 2, 1, 1], rel=1e-9)


# ------------------------------------------------------------------------------ PGE


def test_pge_conserves_every_gradient_entry() -> None:
    """For a link: sum over iterations of what was sent + the final residual equals the sum
    of the weighted gradients (error feedback loses nothing)."""
    gen = torch.Generator().manual_seed(0)
    numel = 1000
    link = LinkResidual(numel)
    total_grad = torch.zeros(numel)
    total_sent = torch.zeros(numel)
    for it in range(50):
        g = torch.randn(numel, generator=gen) * (1 + it % 3)
        k = [0, 5, 40, 300, 600][it % 5]  # includes "nothing fits" and "send dense"
        payload = link.step(g, k)
        total_grad += g
        total_sent += payload.to_dense(numel)
    assert torch.allclose(total_sent + link.residual, total_grad, atol=1e-4)


def test_pge_sends_the_largest_entries_and_keeps_the_rest() -> None:
    link = LinkResidual(6)
    payload = link.step(torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0]), k=2)
    assert isinstance(payload, Sparse)
    assert sorted(payload.indices.tolist()) == [1, 3]
    assert torch.equal(link.residual, torch.tensor([0.1, 0.0, 0.2, 0.0, -0.3, 0.0]))
    # Next iteration the residual competes with the new gradient.
    payload = link.step(torch.tensor([0.0, 0.0, 0.0, 0.0, -0.3, 0.0]), k=1)
    assert payload.indices.tolist() == [4]  # type: ignore[union-attr]
    assert payload.values.tolist() == pytest.approx([-0.6])  # type: ignore[union-attr]


def test_pge_goes_dense_when_top_k_would_cover_half() -> None:
    link = LinkResidual(10)
    payload = link.step(torch.ones(10), k=5, dense_fraction=0.5)
    assert isinstance(payload, Dense)
    assert torch.equal(link.residual, torch.zeros(10))


def test_top_k_fits_the_link_budget() -> None:
    for bw, lat, budget, header in [(875_000, 0.008, 0.012, 64), (1e8, 1e-4, 0.01, 64)]:
        k = link_budget_entries(bw, lat, budget, header)
        fits = bw * (budget - lat)
        assert k * (INDEX_BYTES + VALUE_BYTES) + header <= fits
        assert (k + 1) * (INDEX_BYTES + VALUE_BYTES) + header > fits
    assert link_budget_entries(1e6, 0.02, 0.01) == 0  # latency alone exceeds the budget
    # ... unless the link keeps a minimum share of the budget, so it never starves.
    assert link_budget_entries(1e6, 0.02, 0.01, 0, min_fraction=0.25) == int(1e6 * 0.0025 // 8)
    assert link_budget_entries(1e6, 0.001, 0.01, 0, min_fraction=0.25) == int(1e6 * 0.009 // 8)


def test_pge_messages_fit_the_link_time_budget_in_sim() -> None:
    """On an idle link each iteration's sparse message crosses within rho x compute time."""
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.05}, {"site": "b", "capacity_gflops": 0.05}],
        sites=[{"name": "a"}, {"name": "b"}],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 2.0, "latency_ms": 3.0}],
        strategy="dlion-hpdc21",
        options={"dkt": False, "wdb": False},
        train={"max_time": 1.0},
        engine=FREE_VECTORS,
    )
    result = run_sim(cfg, progress=False)
    flops = result.events[0]["flops_per_sample"]
    compute = flops * 16 / 0.05e9
    iters = result.summary["iterations"]
    # BSP: an iteration is compute + the exchange, which PGE keeps within rho * compute.
    assert iters >= math.floor(1.0 / (2 * compute + 1e-3)) - 1
    # And the messages really are sparse: far fewer bytes than dense exchange would need.
    dense_bytes = iters * 2 * (result.replicas[0].numel * 4 + 64)
    assert result.summary["bytes_sent"] < 0.5 * dense_bytes


# ------------------------------------------------------------------------------ DKT


def test_dkt_merge_arithmetic() -> None:
    own = torch.tensor([1.0, 2.0, 3.0])
    best = torch.tensor([3.0, 2.0, -1.0])
    assert torch.equal(dkt_merge(own, best, 0.5), torch.tensor([2.0, 2.0, 1.0]))
    assert torch.allclose(dkt_merge(own, best, 0.25), torch.tensor([1.5, 2.0, 2.0]))
    assert torch.equal(dkt_merge(own, best, 1.0), best)


def test_dkt_plan_picks_lowest_loss_and_worse_receivers() -> None:
    assert dkt_plan({0: 0.5, 1: 0.2, 2: 0.9}, margin=0.0) == (1, [0, 2])
    assert dkt_plan({0: 0.5, 1: 0.2, 2: 0.25}, margin=0.1) == (1, [0])
    assert dkt_plan({0: 0.3, 1: 0.3}, margin=0.0) == (0, [])  # tie: lower rank, nobody worse


def test_dkt_transfers_happen_and_are_charged_to_the_network() -> None:
    base = ["train.max_time=1.5", "strategy.name=dlion-hpdc21", "strategy.options.wdb=false"]
    on = run_sim(
        load_config("microcloud-hetero", [*base, "strategy.options.dkt_every=5"]), progress=False
    )
    off = run_sim(
        load_config("microcloud-hetero", [*base, "strategy.options.dkt=false"]), progress=False
    )
    dkt = [e for e in on.events if e["event"] == "dkt"]
    assert dkt and all(e["receivers"] for e in dkt)
    assert not [e for e in off.events if e["event"] == "dkt"]
    per_iter_on = on.summary["bytes_sent"] / on.summary["iterations"]
    per_iter_off = off.summary["bytes_sent"] / off.summary["iterations"]
    assert per_iter_on > per_iter_off


# ------------------------------------------------------------------------------ replicas


def test_homogeneous_dense_run_keeps_replicas_identical() -> None:
    cfg = load_config(
        "homogeneous",
        ["train.max_time=0.5", "strategy.options.pge=false", "strategy.options.dkt=false"],
    )
    result = run_sim(cfg, progress=False)
    assert result.summary["iterations"] > 5
    first = result.replicas[0].flat
    for replica in result.replicas[1:]:
        assert torch.equal(replica.flat, first)


def test_allreduce_keeps_replicas_identical_on_heterogeneous_cluster() -> None:
    cfg = load_config("microcloud-hetero", ["train.max_time=1.0", "strategy.name=allreduce"])
    result = run_sim(cfg, progress=False)
    assert result.summary["iterations"] > 2
    for replica in result.replicas[1:]:
        assert torch.equal(replica.flat, result.replicas[0].flat)


def test_sparse_exchange_lets_replicas_drift_and_dkt_pulls_them_back() -> None:
    base = ["train.max_time=1.5", "strategy.name=dlion-hpdc21", "strategy.options.wdb=false"]
    no_dkt = run_sim(
        load_config("microcloud-hetero", [*base, "strategy.options.dkt=false"]), progress=False
    )
    dkt = run_sim(
        load_config("microcloud-hetero", [*base, "strategy.options.dkt_every=5"]), progress=False
    )

    def spread(replicas: list) -> float:
        mean = torch.stack([r.flat for r in replicas]).mean(0)
        return max(float((r.flat - mean).norm()) for r in replicas)

    assert spread(no_dkt.replicas) > 0  # sparse exchange: replicas differ
    assert spread(dkt.replicas) < spread(no_dkt.replicas)


# ------------------------------------------------------------------------------ end to end


def test_same_config_and_seed_give_identical_metrics() -> None:
    cfg = load_config("microcloud-hetero", ["train.max_time=1.0", "strategy.name=dlion-hpdc21"])
    a = run_sim(cfg, progress=False)
    b = run_sim(cfg, progress=False)
    evals_a = [e for e in a.events if e["event"] in ("eval", "wdb", "dkt")]
    evals_b = [e for e in b.events if e["event"] in ("eval", "wdb", "dkt")]
    assert evals_a == evals_b
    c = run_sim(
        load_config(
            "microcloud-hetero",
            ["train.max_time=1.0", "train.seed=1", "strategy.name=dlion-hpdc21"],
        ),
        progress=False,
    )
    assert [e for e in c.events if e["event"] == "eval"] != [
        e for e in a.events if e["event"] == "eval"
    ]


def test_dlion_beats_allreduce_on_microcloud_hetero() -> None:
    """The headline behaviour, small: DLion reaches the target sooner in simulated time."""
    tta = {}
    for name in ("allreduce", "dlion", "dlion-hpdc21"):
        cfg = load_config("microcloud-hetero", [f"strategy.name={name}", "train.max_time=30"])
        tta[name] = run_sim(cfg, progress=False).summary["tta_s"]
    assert tta["dlion"] is not None and tta["allreduce"] is not None
    assert tta["dlion-hpdc21"] is not None
    # With vector work charged (issue 16 part 4) the paper's DLion pays five top-k
    # selections per iteration and falls from 2x to about 1.98x ahead (9.0 s against
    # 17.8 s): it must still beat all-reduce; the site-aware default keeps the 2x.
    assert tta["dlion"] * 2 <= tta["allreduce"] and tta["dlion-hpdc21"] < tta["allreduce"]
