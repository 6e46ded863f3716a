"""Shared site links: one pipe per direction between two sites, shared max-min fairly by
every flow between them; site uplinks/downlinks; per-pair entries stay per pair. Exact
virtual times, computed by hand (1 MB/s = 8 Mbit/s; messages of 100,064 B)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from dlion.cluster.topology import MBPS, Cluster
from dlion.comm.messages import Dense
from dlion.context import WorkerContext
from dlion.core.config import DynamicsConfig, ExperimentConfig
from dlion.engines.network import all_to_all_rates, max_min_rates
from dlion.engines.sim import run_sim
from helpers import registered, small_config

HEADER = 64
NBYTES = 100_064  # 25,000 floats + the header
MB = 1e6  # bytes/s of an 8 Mbit/s pipe

# ----------------------------------------------------------------------------- pure sharing


def test_max_min_rates_share_a_resource_equally() -> None:
    assert max_min_rates([["p"], ["p"]], {"p": 10.0}.__getitem__) == [5.0, 5.0]


def test_max_min_rates_give_the_leftover_to_the_unconstrained_flow() -> None:
    # Flow 1 is held to 2 by "nic"; flow 0 takes the pipe's other 8; flow 2 alone on "q".
    caps = {"pipe": 10.0, "nic": 2.0, "q": 3.0}
    assert max_min_rates([["pipe"], ["pipe", "nic"], ["q"]], caps.__getitem__) == [8.0, 2.0, 3.0]


def test_max_min_rates_of_a_flow_with_an_empty_path_is_zero() -> None:
    assert max_min_rates([[], ["p"]], {"p": 4.0}.__getitem__) == [0.0, 4.0]


# ----------------------------------------------------------------------------- the cluster


def _two_sites(
    per_site: int = 2,
    *,
    links: list[dict[str, Any]] | None = None,
    sites: list[dict[str, Any]] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    workers = [
        {"site": "a", "capacity_gflops": 1.0, "count": per_site},
        {"site": "b", "capacity_gflops": 1.0, "count": per_site},
        *(extra or []),
    ]
    return {
        "workers": workers,
        "sites": sites or [{"name": "a"}, {"name": "b"}],
        "links": links
        if links is not None
        else [{"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 0.0}],
    }


def test_a_site_entry_is_one_pipe_per_direction_for_every_pair_between_the_sites() -> None:
    cluster = Cluster.from_config(small_config(**_two_sites()).cluster)
    assert cluster.route(0, 2) == (("site", "a", "b"),)
    assert cluster.route(1, 3) == (("site", "a", "b"),)
    assert cluster.route(2, 0) == (("site", "b", "a"),)
    assert cluster.route(0, 1) == (("link", 0, 1),)  # inside a site: per pair
    assert cluster.link(0, 2).bandwidth == 8 * MBPS  # a lone flow gets the whole pipe
    assert cluster.is_shared(0, 3) and not cluster.is_shared(0, 1)


def test_uplink_and_downlink_join_the_route_and_cap_a_lone_flow() -> None:
    sites = [{"name": "a", "uplink_mbps": 4.0}, {"name": "b", "downlink_mbps": 2.0}]
    cluster = Cluster.from_config(small_config(**_two_sites(1, sites=sites)).cluster)
    assert cluster.route(0, 1) == (("site", "a", "b"), ("up", "a", ""), ("down", "b", ""))
    assert cluster.route(1, 0) == (("site", "b", "a"),)  # b has no uplink, a no downlink
    assert cluster.link(0, 1).bandwidth == 2 * MBPS
    assert cluster.bandwidth(1, 0) == 8 * MBPS


def test_sites_without_an_entry_share_a_default_pipe() -> None:
    cluster = Cluster.from_config(small_config(**_two_sites(links=[])).cluster)
    assert cluster.route(0, 2) == cluster.route(1, 3) == (("site", "a", "b"),)
    assert cluster.resource_capacity(("site", "a", "b")) == 100 * MBPS


def test_a_worker_pair_entry_keeps_its_own_link_between_sites() -> None:
    links = [
        {"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 1.0},
        {"workers": [0, 2], "bandwidth_mbps": 16.0, "latency_ms": 3.0},
    ]
    cluster = Cluster.from_config(small_config(**_two_sites(links=links)).cluster)
    assert cluster.route(0, 2) == (("link", 0, 2),) and cluster.route(2, 0) == (("link", 2, 0),)
    assert cluster.link(0, 2).bandwidth == 16 * MBPS and cluster.link(0, 2).latency == 0.003
    assert cluster.route(1, 3) == (("site", "a", "b"),)


def test_all_to_all_rates_split_each_pipe_over_every_pair_through_it() -> None:
    cluster = Cluster.from_config(small_config(**_two_sites()).cluster)
    rates = all_to_all_rates(cluster)
    assert rates[(0, 2)] == pytest.approx(MB / 4)  # 4 pairs a -> b
    assert rates[(3, 1)] == pytest.approx(MB / 4)
    assert rates[(0, 1)] == 1000 * MBPS  # intra-site links are per pair


# ----------------------------------------------------------------------------- timing


def _config(cluster: dict[str, Any], strategy: str) -> ExperimentConfig:
    """small_config with the cluster fields it has no keyword for (defaults) set too."""
    known = {k: cluster[k] for k in ("workers", "sites", "links")}
    raw = small_config(**known, strategy=strategy).model_dump()
    raw["cluster"].update({k: v for k, v in cluster.items() if k not in known})
    return ExperimentConfig.model_validate(raw)


def _send_all(cfg_cluster: dict[str, Any], sends: list[tuple[int, int]]) -> dict[Any, float]:
    """Each (src, dst) sends one NBYTES message at t = 0; returns when each left and, under
    ("seed", src, dst), the bandwidth the sender was told to expect."""
    done: dict[Any, float] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        for src, dst in sends:
            if src == ctx.rank:
                done[("seed", src, dst)] = ctx.bandwidth(dst)

        async def one(dst: int) -> None:
            await ctx.send(dst, "x", Dense(torch.zeros((NBYTES - HEADER) // 4)))
            done[(ctx.rank, dst)] = ctx.now()

        await asyncio.gather(*(one(d) for s, d in sends if s == ctx.rank))

    with registered("t-sites", worker):
        run_sim(_config(cfg_cluster, "t-sites"), progress=False)
    return done


def test_a_lone_flow_gets_the_whole_pipe() -> None:
    done = _send_all(_two_sites(), [(0, 2)])
    assert done[(0, 2)] == pytest.approx(NBYTES / MB, rel=1e-12)


def test_two_workers_of_a_site_sending_at_once_each_get_half_the_pipe() -> None:
    done = _send_all(_two_sites(), [(0, 2), (1, 3)])
    assert done[(0, 2)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)
    assert done[(1, 3)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)


def test_all_four_pairs_between_two_sites_each_get_a_quarter() -> None:
    sends = [(0, 2), (0, 3), (1, 2), (1, 3)]
    done = _send_all(_two_sites(), sends)
    for pair in sends:
        assert done[pair] == pytest.approx(4 * NBYTES / MB, rel=1e-12)
        # The strategy was told to expect the all-to-all share: a quarter of the pipe.
        assert done[("seed", *pair)] == pytest.approx(MB / 4, rel=1e-12)


def test_the_two_directions_are_separate_pipes() -> None:
    done = _send_all(_two_sites(), [(0, 2), (3, 1)])
    assert done[(0, 2)] == pytest.approx(NBYTES / MB, rel=1e-12)
    assert done[(3, 1)] == pytest.approx(NBYTES / MB, rel=1e-12)


def test_a_flow_held_back_elsewhere_leaves_the_pipe_to_the_other() -> None:
    """1 -> 3 is held to 0.2 MB/s by worker 1's 1.6 Mbit/s NIC, so 0 -> 2 gets 0.8 MB/s;
    once 0 -> 2 is done, 1 -> 3 stays at its NIC's 0.2 MB/s."""
    cfg = _two_sites(1, extra=[{"site": "a", "capacity_gflops": 1.0, "nic_mbps": 1.6}])
    cfg["workers"].append({"site": "b", "capacity_gflops": 1.0})  # ranks: a0, b1, a2, b3
    done = _send_all(cfg, [(0, 1), (2, 3)])
    assert done[(0, 1)] == pytest.approx(NBYTES / 0.8e6, rel=1e-9)
    assert done[(2, 3)] == pytest.approx(NBYTES / 0.2e6, rel=1e-9)


def test_a_site_uplink_is_shared_by_its_traffic_to_every_other_site() -> None:
    """Site a (uplink 8 Mbit/s) sends to b and c at once over 80 Mbit/s pipes: the uplink
    binds, half each. Ranks: a0, a1, b2, c3."""
    cfg = {
        "workers": [
            {"site": "a", "capacity_gflops": 1.0, "count": 2},
            {"site": "b", "capacity_gflops": 1.0},
            {"site": "c", "capacity_gflops": 1.0},
        ],
        "sites": [{"name": "a", "uplink_mbps": 8.0}, {"name": "b"}, {"name": "c"}],
        "links": [
            {"sites": ["a", "b"], "bandwidth_mbps": 80.0, "latency_ms": 0.0},
            {"sites": ["a", "c"], "bandwidth_mbps": 80.0, "latency_ms": 0.0},
        ],
    }
    done = _send_all(cfg, [(0, 2), (1, 3)])
    assert done[(0, 2)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)
    assert done[(1, 3)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)
    # Traffic inside site a does not touch the uplink.
    inside = _send_all(cfg, [(0, 1), (1, 3)])
    assert inside[(1, 3)] == pytest.approx(NBYTES / MB, rel=1e-12)


def test_a_site_downlink_is_shared_by_traffic_from_every_other_site() -> None:
    """b (downlink 8 Mbit/s) receives from a and c at once over 80 Mbit/s pipes."""
    cfg = {
        "workers": [
            {"site": "a", "capacity_gflops": 1.0},
            {"site": "b", "capacity_gflops": 1.0},
            {"site": "c", "capacity_gflops": 1.0},
        ],
        "sites": [{"name": "a"}, {"name": "b", "downlink_mbps": 8.0}, {"name": "c"}],
        "default_inter_bandwidth_mbps": 80.0,
        "default_inter_latency_ms": 0.0,
        "links": [],
    }
    done = _send_all(cfg, [(0, 1), (2, 1)])
    assert done[(0, 1)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)
    assert done[(2, 1)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)


def test_default_inter_site_bandwidth_is_a_shared_pipe_too() -> None:
    cfg = _two_sites(links=[])
    cfg["default_inter_bandwidth_mbps"] = 8.0
    cfg["default_inter_latency_ms"] = 0.0
    done = _send_all(cfg, [(0, 2), (1, 3)])
    assert done[(0, 2)] == pytest.approx(2 * NBYTES / MB, rel=1e-12)


def test_a_worker_pair_entry_does_not_share_the_site_pipe() -> None:
    links = [
        {"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 0.0},
        {"workers": [0, 2], "bandwidth_mbps": 8.0, "latency_ms": 0.0},
    ]
    done = _send_all(_two_sites(links=links), [(0, 2), (1, 3)])
    assert done[(0, 2)] == pytest.approx(NBYTES / MB, rel=1e-12)
    assert done[(1, 3)] == pytest.approx(NBYTES / MB, rel=1e-12)


def test_a_pipe_bandwidth_trace_rerates_every_flow_sharing_it() -> None:
    """Two flows share 1 MB/s (0.5 each) until t = 0.05, then 0.1 MB/s (0.05 each): by 0.05
    each moved 25,000 B; the other 75,064 B at 50 kB/s take 1.50128 s."""
    raw = _config(_two_sites(), "t-sites").model_dump()
    raw["dynamics"] = {"bandwidth": [{"sites": ["a", "b"], "points": [[0, 1.0], [0.05, 0.1]]}]}
    done: dict[tuple[int, int], float] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank in (0, 1):
            await ctx.send(ctx.rank + 2, "x", Dense(torch.zeros((NBYTES - HEADER) // 4)))
            done[(ctx.rank, ctx.rank + 2)] = ctx.now()

    with registered("t-sites", worker):
        run_sim(ExperimentConfig.model_validate(raw), progress=False)
    expected = 0.05 + (NBYTES - 25_000) / 50_000
    assert done[(0, 2)] == pytest.approx(expected, rel=1e-9)
    assert done[(1, 3)] == pytest.approx(expected, rel=1e-9)


def test_a_worker_pair_trace_on_a_piped_pair_caps_that_pair_alone() -> None:
    cluster = Cluster.from_config(small_config(**_two_sites()).cluster)
    dyn = DynamicsConfig.model_validate({"bandwidth": [{"workers": [0, 2], "points": [[0, 0.25]]}]})
    capped = cluster.with_dynamics(dyn, 10.0)
    assert capped.route(0, 2) == (("site", "a", "b"), ("link", 0, 2))
    assert capped.bandwidth(0, 2) == MB / 4 and capped.bandwidth(2, 0) == MB / 4
    assert capped.bandwidth(1, 3) == MB  # the pipe itself is unchanged
    # With 1 -> 3 on the pipe too, 0 -> 2 takes its capped 0.25 and 1 -> 3 the rest.
    rates = max_min_rates([capped.path(0, 2), capped.path(1, 3)], capped.resource_capacity)
    assert rates == pytest.approx([MB / 4, 3 * MB / 4])
