"""Bench suites: the ideal bound, the learning-rate search, resuming."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import dlion.cli.suites as bench
from dlion.cli.suites import (
    LrSearch,
    edge_extension,
    ideal_config,
    load_suite,
    pick_best,
    run_suite,
    search_one,
)
from dlion.cluster.topology import Cluster
from dlion.cluster.vector_cost import charger_for, shipped_model
from dlion.core.config import ExperimentConfig, load_config


def _run(tta: float | None, acc: float) -> dict[str, object]:
    return {"tta_s": tta, "final_acc": acc}


def test_pick_best_prefers_the_fastest_rate_that_always_reaches() -> None:
    grid = {
        "0.01": [_run(None, 0.9), _run(5.0, 0.95)],  # one seed missed: not eligible
        "0.05": [_run(3.0, 0.95), _run(5.0, 0.95)],  # mean 4.0
        "0.1": [_run(2.0, 0.95), _run(5.0, 0.95)],  # mean 3.5: the choice
    }
    assert pick_best(grid) == "0.1"


def test_pick_best_falls_back_to_best_final_accuracy() -> None:
    grid = {"0.01": [_run(None, 0.7)], "0.05": [_run(None, 0.8)], "0.1": [_run(None, 0.6)]}
    assert pick_best(grid) == "0.05"


def test_ideal_bound_is_one_worker_with_summed_compute_and_global_batch() -> None:
    cfg = load_config("microcloud-hetero")
    ideal = ideal_config(cfg)
    cluster = Cluster.from_config(ideal.cluster)
    assert cluster.size == 1
    summed = sum(w.capacity_flops for w in Cluster.from_config(cfg.cluster).workers)
    assert cluster.capacity(0) == pytest.approx(summed)
    assert ideal.train.batch_per_worker == 6 * cfg.train.batch_per_worker
    assert ideal.strategy.name == "allreduce"


def test_ideal_bound_pays_a_balanced_clusters_overhead_and_its_capacitys_vector_rate() -> None:
    """Workers (0.3 GFLOP/s, 1 ms overhead) and 2 x (0.1 GFLOP/s, 5 ms), batch 32: the
    summed worker has 0.5 GFLOP/s and the capacity-weighted mean overhead (0.3 x 1 + 0.2 x 5)
    / 0.5 = 2.6 ms, so its step, 2.6 ms + 96 F / 0.5e9, is the equal step time of the three
    (wdb.py: T = (G + sum s_i a_i) / sum s_i); its vector work is rated at batch 32, as a
    0.5 GFLOP/s worker with that overhead in this cluster would be."""
    raw = load_config("homogeneous").model_dump(mode="json")
    raw["cluster"]["workers"] = [
        {"site": "site-a", "capacity_gflops": 0.3, "step_overhead_ms": 1.0},
        {"site": "site-a", "capacity_gflops": 0.1, "step_overhead_ms": 5.0, "count": 2},
    ]
    cfg = ExperimentConfig.model_validate(raw)
    ideal = ideal_config(cfg)
    (worker,) = ideal.cluster.workers
    assert worker.capacity_gflops == pytest.approx(0.5)
    assert worker.step_overhead_ms == pytest.approx(2.6)
    assert ideal.engine.vector_cost_batch == 32
    assert ideal.train.batch_per_worker == 96
    flops = 85_760.0  # the digits MLP [128, 64]
    step = Cluster.from_config(ideal.cluster).compute_time(0, 96 * flops)
    speeds = [0.3e9 / flops, 0.1e9 / flops, 0.1e9 / flops]
    overheads = [0.001, 0.005, 0.005]
    equal_t = (96 + sum(s * a for s, a in zip(speeds, overheads, strict=True))) / sum(speeds)
    assert step == pytest.approx(equal_t, rel=1e-12)
    # The charger's speed ratio at batch 32: (2.6 ms + 32 F / 0.5e9) / the host's at 32.
    charger = charger_for(ideal, Cluster.from_config(ideal.cluster), 0, flops)
    assert charger is not None
    model = shipped_model()
    k = (0.0026 + 32 * flops / 0.5e9) / (
        model.host.overhead_s + 32 * flops / model.host.flops_per_s
    )
    assert charger.seconds("sgd", 1000, 1, 0.0) == pytest.approx(
        k * model.host_seconds("sgd", 1000), rel=1e-12
    )


def test_ideal_bound_follows_the_summed_capacity_trace() -> None:
    """microcloud-dynamic: 1.4 GFLOP/s in all, rank 0 drops from 0.4 to 0.05 at 1 s."""
    cfg = load_config("microcloud-dynamic")
    ideal = ideal_config(cfg)
    cluster = Cluster.from_config(ideal.cluster).with_dynamics(ideal.dynamics, 60.0)
    assert cluster.capacity(0, 0.5) == pytest.approx(1.4e9)
    assert cluster.capacity(0, 1.5) == pytest.approx(1.05e9)
    assert not ideal.dynamics.bandwidth and not ideal.dynamics.membership


def test_lr_search_runs_the_same_grid_for_every_strategy_and_uses_the_choice(
    tmp_path: Path,
) -> None:
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "name: t\nscenarios: [homogeneous]\n"
        "strategies: [{label: allreduce, strategy: allreduce}, {label: dlion, strategy: dlion}]\n"
        "ideal: false\nset: [train.max_time=2.5]\n"
        "lr_search: {scenario: homogeneous, grid: [0.01, 0.1]}\n"
    )
    runs, _, chosen = run_suite(load_suite(str(suite_file)), tmp_path / "out", progress=False)
    assert set(chosen["default"]) == {"allreduce", "dlion"}
    for entry in chosen["default"].values():
        # Same budget for each: the grid, and 0.1 at its edge extends it one step (x10).
        assert set(entry["grid"]) == {"0.01", "0.1", "1.0"}
        assert entry["extended"] == ["1.0"]
        assert entry["lr"] == 0.1  # 0.01 cannot reach 95% in 2.5 simulated s; 1.0 is worse
        assert not entry["at_edge"]
    for run in runs:
        cfg_text = (
            tmp_path / "out" / "runs" / "homogeneous" / run["strategy"] / "seed0" / "config.yaml"
        ).read_text()
        assert "lr: 0.1" in cfg_text


def test_edge_extension_continues_the_grid_geometrically_past_its_edge() -> None:
    lrs = {str(lr): [f"train.lr={lr}"] for lr in (0.05, 0.1, 0.2)}
    assert edge_extension(lrs, "0.2", own_grid=False) == ("0.4", ["train.lr=0.4"])
    assert edge_extension(lrs, "0.05", own_grid=False) == ("0.025", ["train.lr=0.025"])
    assert edge_extension(lrs, "0.1", own_grid=False) is None  # bracketed
    assert edge_extension({"0.1": ["train.lr=0.1"]}, "0.1", own_grid=False) is None


def test_edge_extension_of_an_own_grid_keeps_the_best_candidates_other_knobs() -> None:
    grid = {
        "train.lr=0.003 strategy.options.H=10": ["train.lr=0.003", "strategy.options.H=10"],
        "train.lr=0.01 strategy.options.H=10": ["train.lr=0.01", "strategy.options.H=10"],
        "train.lr=0.01 strategy.options.H=30": ["train.lr=0.01", "strategy.options.H=30"],
    }
    key, overrides = edge_extension(grid, "train.lr=0.01 strategy.options.H=30", own_grid=True)
    assert overrides == ["train.lr=0.0333", "strategy.options.H=30"]  # 0.01 x 0.01/0.003
    assert key == "train.lr=0.0333 strategy.options.H=30"
    no_lr = {"a": ["strategy.options.H=10"], "b": ["strategy.options.H=30"]}
    assert edge_extension(no_lr, "a", own_grid=True) is None


def test_search_extends_until_the_choice_is_bracketed_on_the_pilot_seeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """TTA is 1 + |log2(lr / 0.4)|: the best rate, 0.4, lies two steps past the grid."""
    seen: list[tuple[float, int]] = []

    def fake_run(cfg: ExperimentConfig, *_: object) -> tuple[dict[str, object], list[object]]:
        seen.append((cfg.train.lr, cfg.train.seed))
        return _run(1 + abs(math.log2(cfg.train.lr / 0.4)), 0.95), []

    monkeypatch.setattr(bench, "_run_or_reuse", fake_run)
    cfg = load_config("homogeneous")
    search = LrSearch(scenario="homogeneous", grid=[0.05, 0.1, 0.2], seeds=2, first_seed=100)
    candidates = {str(lr): [f"train.lr={lr}"] for lr in search.grid}
    entry = search_one(
        cfg, candidates, own_grid=False, search=search, where=tmp_path, label="x",
        progress=False, force=False,
    )  # fmt: skip
    assert entry["extended"] == ["0.4", "0.8"]  # 0.8 is worse: 0.4 is bracketed
    assert entry["lr"] == 0.4 and not entry["at_edge"]
    assert {seed for _, seed in seen} == {100, 101}  # pilot seeds, not the bench's 0-2
    capped = LrSearch(scenario="homogeneous", grid=[0.05, 0.1, 0.2], extend=1)
    candidates = {str(lr): [f"train.lr={lr}"] for lr in capped.grid}
    entry = search_one(
        cfg, candidates, own_grid=False, search=capped, where=tmp_path, label="x",
        progress=False, force=False,
    )  # fmt: skip
    assert entry["extended"] == ["0.4"] and entry["at_edge"]  # said, not hidden
