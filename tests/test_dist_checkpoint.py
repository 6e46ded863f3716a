"""Dist checkpoints: every worker saves its own state; --resume restarts all of them from
their latest checkpoints (real processes), and a tampered one is refused before launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlion.core.checkpoint import TENSORS, CheckpointError, latest_step_dir, load_latest
from dlion.core.config import ExperimentConfig, config_from_dict
from dlion.engines.dist_checkpoint import verify_resume, worker_root
from dlion.engines.launcher import run_dist
from dlion.engines.sim_checkpoint import experiment_hash
from helpers import small_config


def _cfg() -> ExperimentConfig:
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.02, "count": 2}],
        strategy="dlion-hpdc21",  # per-link residuals: strategy state in the checkpoint
        train={"max_time": 1.5, "stop_at_target": False},
        evaluation={"every_s": 0.25},
        engine={"name": "dist", "peer_timeout": 5.0, "heartbeat_s": 0.1},
    )
    raw = cfg.model_dump(mode="json")
    raw["checkpoint"] = {"every_s": 0.4}
    return config_from_dict(raw)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_dist_workers_checkpoint_and_resume_from_them(tmp_path: Path) -> None:
    cfg = _cfg()
    run_dist(cfg, out_dir=tmp_path, progress=False)
    digest = experiment_hash(cfg)
    saved = {r: load_latest(worker_root(tmp_path, r), digest) for r in range(2)}
    assert all(c.state["iteration"] > 0 for c in saved.values())
    assert saved[0].tensors["strategy.residual.1"].shape == saved[0].tensors["params"].shape
    start = verify_resume(cfg, tmp_path, 2)
    assert start == max(c.state["iteration"] for c in saved.values())

    # A flipped byte in one rank's tensors: refused before anything is launched or moved.
    step = latest_step_dir(worker_root(tmp_path, 1))
    pristine = (step / TENSORS).read_bytes()
    (step / TENSORS).write_bytes(pristine[:-1] + bytes([pristine[-1] ^ 1]))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        run_dist(cfg, out_dir=tmp_path, progress=False, resume=True)
    assert _tree(tmp_path) == before
    (step / TENSORS).write_bytes(pristine)

    result = run_dist(cfg, out_dir=tmp_path, progress=False, resume=True)
    # Every worker restarted from the job's checkpointed iteration, not from scratch,
    # and its first evaluation is no worse than the checkpointed replicas.
    first = result.points[0]
    assert first.iteration >= start
    assert result.summary["iterations"] > start
    before = (tmp_path / "metrics.before-resume-1.jsonl").read_text().splitlines()
    last = [json.loads(e) for e in before if json.loads(e)["event"] == "eval"][-1]
    # The restarted replicas are the trained ones (a fresh model scores about 0.1 on digits).
    assert first.mean_acc >= min(0.5, last["mean_acc"] - 0.15), (first, last)
    events = (tmp_path / "workers" / "rank-0.jsonl").read_text().splitlines()
    assert any(json.loads(e)["event"] == "checkpoint" for e in events)
