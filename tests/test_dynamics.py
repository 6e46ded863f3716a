"""Dynamics in the sim: traces (config, sources, exact timing) and membership (leave, crash,
join) through the base context, pinned to exact virtual times."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from dlion.cluster.dynamics import membership_schedule
from dlion.cluster.topology import MBPS, Cluster
from dlion.cluster.traces import Trace, build_trace
from dlion.comm.messages import Dense, Message, PeerGone, ViewChanged
from dlion.context import WorkerContext
from dlion.core.config import (
    DynamicsConfig,
    MembershipEvent,
    TraceSpec,
    config_from_dict,
    load_config,
    with_dynamics,
    with_membership,
)
from dlion.core.errors import ConfigError, DataError
from dlion.engines.sim import run_sim
from helpers import registered, small_config

HEADER = 64

# ----------------------------------------------------------------------------- traces


def test_trace_value_and_exact_work_integration() -> None:
    trace = Trace((0.0, 1.0, 3.0), (2.0, 1.0, 4.0))
    assert [trace.at(t) for t in (0.0, 0.99, 1.0, 2.5, 3.0, 100.0)] == [2, 2, 1, 1, 4, 4]
    # From 0.5: 1.0 units by t=1 (rate 2), 2.0 more by t=3 (rate 1), then rate 4.
    assert trace.duration_for(1.0, 0.5) == pytest.approx(0.5)
    assert trace.duration_for(3.0, 0.5) == pytest.approx(2.5)
    assert trace.duration_for(5.0, 0.5) == pytest.approx(3.0)  # 3 by t=3, 2 more at rate 4
    assert trace.duration_for(0.0, 7.0) == 0.0


def test_generators_are_seeded_and_shaped() -> None:
    walk = TraceSpec.model_validate({"random_walk": {"every_s": 1.0, "step": 0.5, "seed": 3}})
    a, b = build_trace(walk, 20.0, "w"), build_trace(walk, 20.0, "w")
    assert a == b and len(a.times) > 10
    assert all(0.1 <= v <= 2.0 for v in a.values)
    other = TraceSpec.model_validate({"random_walk": {"every_s": 1.0, "step": 0.5, "seed": 4}})
    assert build_trace(other, 20.0, "w") != a
    periodic = TraceSpec.model_validate(
        {"periodic": {"period_s": 2.0, "duty": 0.25, "low": 0.5, "phase_s": 1.0}}
    )
    p = build_trace(periodic, 6.0, "p")
    assert [p.at(t) for t in (0.0, 1.0, 1.4, 1.5, 2.9, 3.0, 3.6)] == [1, 0.5, 0.5, 1, 1, 0.5, 1]
    step = build_trace(TraceSpec.model_validate({"step": {"at_s": 2.0, "to": 0.1}}), 9.0, "s")
    assert step == Trace((0.0, 2.0), (1.0, 0.1))


def test_csv_trace_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "bw.csv"
    good.write_text("time,value\n0,1.0\n2.5,0.5\n")
    spec = TraceSpec(csv=str(good))
    assert build_trace(spec, 10.0, "c") == Trace((0.0, 2.5), (1.0, 0.5))
    cases = {
        "missing.csv": None,
        "cols.csv": "0,1,2\n",
        "text.csv": "0,1\nx,y\n",
        "neg.csv": "0,-1\n",
        "empty.csv": "time,value\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(DataError, match=name):
            build_trace(TraceSpec(csv=str(path)), 10.0, "c")


@pytest.mark.parametrize(
    ("dynamics", "message"),
    [
        ({"capacity": [{"worker": 9, "points": [[0, 1]]}]}, r"dynamics.capacity.0.worker"),
        ({"capacity": [{"worker": 0}]}, "exactly one of points"),
        ({"capacity": [{"worker": 0, "points": [[0, -1]]}]}, "value > 0"),
        ({"bandwidth": [{"sites": ["a", "zz"], "points": [[0, 1]]}]}, "unknown site 'zz'"),
        ({"bandwidth": [{"points": [[0, 1]]}]}, "exactly one of 'sites' or 'workers'"),
        ({"membership": [{"at_s": 1, "rank": 7, "event": "leave"}]}, "no rank 7"),
        ({"membership": [{"at_s": 1, "rank": 0, "event": "jump"}]}, "membership.0.event"),
        (
            {"membership": [{"at_s": 1, "rank": 0, "event": "leave", "startup_s": 2}]},
            "startup_s applies to join",
        ),
        (
            {
                "membership": [
                    {"at_s": 1, "rank": 0, "event": "leave"},
                    {"at_s": 2, "rank": 0, "event": "crash"},
                ]
            },
            "membership.1: rank 0 cannot crash at 2.0 s: it is absent",
        ),
        (
            {
                "membership": [
                    {"at_s": 1, "rank": 0, "event": "leave"},
                    {"at_s": 1, "rank": 1, "event": "crash"},
                ]
            },
            "no worker left at 1.0 s",
        ),
        (
            {
                "membership": [
                    {"at_s": 1, "rank": 0, "event": "leave"},
                    {"at_s": 2, "rank": 0, "event": "join", "startup_s": 5},
                    {"at_s": 4, "rank": 0, "event": "leave"},
                ]
            },
            "still starting up until 7.0 s",
        ),
    ],
)
def test_bad_dynamics_give_one_line_errors(dynamics: dict[str, Any], message: str) -> None:
    raw = small_config().model_dump(mode="json")
    raw["dynamics"] = dynamics
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(raw)
    assert "\n" not in str(err.value)


def test_bad_trace_csv_exits_2_with_the_file_named(tmp_path: Path) -> None:
    from dlion.cli.commands import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "extends: homogeneous\n"
        "dynamics:\n  capacity:\n    - {worker: 0, csv: " + str(tmp_path / "nope.csv") + "}\n"
    )
    assert main(["train", str(cfg), "--quiet", "--out", str(tmp_path / "out")]) == 2


def test_membership_can_be_built_in_code_and_attached() -> None:
    cfg = small_config(workers=[{"site": "a", "capacity_gflops": 1.0, "count": 3}])
    events = [
        MembershipEvent(at_s=1.0, rank=2, event="crash"),
        MembershipEvent(at_s=2.0, rank=2, event="join", startup_s=0.5),
    ]
    out = with_membership(cfg, events)
    assert out.dynamics.membership == events and cfg.dynamics.empty
    again = with_dynamics(out, DynamicsConfig())
    assert again.dynamics.empty
    with pytest.raises(ConfigError, match="rank 5"):
        with_membership(cfg, [MembershipEvent(at_s=1.0, rank=5, event="leave")])


def test_random_departures_are_seeded_and_keep_min_live() -> None:
    dyn = DynamicsConfig.model_validate(
        {"random_departures": {"mean_lifetime_s": 5.0, "rejoin_after_s": 1.0, "min_live": 2}}
    )
    a = membership_schedule(dyn, 4, 30.0)
    assert a == membership_schedule(dyn, 4, 30.0)
    assert {e.event for e in a} == {"crash", "join"}
    live = 4
    for ev in sorted(a, key=lambda e: (e.ready_s, e.event != "join")):
        live += 1 if ev.event == "join" else -1
        assert live >= 2


# ----------------------------------------------------------------------------- timing


def test_compute_spans_a_capacity_change_exactly() -> None:
    """1 GFLOP/s, halved at t=0.01: a batch needing 0.015 s at full speed takes
    0.01 + 0.005 * 2 = 0.02 s."""
    seen: list[float] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            result = await ctx.compute(1)
            per_sample = result.seconds  # before the change: flops / 1e9
            await asyncio.sleep(0.01 - 2 * per_sample)
            start = ctx.now()
            n = 2  # crosses the change at 0.01 (work of two samples)
            res = await ctx.compute(n)
            seen.extend([per_sample, start, res.seconds])

    cfg = small_config(strategy="t-cap")
    cfg = with_dynamics(
        cfg,
        DynamicsConfig.model_validate(
            {"capacity": [{"worker": 0, "step": {"at_s": 0.01, "to": 0.5}}]}
        ),
    )
    with registered("t-cap", worker):
        run_sim(cfg, progress=False)
    per_sample, start, took = seen
    # Until 0.01 at full speed (per_sample), the rest of the second sample at half speed.
    assert took == pytest.approx(per_sample + 2 * per_sample, rel=1e-9)
    assert start == pytest.approx(0.01 - per_sample, rel=1e-9)


def test_bandwidth_drop_rerates_a_flow_in_flight() -> None:
    """1 MB/s link, message of 100,064 B; at t=0.05 the link drops to a tenth. Bytes by
    0.05: 50,000; the remaining 50,064 B at 100 kB/s take 0.50064 s: sent at 0.55064."""
    times: dict[str, float] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            await ctx.send(1, "x", Dense(torch.zeros(25_000)))
            times["sent"] = ctx.now()
        else:
            msg = await ctx.recv(0, "x")
            assert isinstance(msg, Message)
            times["arrived"] = ctx.now()

    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 1.0}, {"site": "b", "capacity_gflops": 1.0}],
        sites=[{"name": "a"}, {"name": "b"}],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 2.0}],
        strategy="t-bw",
    )
    dyn = {"bandwidth": [{"sites": ["a", "b"], "points": [[0, 1.0], [0.05, 0.1]]}]}
    cfg = with_dynamics(cfg, DynamicsConfig.model_validate(dyn))
    with registered("t-bw", worker):
        run_sim(cfg, progress=False)
    assert times["sent"] == pytest.approx(0.05 + 50_064 / 100_000, rel=1e-9)
    assert times["arrived"] == pytest.approx(times["sent"] + 0.002, rel=1e-9)


def test_absolute_bandwidth_trace_on_a_worker_pair() -> None:
    cluster = Cluster.from_config(small_config().cluster)
    dyn = DynamicsConfig.model_validate(
        {"bandwidth": [{"workers": [0, 1], "absolute": True, "points": [[0, 8], [1, 16]]}]}
    )
    dynamic = cluster.with_dynamics(dyn, 10.0)
    assert dynamic.bandwidth(0, 1, 0.5) == 8 * MBPS and dynamic.bandwidth(1, 0, 2.0) == 16 * MBPS
    assert dynamic.bandwidth_change_times() == [1.0]
    assert cluster.bandwidth(0, 1, 2.0) == cluster.link(0, 1).bandwidth
    # The same site twice: the links inside it (here every pair), both directions.
    inside = DynamicsConfig.model_validate(
        {"bandwidth": [{"sites": ["a", "a"], "points": [[0, 0.5]]}]}
    )
    halved = cluster.with_dynamics(inside, 10.0)
    assert halved.bandwidth(1, 0, 3.0) == cluster.link(1, 0).bandwidth / 2


# ----------------------------------------------------------------------------- membership


def _three(
    strategy: str, events: list[MembershipEvent], capacity: float = 1.0, **engine: Any
) -> Any:
    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": capacity, "count": 3}],
        strategy=strategy,
        train={"max_time": 2.0},
        engine=engine,
    )
    return with_membership(cfg, events)


def test_leave_is_seen_at_once_and_crash_after_the_peer_timeout() -> None:
    seen: dict[str, Any] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            seen["leave"] = (await ctx.recv(1, "never", timeout=5.0), ctx.now(), ctx.peers())
            seen["crash"] = (await ctx.recv(2, "never", timeout=5.0), ctx.now(), ctx.peers())
            seen["epoch"] = ctx.epoch
        await asyncio.sleep(10.0)

    events = [
        MembershipEvent(at_s=0.25, rank=1, event="leave"),
        MembershipEvent(at_s=0.5, rank=2, event="crash"),
    ]
    with registered("t-member", worker):
        result = run_sim(_three("t-member", events, peer_timeout=0.75), progress=False)
    assert seen["leave"] == (PeerGone(1), 0.25, [2])
    assert seen["crash"] == (PeerGone(2), 1.25, [])
    assert seen["epoch"] == 2
    assert [(m["t"], m["rank"], m["event"]) for m in result.summary["membership"]] == [
        (0.25, 1, "leave"),
        (0.5, 2, "crash"),
        (1.25, 2, "crash_detected"),
    ]
    logged = [e for e in result.events if e["event"] == "membership"]
    assert [e["change"] for e in logged] == ["leave", "crash", "crash_detected"]


def test_departed_worker_is_cancelled_and_evaluation_counts_the_live_ones() -> None:
    last: dict[int, float] = {}
    counts: dict[int, int] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        while True:
            await ctx.compute(16)
            last[ctx.rank] = ctx.now()
            counts[ctx.rank] = counts.get(ctx.rank, 0) + 1
            ctx.iteration_done(0.0)

    events = [MembershipEvent(at_s=0.5, rank=1, event="crash")]
    with registered("t-cancel", worker):
        result = run_sim(_three("t-cancel", events, capacity=0.05), progress=False)
    assert last[1] <= 0.5 < last[0]
    # Evaluation averages over the two running workers only.
    assert result.points[-1].iteration == round((counts[0] + counts[2]) / 2)


def test_a_guarded_receive_wakes_when_a_peer_joins() -> None:
    seen: list[Any] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            seen.append(await ctx.recv(1, "x", timeout=5.0, epoch=ctx.epoch))
            seen.append((ctx.now(), ctx.peers(), ctx.peer_since(2), ctx.incarnation(2)))
        await asyncio.sleep(10.0)

    events = [MembershipEvent(at_s=0.3, rank=2, event="join", startup_s=0.2)]
    with registered("t-guard", worker):
        result = run_sim(_three("t-guard", events), progress=False)
    assert isinstance(seen[0], ViewChanged)
    t, peers, since, incarnation = seen[1]
    assert peers == [1, 2] and since == 1 and incarnation == 1
    # The join starts when the worker is ready (0.5 s) and completes after the state fetch.
    starts = [m for m in result.summary["membership"] if m["event"] == "join_started"]
    joins = [m for m in result.summary["membership"] if m["event"] == "join"]
    assert starts[0]["t"] == 0.5 and joins[0]["t"] == t > 0.5 and joins[0]["donor"] == 0


def test_joiner_starts_from_a_live_peers_current_model_and_optimizer_state() -> None:
    """Worker 0 trains alone; worker 1 joins at 0.5 s: right after the join its parameters
    and momentum equal worker 0's after some iteration k, and it is admitted after k."""
    states: list[torch.Tensor] = []
    joined: dict[str, Any] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            states.append(ctx.replica.state_vector())
            while True:
                result = await ctx.compute(16)
                ctx.replica.apply(result.grad)
                ctx.iteration_done(result.loss)
                states.append(ctx.replica.state_vector())
        else:
            joined["state"] = ctx.replica.state_vector()
            joined["iteration"] = ctx.iteration
            await asyncio.sleep(10.0)

    cfg = small_config(
        workers=[{"site": "a", "capacity_gflops": 0.1, "count": 2}],
        strategy="t-join",
        train={"max_time": 1.0},
    )
    cfg = with_membership(cfg, [MembershipEvent(at_s=0.5, rank=1, event="join")])
    with registered("t-join", worker):
        result = run_sim(cfg, progress=False)
    join = next(m for m in result.summary["membership"] if m["event"] == "join")
    k = next(i for i, s in enumerate(states) if torch.equal(s, joined["state"]))
    assert k > 10  # worker 0's trained model, not the initial one
    assert joined["iteration"] == join["since"] > k


def test_microcloud_dynamic_scenario_loads() -> None:
    cfg = load_config("microcloud-dynamic")
    assert cfg.dynamics.capacity and cfg.dynamics.bandwidth
