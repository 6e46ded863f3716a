"""Bench suites: the ideal bound, the learning-rate search, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlion.bench import ideal_config, load_suite, pick_learning_rate, run_suite
from dlion.cluster import Cluster
from dlion.config import load_config


def _run(tta: float | None, acc: float) -> dict[str, object]:
    return {"tta_s": tta, "final_acc": acc}


def test_pick_learning_rate_prefers_fastest_rate_that_always_reaches() -> None:
    grid = {
        "0.01": [_run(None, 0.9), _run(5.0, 0.95)],  # one seed missed: not eligible
        "0.05": [_run(3.0, 0.95), _run(5.0, 0.95)],  # mean 4.0
        "0.1": [_run(2.0, 0.95), _run(5.0, 0.95)],  # mean 3.5: the choice
    }
    assert pick_learning_rate(grid) == 0.1


def test_pick_learning_rate_falls_back_to_best_final_accuracy() -> None:
    grid = {"0.01": [_run(None, 0.7)], "0.05": [_run(None, 0.8)], "0.1": [_run(None, 0.6)]}
    assert pick_learning_rate(grid) == 0.05


def test_ideal_bound_is_one_worker_with_summed_compute_and_global_batch() -> None:
    cfg = load_config("microcloud-hetero")
    ideal = ideal_config(cfg)
    cluster = Cluster.from_config(ideal.cluster)
    assert cluster.size == 1
    assert cluster.capacity(0) == pytest.approx(Cluster.from_config(cfg.cluster).total_capacity())
    assert ideal.train.batch_per_worker == 6 * cfg.train.batch_per_worker
    assert ideal.strategy.name == "allreduce"


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
        assert set(entry["grid"]) == {"0.01", "0.1"}  # same budget for each
        assert entry["lr"] == 0.1  # 0.01 cannot reach 95% in 2.5 simulated s
    for run in runs:
        cfg_text = (
            tmp_path / "out" / "runs" / "homogeneous" / run["strategy"] / "seed0" / "config.yaml"
        ).read_text()
        assert "lr: 0.1" in cfg_text
