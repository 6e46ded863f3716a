"""Gaia's rules (PAPERS.md section 1, baselines): significance filter, sharded sites, sync."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dlion.core.config import ExperimentConfig, load_config
from dlion.engines.sim import RunResult, run_sim
from dlion.strategies import gaia
from dlion.strategies.gaia import (
    SignificanceFilter,
    shard_bounds,
    significance_threshold,
    significant,
    site_layout,
)
from helpers import run_counting, small_config

# ------------------------------------------------------------------------------ pure rules


def test_shard_bounds_cover_the_vector_like_tensor_split() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(4, 1) == [(0, 4)]
    sizes = [c.numel() for c in torch.zeros(17226).tensor_split(4)]
    assert [e - s for s, e in shard_bounds(17226, 4)] == sizes
    with pytest.raises(ValueError, match="at least one shard"):
        shard_bounds(10, 0)


def test_site_layout_gives_each_member_its_shard_of_its_site() -> None:
    sites = ["a", "a", "b", "c", "c", "c"]
    layout = site_layout([5, 0, 1, 2, 3, 4], sites.__getitem__, 10)
    assert layout == {
        "a": [(0, 0, 5), (1, 5, 10)],
        "b": [(2, 0, 10)],
        "c": [(3, 0, 4), (4, 4, 7), (5, 7, 10)],
    }


def test_threshold_is_lowered_in_proportion_to_the_learning_rate() -> None:
    assert significance_threshold(0.01, 0.05, 0.05) == pytest.approx(0.01)
    assert significance_threshold(0.01, 0.005, 0.05) == pytest.approx(0.001)
    assert significance_threshold(0.02, 0.025, 0.05) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="positive"):
        significance_threshold(0.01, 0.05, 0.0)


def test_significance_is_update_relative_to_parameter() -> None:
    acc = torch.tensor([0.3, -0.3, 0.1, 0.0, 1e-9, 0.19])
    params = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, -1.0])
    # lr 0.1 => parameter change 0.03, 0.03, 0.01, 0, 1e-10, 0.019 against 2% of |w|.
    mask = significant(acc, params, lr=0.1, threshold=0.02)
    assert mask.tolist() == [True, True, False, False, True, False]


def test_constant_small_update_is_sent_once_it_accumulates_past_the_threshold() -> None:
    # lr * k * 0.03 > 0.01 * 1.0 first at k = 4 (0.012): sent then, with all 4 updates.
    filt = SignificanceFilter(2)
    params = torch.tensor([1.0, 1e6])  # entry 1 is far too large to ever become significant
    sent_at = []
    for k in range(1, 10):
        filt.add(0, torch.tensor([0.03, 0.03]))
        idx, values = filt.take(params, lr=0.1, threshold=0.01)
        if idx.numel():
            assert idx.tolist() == [0]
            assert values.tolist() == pytest.approx([0.12])
            sent_at.append(k)
    assert sent_at == [4, 8]
    # Nothing was lost: the unsent entry holds every update, entry 0 the one since k = 8.
    assert filt.accumulated.tolist() == pytest.approx([0.03, 0.27])


def test_filter_never_sends_an_insignificant_entry_and_conserves_every_update() -> None:
    gen = torch.Generator().manual_seed(0)
    numel, lr, threshold = 500, 0.05, 0.01
    filt = SignificanceFilter(numel)
    params = torch.randn(numel, generator=gen)
    params[:50] = 1e4  # these can never reach 1% in 200 small updates
    total = torch.zeros(numel)
    sent = torch.zeros(numel)
    sends = 0
    for _ in range(200):
        update = torch.randn(numel, generator=gen) * 0.01
        filt.add(0, update)
        total += update
        before = filt.accumulated.clone()
        idx, values = filt.take(params, lr, threshold)
        # Exactly the significant entries go, with their whole accumulated value.
        expected = significant(before, params, lr, threshold).nonzero().flatten()
        assert torch.equal(idx, expected)
        assert torch.equal(values, before[idx])
        assert bool((filt.accumulated[idx] == 0).all())
        sent.index_add_(0, idx, values)
        sends += idx.numel()
        params += torch.randn(numel, generator=gen) * 0.001  # the model moves meanwhile
    assert sends > 1000  # the filter did send (the test is not vacuous)
    assert torch.allclose(sent + filt.accumulated, total, atol=1e-5)
    assert torch.equal(sent[:50], torch.zeros(50))
    assert torch.allclose(filt.accumulated[:50], total[:50])


def test_filter_sends_only_allowed_entries_and_keeps_the_rest() -> None:
    filt = SignificanceFilter(4)
    filt.add(0, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    allowed = torch.tensor([True, False, True, False])
    idx, values = filt.take(torch.ones(4), lr=1.0, threshold=0.01, allowed=allowed)
    assert idx.tolist() == [0, 2] and values.tolist() == [1.0, 1.0]
    assert filt.accumulated.tolist() == [0.0, 1.0, 0.0, 1.0]
    filt.add(2, torch.tensor([0.5, 0.5]))  # add() writes at an offset (a shard)
    assert filt.accumulated.tolist() == [0.0, 1.0, 0.5, 1.5]


# ------------------------------------------------------------------------------ in the sim


def _two_sites(strategy: str, options: dict[str, Any], iterations: int) -> ExperimentConfig:
    return small_config(
        sites=[{"name": "a"}, {"name": "b"}],
        workers=[{"site": "a", "capacity_gflops": 1.0}, {"site": "b", "capacity_gflops": 1.0}],
        strategy=strategy,
        options=options,
        train={"max_iterations": iterations, "max_time": 60.0},
    )


def test_filtering_nothing_under_a_lockstep_clock_is_exactly_allreduce() -> None:
    """With a vanishing threshold every update is significant and with staleness 0 each site
    waits for the other's update of the same iteration: Gaia's bookkeeping (shards, filter,
    routing, remote application) must then reproduce synchronous SGD bit for bit."""
    gaia_run = run_sim(_two_sites("gaia", {"threshold": 1e-30, "staleness": 0}, 8), progress=False)
    sync_run = run_sim(_two_sites("allreduce", {}, 8), progress=False)
    assert gaia_run.summary["iterations"] == sync_run.summary["iterations"] == 8
    for g, s in zip(gaia_run.replicas, sync_run.replicas, strict=True):
        assert torch.equal(g.flat, s.flat)


def _run_counting(
    cfg: ExperimentConfig, options: gaia.Options, die: frozenset[int] = frozenset()
) -> tuple[RunResult, dict[int, int]]:
    return run_counting(cfg, gaia.worker, options, die)


def test_sites_keep_one_model_and_send_only_significant_updates_across() -> None:
    cfg = load_config("microcloud-hetero", ["train.max_time=0.6"])
    result, counts = _run_counting(cfg, gaia.Options())
    r = result.replicas
    # Inside a site everyone applies the same all-gathered vector: one model per site.
    assert torch.equal(r[0].flat, r[1].flat)
    assert torch.equal(r[2].flat, r[3].flat)
    assert torch.equal(r[4].flat, r[5].flat)
    assert not torch.equal(r[0].flat, r[2].flat)  # sites differ: only significant updates move
    # ASP across sites: the 4x faster site is not held back by the slowest one.
    assert counts[0] == counts[1] and counts[4] == counts[5]
    assert counts[0] > 3 * counts[4]
    # Traffic: per iteration each worker's share of the intra-site reduce-scatter and
    # all-gather is 2 * numel / 2 values; anything across sites must be far below dense.
    numel = r[0].numel
    intra = sum(counts.values()) * (2 * (numel // 2) * 4 + 2 * 64)
    # Sites of two: a server's shard lines up with one server in each of the 2 other sites.
    dense_across = sum(counts.values()) * 2 * (numel // 2 * 4 + 64)
    across = result.summary["bytes_sent"] - intra
    assert 0 < across < 0.25 * dense_across


def test_mirror_clock_bounds_how_far_a_site_runs_ahead() -> None:
    cfg = load_config("microcloud-hetero", ["train.max_time=0.6"])
    _, counts = _run_counting(cfg, gaia.Options(staleness=2))
    assert min(counts.values()) > 5
    # A site finishes iteration t only once it holds every other site's update of t - 2.
    assert max(counts.values()) - min(counts.values()) <= 3


def test_a_silent_site_peer_is_dropped_and_training_goes_on() -> None:
    cfg = small_config(
        sites=[{"name": "a"}, {"name": "b"}],
        workers=[
            {"site": "a", "capacity_gflops": 0.1, "count": 2},
            {"site": "b", "capacity_gflops": 0.1},
        ],
        strategy="gaia",
        train={"max_time": 0.3},
        engine={"recv_timeout": 0.05},
    )
    result, counts = _run_counting(cfg, gaia.Options(staleness=1), die=frozenset({1}))
    assert counts[1] == 0
    assert counts[0] > 20 and counts[2] > 20
    lost = {(e["rank"], e["peer"]) for e in result.events if e["event"] == "peer_lost"}
    assert (0, 1) in lost


def test_gaia_reaches_the_target_on_homogeneous() -> None:
    cfg = load_config("homogeneous", ["strategy.name=gaia", "train.max_time=30"])
    assert run_sim(cfg, progress=False).summary["tta_s"] is not None
