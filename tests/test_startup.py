"""Start-up of a dist job (issue 15, item 4): the whole config is checked before any
process starts, a torchrun world size that does not match the config is one line on every
rank, and a worker that dies while the job starts is named at once, never waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dlion.cli.commands import main
from dlion.comm.job import exit_text, last_line
from dlion.core.config import ExperimentConfig
from dlion.core.errors import SimulationError
from dlion.engines.launcher import run_dist
from helpers import small_config

TESTS = Path(__file__).parent


def dist_config(count: int = 3, **engine: Any) -> ExperimentConfig:
    return small_config(
        workers=[{"site": "a", "capacity_gflops": 0.02, "count": count}],
        strategy="dlion",
        train={"target_acc": 0.9, "max_time": 20.0},
        evaluation={"every_s": 0.25},
        engine={"name": "dist", "peer_timeout": 5.0, "heartbeat_s": 0.2, **engine},
    )


def dying(how: str) -> dict[int, dict[str, str]]:
    """Environment for rank 2 that makes it SIGKILL itself during start-up."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {2: {"DLION_PLUGINS": "startup_death", "DLION_TEST_DIE": how, "PYTHONPATH": path}}


def test_a_worker_killed_before_it_registers_is_named_and_the_job_starts_without_it(
    tmp_path: Path,
) -> None:
    cfg = dist_config(startup_timeout=120.0)
    result = run_dist(cfg, out_dir=tmp_path, progress=False, rank_env=dying("import"))
    s = result.summary
    assert s["membership"][0] == {"t": 0.0, "rank": 2, "event": "failed_to_start", "exit_code": -9}
    assert s["startup_s"] < 60.0  # never the 120 s start-up timeout
    assert s["tta_s"] is not None  # the two others train to the target
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    [failed] = [e for e in events if e["event"] == "failed_to_start"]
    assert failed["rank"] == 2 and failed["exit_code"] == -9


def test_a_worker_killed_while_peers_connect_to_it_fails_the_job_at_once(tmp_path: Path) -> None:
    cfg = dist_config(startup_timeout=120.0)
    start = time.monotonic()
    with pytest.raises(
        SimulationError, match=r"worker 2 exited during start-up \(killed by SIGKILL\)"
    ):
        run_dist(cfg, out_dir=tmp_path, progress=False, rank_env=dying("registered"))
    assert time.monotonic() - start < 60.0  # not the 120 s timeout


def test_exit_text_and_last_line(tmp_path: Path) -> None:
    assert exit_text(-9) == "killed by SIGKILL"
    assert exit_text(-15) == "killed by SIGTERM"
    assert exit_text(2) == "exit code 2"
    log = tmp_path / "rank-0.log"
    log.write_text("[12:00:00] loading\nerror: data.path: no such file\n\n")
    assert last_line(log) == "error: data.path: no such file"
    assert last_line(tmp_path / "missing.log") == ""


def test_a_strategy_option_typo_is_exit_2_before_any_process_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(dist_config().model_dump(mode="json")))  # JSON is YAML
    out = tmp_path / "run"
    start = time.monotonic()
    code = main(["train", str(config), "--set", "strategy.options.wbd=false", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: strategy.options.wbd: Extra inputs are not permitted (strategy dlion)"]
    assert not (out / "workers").exists()
    assert time.monotonic() - start < 30.0


def test_torchrun_with_the_wrong_world_size_is_one_line_on_every_rank(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(dist_config(count=2).model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "3",
            "-m",
            "dlion.jobs.dist_worker",
            str(config),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    line = (
        "error: torchrun started 3 processes (WORLD_SIZE=3) but the config describes 2 "
        "workers (cluster.workers): use --nnodes x --nproc-per-node = 2"
    )
    assert proc.returncode != 0
    assert out.count(line) == 3, out[-3000:]
    assert "IndexError" not in out
    assert "exitcode  : 2" in out  # torchrun's report: the rank exited with bad input
