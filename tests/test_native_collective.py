"""`ctx.allreduce_sum`: the ring in the sim, one torch.distributed collective in dist on
unshaped links, the sim's ring on shaped ones.

The sim charges the ring of point-to-point messages it always did (so the all-reduce
strategy's sim results are unchanged); on unshaped links the dist engine runs one
collective over a process group of the members, formed again when the membership
changes, and never hangs on a member that died. Here: the byte count, a SIGKILLed member,
a leave and a join on the native path; on a transport-shaped pipe, the ring and its pipe
time (the kernel-shaped case is in tests/test_netns.py; tests/test_dist_engine.py's
killed-worker test runs the all-reduce strategy on transport-shaped links, the ring).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlion.comm.collectives import ring_bytes
from dlion.core.config import config_from_dict
from dlion.engines.launcher import Fault, run_dist
from dlion.engines.sim import run_sim
from dlion.training.experiment import make_replica, prepare
from helpers import small_config


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ring_bytes_by_hand() -> None:
    # 10 values over 3 members: chunks of 4, 3, 3. Member 0 sends chunks 0 and 2 in the
    # reduce-scatter, then 1 and 0 in the all-gather: 14 values, 4 messages.
    assert ring_bytes(10, 3, 0) == 14 * 4
    assert ring_bytes(10, 3, 0, header_bytes=64) == 14 * 4 + 4 * 64
    # Member 1: chunks 1, 0, then 2, 1: 3 + 4 + 3 + 3 = 13 values.
    assert ring_bytes(10, 3, 1) == 13 * 4
    assert ring_bytes(10, 1, 0) == 0


def test_the_sim_charges_the_ring_it_always_did() -> None:
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 1.0, "count": 3}],
        strategy="allreduce",
        train={"max_iterations": 2, "stop_at_target": False},
        engine={"header_bytes": 64},
    )
    result = run_sim(cfg, progress=False)
    numel = result.replicas[0].numel
    per_iteration = sum(ring_bytes(numel, 3, pos, 64) for pos in range(3))
    assert result.summary["bytes_sent"] == 2 * per_iteration


def _dist_config(membership: list[dict[str, Any]]) -> Any:
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.02, "count": 3}],
        strategy="allreduce",
        train={"target_acc": 0.999, "max_time": 12.0},
        evaluation={"every_s": 0.25},
        # Unshaped links: the native collective (shaped ones run the ring, below).
        engine={"name": "dist", "shaping": "none", "peer_timeout": 5.0, "heartbeat_s": 0.2},
    )
    raw = cfg.model_dump(mode="json")
    raw["dynamics"]["membership"] = membership
    return config_from_dict(raw)


def _groups(out: Path, rank: int, inc: int = 0) -> list[list[int]]:
    name = f"rank-{rank}.jsonl" if inc == 0 else f"rank-{rank}.{inc}.jsonl"
    events = read_events(out / "workers" / name)
    return [e["members"] for e in events if e["event"] == "collective_group"]


def test_a_sigkilled_member_fails_the_collective_at_once_and_the_rest_re_form(
    tmp_path: Path,
) -> None:
    cfg = _dist_config([])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_time": 6.0})})
    result = run_dist(cfg, out_dir=tmp_path, progress=False, faults=[Fault(2, at=0.3)])
    [crash] = result.summary["membership"]
    assert crash["rank"] == 2 and crash["exit_code"] == -9
    assert crash["detected_after_s"] < cfg.engine.peer_timeout  # no wait for a timeout
    for rank in (0, 1):
        assert _groups(tmp_path, rank) == [[0, 1, 2], [0, 1]]
        events = read_events(tmp_path / "workers" / f"rank-{rank}.jsonl")
        # The collective fails either on its own (the dead member reset its connection) or
        # because the pair link saw the death first and aborted it: whichever came first.
        failed = next(e for e in events if e["event"] == "collective_failed")
        [regroup] = [e for e in events if e["event"] == "regroup"]
        assert regroup["members"] == 2 and regroup["t"] - failed["t"] < cfg.engine.peer_timeout
    evals = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    after = [e["iteration"] for e in evals if e["t"] > crash["t"] + 1.0]
    assert len(after) >= 2 and after[-1] > after[0]


def test_a_leave_and_a_join_re_form_the_group(tmp_path: Path) -> None:
    cfg = _dist_config(
        [{"at_s": 0.3, "rank": 2, "event": "leave"}, {"at_s": 0.8, "rank": 2, "event": "join"}]
    )
    result = run_dist(cfg, out_dir=tmp_path, progress=False)
    leave, join = result.summary["membership"]
    assert (leave["event"], join["event"]) == ("leave", "join")
    # Rank 0 all-reduced over all three, then the two that stayed, then all three again.
    assert _groups(tmp_path, 0) == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert _groups(tmp_path, 2, inc=1) == [[0, 1, 2]]
    # Training went on after the join: iterations advanced and accuracy is sensible.
    evals = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "eval"]
    after = [e["iteration"] for e in evals if e["t"] > join["t"] + 1.0]
    assert len(after) >= 2 and after[-1] > after[0]
    assert result.summary["final_acc"] > 0.9


def test_the_ddp_benchmark_times_dlion_past_its_warm_up_as_it_times_ddp(tmp_path: Path) -> None:
    from dlion.distbench.runs import steady_iteration_time

    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"event": "start"},
        {"event": "eval", "t": 0.0, "iteration": 0},
        {"event": "eval", "t": 2.0, "iteration": 15},  # still warming up
        {"event": "eval", "t": 4.0, "iteration": 40},
        {"event": "eval", "t": 8.0, "iteration": 240},
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    assert steady_iteration_time(metrics, warmup=20) == 4.0 / 200
    assert steady_iteration_time(metrics, warmup=100) is None  # one point past it


def test_on_a_shaped_pipe_the_all_reduce_is_the_ring_and_takes_its_bytes_time(
    tmp_path: Path,
) -> None:
    """One worker per site, a 2 Mbit/s pipe between them, compute far faster than the pipe:
    every iteration moves each member's ring chunks over the pipe, so it takes at least
    their bytes / 250 kB/s. The native collective went around the pacers (hundreds of
    iterations in the same time, RESULTS.md section 12e)."""
    cfg = small_config(
        sites=[{"name": "a"}, {"name": "b"}],
        workers=[
            {"site": "a", "capacity_gflops": 1000.0, "count": 1},
            {"site": "b", "capacity_gflops": 1000.0, "count": 1},
        ],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 2, "latency_ms": 0}],
        strategy="allreduce",
        train={"stop_at_target": False, "max_time": 3.0},
        evaluation={"every_s": 0.5},
        engine={"name": "dist", "shaping": "transport", "peer_timeout": 5.0, "heartbeat_s": 0.2},
    )
    s = run_dist(cfg, out_dir=tmp_path, progress=False).summary
    numel = make_replica(cfg, prepare(cfg, 2), 0).numel
    per_iteration = ring_bytes(numel, 2, 0) / 250_000  # seconds on the pipe, each way
    assert s["iterations"] >= 5  # it ran
    assert s["time_s"] >= s["iterations"] * per_iteration, (s["time_s"], s["iterations"])
    for rank in (0, 1):
        assert _groups(tmp_path, rank) == []  # no native group was formed
