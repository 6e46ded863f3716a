"""The one time-scale object (timescale.py) and the one context setup (context.worker_setup)."""

from __future__ import annotations

import pytest

from dlion.cluster.topology import Cluster
from dlion.context import worker_setup
from dlion.core.config import load_config
from dlion.core.timescale import UNIT, TimeScale
from dlion.engines.network import all_to_all_rates


def test_conversions_by_hand() -> None:
    s = TimeScale(4.0)
    assert s.wall(2.5) == 10.0  # a scenario second lasts 4 wall seconds
    assert s.scenario(10.0) == 2.5
    assert s.rate(1e6) == 250_000.0  # bytes per scenario second -> per wall second
    assert s.scenario_rate(250_000.0) == 1e6


def test_the_unit_scale_changes_no_bit() -> None:
    for x in (0.1, 1 / 3, 12_345.678_9, 5e-324):
        assert UNIT.wall(x) == x and UNIT.scenario(x) == x
        assert UNIT.rate(x) == x and UNIT.scenario_rate(x) == x


def test_worker_setup_in_engine_units() -> None:
    cfg = load_config("microcloud-hetero")
    cluster = Cluster.from_config(cfg.cluster)
    rates = all_to_all_rates(cluster)
    sim = worker_setup(cfg, cluster, 1, rates)
    dist = worker_setup(cfg, cluster, 1, rates, TimeScale(2.0))
    assert sim["rank"] == dist["rank"] == 1
    assert sim["world"] == list(range(cluster.size))
    assert sim["global_batch"] == cfg.train.batch_per_worker * cluster.size
    assert set(sim["bandwidth_seed"]) == set(range(cluster.size)) - {1}
    assert sim["bandwidth_seed"][0] == rates[(1, 0)]
    assert dist["recv_timeout"] == 2 * sim["recv_timeout"] == 2 * cfg.engine.recv_timeout
    for p in sim["latency"]:
        assert dist["latency"][p] == pytest.approx(2 * cluster.link(1, p).latency)
        assert dist["bandwidth_seed"][p] == pytest.approx(rates[(1, p)] / 2)
