"""The sim's timing model, pinned to exact virtual times."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from dlion.comm.collectives import ring_allreduce
from dlion.comm.messages import Dense, Message, PeerGone, Timeout
from dlion.context import WorkerContext
from dlion.core.errors import SimulationError
from dlion.data import load_dataset
from dlion.engines.sim import run_sim
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.training.models import build_model, train_flops_per_sample
from helpers import FREE_VECTORS, registered, small_config

MBPS = 1e6 / 8
HEADER = 64


def _flops_per_sample() -> int:
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, hidden=[32])
    return train_flops_per_sample(model, ds.input_shape)


def test_virtual_loop_jumps_time_without_sleeping() -> None:
    loop = VirtualTimeLoop()

    async def main() -> float:
        await asyncio.sleep(1000.0)
        return loop.time()

    try:
        assert loop.run_until_complete(main()) == 1000.0
    finally:
        loop.close()


def test_virtual_loop_reports_deadlock() -> None:
    loop = VirtualTimeLoop()

    async def main() -> None:
        await loop.create_future()  # nobody will ever resolve it

    try:
        with pytest.raises(SimulationError, match="deadlock"):
            loop.run_until_complete(main())
    finally:
        loop.close()


def test_compute_time_is_flops_times_batch_over_capacity() -> None:
    seen: list[float] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        start = ctx.now()
        result = await ctx.compute(10 + 10 * ctx.rank)
        seen.append(ctx.now() - start)
        assert result.seconds == pytest.approx(seen[-1], rel=1e-12)

    workers = [{"site": "a", "capacity_gflops": 0.5}, {"site": "a", "capacity_gflops": 2.0}]
    with registered("t-compute", worker):
        run_sim(small_config(workers=workers, strategy="t-compute"), progress=False)
    flops = _flops_per_sample()
    assert sorted(seen) == pytest.approx(sorted([flops * 10 / 0.5e9, flops * 20 / 2.0e9]))


def _one_message(
    n_floats: int, workers: list[dict[str, Any]], links: list[dict[str, Any]]
) -> dict[str, float]:
    times: dict[str, float] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            await ctx.send(1, "x", Dense(torch.zeros(n_floats)))
            times["sent"] = ctx.now()
        elif ctx.rank == 1:
            msg = await ctx.recv(0, "x")
            assert isinstance(msg, Message)
            times["arrived"] = ctx.now()

    sites = [{"name": "a"}, {"name": "b"}]
    with registered("t-msg", worker):
        cfg = small_config(workers=workers, sites=sites, links=links, strategy="t-msg")
        run_sim(cfg, progress=False)
    return times


def test_message_arrives_after_latency_plus_size_over_bandwidth() -> None:
    workers = [{"site": "a", "capacity_gflops": 1.0}, {"site": "b", "capacity_gflops": 1.0}]
    links = [{"sites": ["a", "b"], "bandwidth_mbps": 1.0, "latency_ms": 5.0}]
    times = _one_message(1000, workers, links)
    transmit = (1000 * 4 + HEADER) / (1.0 * MBPS)
    assert times["sent"] == pytest.approx(transmit, rel=1e-12)
    assert times["arrived"] == pytest.approx(0.005 + transmit, rel=1e-12)


def _concurrent_sends(
    senders_to: list[tuple[int, int]], workers: list[dict[str, Any]], nbytes: int
) -> dict[tuple[int, int], float]:
    done: dict[tuple[int, int], float] = {}
    n_floats = (nbytes - HEADER) // 4

    async def worker(ctx: WorkerContext, _: Any) -> None:
        mine = [(s, d) for s, d in senders_to if s == ctx.rank]

        async def one(dst: int) -> None:
            await ctx.send(dst, "x", Dense(torch.zeros(n_floats)))
            done[(ctx.rank, dst)] = ctx.now()

        await asyncio.gather(*(one(d) for _, d in mine))

    with registered("t-nic", worker):
        cfg = small_config(
            workers=workers,
            sites=[{"name": "a", "intra_bandwidth_mbps": 1000.0, "intra_latency_ms": 0.0}],
            strategy="t-nic",
        )
        run_sim(cfg, progress=False)
    return done


def test_two_concurrent_sends_through_one_nic_each_take_twice_as_long() -> None:
    workers = [{"site": "a", "capacity_gflops": 1.0, "nic_mbps": 8.0, "count": 3}]
    nbytes = 100_064
    alone = _concurrent_sends([(0, 1)], workers, nbytes)
    both = _concurrent_sends([(0, 1), (0, 2)], workers, nbytes)
    assert alone[(0, 1)] == pytest.approx(nbytes / 1e6, rel=1e-12)
    assert both[(0, 1)] == pytest.approx(2 * nbytes / 1e6, rel=1e-12)
    assert both[(0, 2)] == pytest.approx(2 * nbytes / 1e6, rel=1e-12)


def test_receiver_nic_is_shared_by_two_senders() -> None:
    workers = [{"site": "a", "capacity_gflops": 1.0, "nic_mbps": 8.0, "count": 3}]
    both = _concurrent_sends([(1, 0), (2, 0)], workers, 100_064)
    assert both[(1, 0)] == pytest.approx(2 * 100_064 / 1e6, rel=1e-12)
    assert both[(2, 0)] == pytest.approx(2 * 100_064 / 1e6, rel=1e-12)


def test_nic_share_is_max_min_fair() -> None:
    """A flow held back by its slow link leaves the rest of the NIC to the other flow."""
    done: dict[int, float] = {}
    nbytes = 1_000_064

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank != 0:
            return

        async def one(dst: int) -> None:
            await ctx.send(dst, "x", Dense(torch.zeros((nbytes - HEADER) // 4)))
            done[dst] = ctx.now()

        await asyncio.gather(one(1), one(2))

    workers = [
        {"site": "a", "capacity_gflops": 1.0, "nic_mbps": 80.0},  # 10 MB/s NIC
        {"site": "b", "capacity_gflops": 1.0},
        {"site": "a", "capacity_gflops": 1.0},
    ]
    sites = [
        {"name": "a", "intra_bandwidth_mbps": 800.0, "intra_latency_ms": 0.0},
        {"name": "b"},
    ]
    links = [{"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 0.0}]  # 1 MB/s
    with registered("t-maxmin", worker):
        run_sim(
            small_config(workers=workers, sites=sites, links=links, strategy="t-maxmin"),
            progress=False,
        )
    # 0->1 is capped at 1 MB/s by its link; 0->2 gets the NIC's other 9 MB/s.
    assert done[2] == pytest.approx(nbytes / 9e6, rel=1e-9)
    # After 0->2 ends, 0->1 keeps its 1 MB/s: it still needs nbytes / 1e6 in total.
    assert done[1] == pytest.approx(nbytes / 1e6, rel=1e-9)


def test_recv_times_out_at_exactly_the_timeout() -> None:
    got: list[Any] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            got.append(await ctx.recv(1, "never", timeout=0.75))
            got.append(ctx.now())

    with registered("t-timeout", worker):
        run_sim(small_config(strategy="t-timeout"), progress=False)
    assert isinstance(got[0], Timeout)
    assert got[1] == 0.75


def test_malformed_tensor_is_rejected_and_counted() -> None:
    got: list[Any] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 1:
            await ctx.send(0, "x", Dense(torch.tensor([1.0, float("nan"), 3.0])))
            await ctx.send(0, "x", Dense(torch.zeros(5)))  # wrong length
            await ctx.send(0, "x", Dense(torch.ones(3)))
        else:
            got.append(await ctx.recv(1, "x", numel=3))

    with registered("t-reject", worker):
        result = run_sim(small_config(strategy="t-reject"), progress=False)
    assert isinstance(got[0], Message)
    assert torch.equal(got[0].payload.values, torch.ones(3))  # type: ignore[union-attr]
    assert result.summary["rejected_messages"] == 2


def test_peer_gone_wakes_a_waiting_receiver() -> None:
    got: list[Any] = []

    async def worker(ctx: WorkerContext, _: Any) -> None:
        if ctx.rank == 0:
            got.append(await ctx.recv(1, "x", timeout=10.0))
            got.append(ctx.now())
        else:
            await asyncio.sleep(0.25)
            # What an engine does when it detects a departure:
            engine_ctx = ctx._engine.contexts[0]  # type: ignore[attr-defined]
            engine_ctx.mailbox.peer_left(1)

    with registered("t-gone", worker):
        run_sim(small_config(strategy="t-gone"), progress=False)
    assert got == [PeerGone(1), 0.25]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_allreduce_sums_exactly_and_takes_the_ring_time(n: int) -> None:
    results: dict[int, torch.Tensor] = {}
    ends: dict[int, float] = {}
    size = 1200  # divisible by 2, 3 and 4: equal chunks

    async def worker(ctx: WorkerContext, _: Any) -> None:
        vec = torch.arange(size, dtype=torch.float32) * (ctx.rank + 1)
        results[ctx.rank] = await ring_allreduce(ctx, vec, "t")
        ends[ctx.rank] = ctx.now()

    sites = [{"name": "a", "intra_bandwidth_mbps": 8.0, "intra_latency_ms": 2.0}]
    with registered("t-ring", worker):
        cfg = small_config(
            workers=[{"site": "a", "capacity_gflops": 1.0, "count": n}],
            sites=sites,
            strategy="t-ring",
            engine=FREE_VECTORS,
        )
        run_sim(cfg, progress=False)
    expected = torch.arange(size, dtype=torch.float32) * sum(range(1, n + 1))
    for r in range(n):
        assert torch.allclose(results[r], expected)
        assert torch.equal(results[r], results[0])  # bit-identical on every worker
    step = 0.002 + (size // n * 4 + HEADER) / 1e6
    assert max(ends.values()) == pytest.approx(2 * (n - 1) * step, rel=1e-9)


@pytest.mark.parametrize(
    "values",
    [
        [1.0, float("inf"), 2.0],
        [float("-inf"), float("inf")],
        [float("nan")],
        [3e38, 3e38, float("nan")],  # the sum overflows and there is a NaN
    ],
)
def test_non_finite_tensors_are_detected(values: list[float]) -> None:
    from dlion.comm.messages import tensor_problem

    assert tensor_problem(Dense(torch.tensor(values)), None) == "tensor contains NaN or Inf"


def test_huge_but_finite_tensor_is_accepted() -> None:
    from dlion.comm.messages import tensor_problem

    # The sum overflows to inf, yet every entry is finite: not a reason to reject.
    assert tensor_problem(Dense(torch.tensor([3e38, 3e38, 3e38])), None) is None
