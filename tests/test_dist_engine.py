"""The dist engine end to end: real worker processes on this host, real faults.

Each test launches a small job (3 workers, digits, a small MLP) and checks what a user
relies on: it trains to the target and writes the sim's files, a SIGKILLed worker is
dropped and the rest finish, SIGTERM is a clean leave noticed at once, processes without
the shared secret are refused, and malformed tensors from a peer are counted, never applied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dlion.core.config import ExperimentConfig, config_from_dict
from dlion.engines.launcher import Fault, run_dist
from helpers import small_config

TESTS = Path(__file__).parent


def dist_config(strategy: str = "dlion", **engine: Any) -> ExperimentConfig:
    return small_config(
        workers=[{"site": "a", "capacity_gflops": 0.02, "count": 3}],
        strategy=strategy,
        train={"target_acc": 0.93, "max_time": 30.0},
        evaluation={"every_s": 0.25},
        engine={"name": "dist", "peer_timeout": 5.0, "heartbeat_s": 0.2, **engine},
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_allreduce_reaches_the_target_and_writes_the_sim_files(tmp_path: Path) -> None:
    result = run_dist(dist_config("allreduce"), out_dir=tmp_path, progress=False)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == result.summary
    assert s["engine"] == "dist" and s["backend"] == "gloo" and s["workers"] == 3
    assert s["tta_s"] is not None and s["final_acc"] >= 0.93
    assert s["membership"] == [] and s["rejected_messages"] == 0
    evals = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    assert len(evals) >= 2 and [e["t"] for e in evals] == sorted(e["t"] for e in evals)
    # Snapshots are taken on a wall-clock grid, not at iteration boundaries, so even
    # all-reduce replicas may differ by an iteration there.
    assert evals[-1]["min_acc"] <= evals[-1]["mean_acc"]
    assert s["bytes_sent"] > 0 and s["iterations"] > 0


@pytest.mark.parametrize("strategy", ["dlion", "allreduce"])
def test_a_killed_worker_is_dropped_and_the_others_reach_the_target(
    tmp_path: Path, strategy: str
) -> None:
    # All-reduce must re-form its ring over the survivors (regroup), DLion re-balance.
    cfg = dist_config(strategy)
    result = run_dist(cfg, out_dir=tmp_path, progress=False, faults=[Fault(2, at=0.3)])
    s = result.summary
    assert s["tta_s"] is not None
    [change] = s["membership"]
    assert change["rank"] == 2 and change["event"] == "crash" and change["exit_code"] == -9
    assert change["detected_after_s"] is not None
    assert change["detected_after_s"] < cfg.engine.peer_timeout
    for rank in (0, 1):
        gone = [
            e
            for e in read_events(tmp_path / "workers" / f"rank-{rank}.jsonl")
            if e["event"] == "peer_gone"
        ]
        assert [e["peer"] for e in gone] == [2]


def test_sigterm_is_a_clean_leave_noticed_without_waiting_for_the_timeout(
    tmp_path: Path,
) -> None:
    cfg = dist_config("dlion", peer_timeout=20.0)
    result = run_dist(cfg, out_dir=tmp_path, progress=False, faults=[Fault(1, 0.3, "TERM")])
    [change] = result.summary["membership"]
    assert change["event"] == "leave" and change["rank"] == 1
    assert change["detected_after_s"] < 2.0  # far below the 20 s peer timeout
    assert result.summary["tta_s"] is not None


def test_a_process_without_the_secret_is_refused(tmp_path: Path) -> None:
    cfg = dist_config("dlion", secret="right")
    result = run_dist(
        cfg, out_dir=tmp_path, progress=False, rank_env={2: {"DLION_SECRET": "wrong"}}
    )
    s = result.summary
    assert s["membership"] == [{"t": 0.0, "rank": 2, "event": "failed_to_start"}]
    assert s["tta_s"] is not None  # the two who know the secret train on
    log = (tmp_path / "workers" / "rank-2.log").read_text()
    assert "refused by the job: shared secret mismatch" in log
    refused = [
        e for e in read_events(tmp_path / "workers" / "rank-0.jsonl") if e["event"] == "refused"
    ]
    assert [e["peer"] for e in refused] == [2]


def test_malformed_tensors_from_a_peer_are_counted_and_never_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLION_PLUGINS", "dist_plugins")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    import dist_plugins  # noqa: F401  (registers t-liar here too, for config validation)

    cfg = dist_config("t-liar", max_message_mb=0.5)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_time": 3.0})})
    result = run_dist(cfg, out_dir=tmp_path, progress=False)
    # NaN, wrong length, wrong dtype, and the 800 kB frame over the 0.5 MB limit.
    assert result.summary["rejected_messages"] == 4
    events = read_events(tmp_path / "workers" / "rank-0.jsonl")
    assert [e["good"] for e in events if e["event"] == "took"] == [True]
    whys = [e["why"] for e in events if e["event"] == "rejected"]
    assert any("NaN" in w for w in whys) and any("expected" in w for w in whys)
    assert any("limit" in w for w in whys)


def test_a_replacement_joins_from_a_live_peer_and_training_goes_on(tmp_path: Path) -> None:
    base = dist_config("dlion")
    raw = base.model_dump(mode="json")
    raw["dynamics"]["membership"] = [
        {"at_s": 0.3, "rank": 2, "event": "crash"},
        {"at_s": 0.5, "rank": 2, "event": "join"},
    ]
    raw["train"].update(target_acc=0.999, max_time=20.0)  # run to the end, past the join
    cfg = config_from_dict(raw)
    result = run_dist(cfg, out_dir=tmp_path, progress=False)
    crash, join = result.summary["membership"]
    assert (crash["rank"], crash["event"], crash["incarnation"]) == (2, "crash", 0)
    assert (join["rank"], join["event"], join["incarnation"]) == (2, "join", 1)
    assert join["donor"] in (0, 1) and join["t"] > crash["t"]
    # Both members admitted the joiner before reaching its first iteration, and the job
    # kept making progress afterwards (a lost message here would stall everyone).
    for rank in (0, 1):
        [admit] = [
            e
            for e in read_events(tmp_path / "workers" / f"rank-{rank}.jsonl")
            if e["event"] == "peer_joined"
        ]
        assert admit["peer"] == 2 and admit["late"] is False
    evals = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    after = [e["iteration"] for e in evals if e["t"] > join["t"] + 1.0]
    # A stall was seen once under load (survivors at 51, the joiner admitted from 101; 9
    # runs at load 7-13 did not repeat it). One cause found since: a previous life's
    # stale heartbeat made members drop the joiner (comm/job.py heartbeat_stale). On
    # failure, show what every rank logged about the join.
    assert len(after) >= 2 and after[-1] > join["since"], _join_story(tmp_path, after)
    assert result.summary["final_acc"] > 0.9


def _join_story(out: Path, iterations: list[int]) -> str:
    """The membership events of every rank's log and the evaluated iterations."""
    lines = [f"eval iterations after the join: {iterations}"]
    skip = {"wdb", "link_rate", "link_probe", "collective_group"}
    for path in sorted((out / "workers").glob("rank-*.jsonl")):
        events = [e for e in read_events(path) if e["event"] not in skip]
        lines.append(f"{path.name}: {events[-12:]}")
    return "\n".join(lines)


def test_torchrun_launches_the_same_job(tmp_path: Path) -> None:
    """`torchrun -m dlion.jobs.dist_worker`: rank 0 coordinates; same run files as the launcher."""
    config = tmp_path / "job.yaml"
    raw = dist_config("allreduce").model_dump(mode="json")
    raw["cluster"]["workers"] = [{"site": "a", "capacity_gflops": 0.02, "count": 2}]
    config.write_text(json.dumps(raw))  # JSON is YAML
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "-m",
            "dlion.jobs.dist_worker",
            str(config),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"] == "dist" and s["workers"] == 2 and s["tta_s"] is not None
    assert (out / "workers" / "rank-1.jsonl").exists()
