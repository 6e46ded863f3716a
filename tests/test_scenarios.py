"""Shipped scenario presets and config inheritance (`extends`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlion.cluster.topology import Cluster
from dlion.core.config import load_config, shipped_scenarios
from dlion.core.errors import ConfigError


def test_every_shipped_scenario_validates() -> None:
    names = shipped_scenarios()
    assert {"homogeneous", "microcloud-hetero", "compute-hetero", "network-hetero"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        Cluster.from_config(cfg.cluster)


def test_compute_hetero_is_up_to_8_to_1_on_uniform_fast_links() -> None:
    cluster = Cluster.from_config(load_config("compute-hetero").cluster)
    caps = [cluster.capacity(r) for r in range(cluster.size)]
    assert max(caps) / min(caps) == pytest.approx(8.0)
    bandwidths = {cluster.link(a, b).bandwidth for a in range(6) for b in range(6) if a != b}
    assert len(bandwidths) == 1


def test_network_hetero_has_equal_compute_and_links_from_fast_to_20x_slower() -> None:
    cluster = Cluster.from_config(load_config("network-hetero").cluster)
    assert len({cluster.capacity(r) for r in range(cluster.size)}) == 1
    inter = {
        cluster.link(a, b).bandwidth
        for a in range(6)
        for b in range(6)
        if a != b and cluster.workers[a].site != cluster.workers[b].site
    }
    assert max(inter) / min(inter) == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("name", "workers"), [("microcloud-hetero-12", 12), ("microcloud-hetero-24", 24)]
)
def test_scale_out_keeps_the_sites_and_links(name: str, workers: int) -> None:
    base = Cluster.from_config(load_config("microcloud-hetero").cluster)
    big = Cluster.from_config(load_config(name).cluster)
    assert big.size == workers
    assert big.sites() == base.sites()
    a, c = 0, workers - 1  # first worker of site-a, last of site-c
    assert big.link(a, c) == base.link(0, 5)


@pytest.mark.parametrize(
    "name",
    ["microcloud-hetero", "microcloud-hetero-12", "microcloud-hetero-24", "microcloud-hetero-32"],
)
def test_microcloud_presets_stay_communication_bound_on_shared_pipes(name: str) -> None:
    """The calibration (microcloud-hetero's comment): one dense gradient (68,968 B) over the
    slowest site pipe, alone on it, takes 2x-5x the slowest worker's compute for its 32
    samples, at every scale; every inter-site pair shares its sites' pipe."""
    cfg = load_config(name)
    cluster = Cluster.from_config(cfg.cluster)
    sites = cluster.sites()
    pipes = {
        cluster.route(a, b)
        for a in range(cluster.size)
        for b in range(cluster.size)
        if cluster.workers[a].site != cluster.workers[b].site
    }
    assert len(pipes) == len(sites) * (len(sites) - 1)  # one per ordered site pair
    slowest = min(
        range(1, cluster.size), key=lambda b: (cluster.bandwidth(0, b), -cluster.link(0, b).latency)
    )
    gradient = 68_968
    comm = cluster.link(0, slowest).latency + gradient / cluster.bandwidth(0, slowest)
    compute = 32 * 85_760 / min(cluster.capacity(r) for r in range(cluster.size))
    assert 2.0 <= comm / compute <= 5.0


def test_noniid_variants_only_change_the_partition() -> None:
    base = load_config("microcloud-hetero")
    for alpha in (0.5, 0.1):
        cfg = load_config(f"microcloud-hetero-noniid-{alpha}")
        assert cfg.data.partition == "dirichlet" and cfg.data.alpha == alpha
        assert cfg.cluster == base.cluster and cfg.train == base.train


def test_extends_merges_sections_and_replaces_lists(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "extends: microcloud-hetero\nname: base\ntrain: {lr: 0.1}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\ntrain: {seed: 7}\nmodel: {hidden: [16]}\n"
    )
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.name == "child"
    assert cfg.train.lr == 0.1 and cfg.train.seed == 7  # merged key by key
    assert cfg.train.batch_per_worker == 32  # from the shipped grandparent
    assert cfg.model.hidden == [16]  # lists replace
    assert len(cfg.cluster.workers) == 3


def test_extends_cycle_and_bad_parent_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: [1, 2]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("extends: no-such-scenario\n")
    with pytest.raises(ConfigError, match="no-such-scenario"):
        load_config(str(tmp_path / "d.yaml"))
