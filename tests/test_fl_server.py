"""The FL server's screening of untrusted uploads: every bad upload is counted and leaves the
global model bit-for-bit unchanged; oversized norms are clipped or rejected per config."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from dlion.comm.messages import Control, Dense, Message, Scalar
from dlion.context import ComputeResult, WorkerContext
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.fl import build_algorithm
from dlion.fl.base import ServerState
from dlion.fl.config import FLConfig
from dlion.fl.roles import TASK, TO_SERVER, NormScreen, Server

NUMEL = 8


class _Ctx(WorkerContext):
    """A server context whose sends are recorded and take no time."""

    def __init__(self, clients: int) -> None:
        world = list(range(clients + 1))
        super().__init__(
            rank=0,
            world=world,
            sites=["s"] * len(world),
            replica=None,  # type: ignore[arg-type]
            global_batch=1,
            recv_timeout=10.0,
            bandwidth_seed={r: 1e6 for r in world[1:]},
            latency={r: 0.0 for r in world[1:]},
        )
        self.sent: list[Message] = []

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def compute(self, batch_size: int) -> ComputeResult:
        raise AssertionError("the server never computes")

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        self.sent.append(msg)
        return 0.0


def _run(body: Callable[[], Awaitable[None]]) -> None:
    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def _server(algorithm: str = "fedasync", clients: int = 3, **security: Any) -> Server:
    cfg = FLConfig.model_validate(
        {
            "clients": {"count": clients, "concurrency": 1},
            "algorithm": {"name": algorithm},
            "security": security,
        }
    )
    algo = build_algorithm(algorithm, {}, clients)
    state = ServerState(torch.arange(NUMEL, dtype=torch.float32))
    return Server(_Ctx(clients), algo, state, cfg, list(range(1, clients + 1)))


def _upload(server: Server, src: int, payload: Any, samples: float = 10.0) -> Message:
    """An upload answering the client's current task (as an honest client echoes its id)."""
    task = float(server.tasks[src].id) if src in server.tasks else 1.0
    meta = {"task": task, "version": 0.0, "samples": samples}
    return Message(src, 0, TO_SERVER, payload, 0.0, meta)


def _give_task(server: Server, client: int) -> None:
    server._on_control(Message(client, 0, TO_SERVER, Control("checkin"), 0.0))
    server.pool.discard(client)
    server._assign(client)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (Dense(torch.ones(NUMEL - 1)), "entries, expected 8"),
        (Dense(torch.ones(NUMEL, dtype=torch.float64)), "dtype"),
        (Dense(torch.full((NUMEL,), float("nan"))), "NaN or Inf"),
        (Dense(torch.tensor([float("inf")] + [0.0] * (NUMEL - 1))), "NaN or Inf"),
        (Scalar(1.0), "expected a dense tensor"),
    ],
)
def test_malformed_upload_is_rejected_and_model_unchanged(payload: Any, why: str) -> None:
    async def body() -> None:
        server = _server()
        before = server.state.model.clone()
        _give_task(server, 1)
        server._on_upload(_upload(server, 1, payload))
        assert torch.equal(server.state.model, before) and server.state.version == 0
        assert sum(server.stats.rejected.values()) == 1
        assert any(why in k for k in server.stats.rejected)
        assert 1 not in server.tasks and not server.snapshots  # the task is closed

    _run(body)


def test_bad_sample_count_and_unsolicited_uploads_are_rejected() -> None:
    async def body() -> None:
        server = _server()
        before = server.state.model.clone()
        server._on_upload(_upload(server, 2, Dense(torch.ones(NUMEL))))  # no task for client 2
        _give_task(server, 1)
        server._on_upload(_upload(server, 1, Dense(torch.ones(NUMEL)), samples=float("nan")))
        assert torch.equal(server.state.model, before)
        assert server.stats.rejected == {
            "unsolicited upload": 1,
            "sample count missing or not a positive number": 1,
        }

    _run(body)


def test_good_upload_merges_against_the_version_the_server_gave() -> None:
    async def body() -> None:
        server = _server()
        _give_task(server, 1)
        await asyncio.sleep(0)  # let the background task send go out
        task = server.ctx.sent[-1]  # type: ignore[attr-defined]
        assert task.tag == TASK and task.meta["version"] == 0.0
        # The client lies about its version: the server's record (0) is what counts.
        msg = Message(
            1,
            0,
            TO_SERVER,
            Dense(torch.ones(NUMEL)),
            0.0,
            {"task": task.meta["task"], "version": 99.0, "samples": 5.0},
        )
        server._on_upload(msg)
        # fedasync t=1, o=0: a = 0.5 * 2 ** -0.5; w_i = w_0 + 1
        a = 0.5 * 2**-0.5
        expected = torch.arange(NUMEL, dtype=torch.float32) + a
        assert torch.allclose(server.state.model, expected) and server.state.version == 1
        assert server.stats.merged == 1

    _run(body)


def test_norm_screen_clips_to_a_multiple_of_the_median() -> None:
    from dlion.fl.config import SecurityConfig

    screen = NormScreen(SecurityConfig(norm_multiple=4.0, norm_warmup=3, norm_history=10))
    for norm in (1.0, 2.0, 3.0):
        out, clipped = screen.screen(torch.tensor([norm, 0.0]))
        assert not clipped and out is not None
    big = torch.tensor([0.0, 100.0])
    out, clipped = screen.screen(big)
    assert clipped and out is not None
    assert float(torch.linalg.vector_norm(out)) == pytest.approx(4.0 * 2.0)  # 4 x median
    assert torch.equal(big, torch.tensor([0.0, 100.0]))  # the client's tensor is not modified


def test_norm_far_above_population_is_rejected_when_configured() -> None:
    async def body() -> None:
        server = _server(norm_action="reject", norm_multiple=5.0, norm_warmup=2)
        for _ in range(2):
            _give_task(server, 1)
            server._on_upload(_upload(server, 1, Dense(torch.full((NUMEL,), 0.01))))
        before = server.state.model.clone()
        version = server.state.version
        _give_task(server, 2)
        server._on_upload(_upload(server, 2, Dense(torch.full((NUMEL,), 1e3))))
        assert torch.equal(server.state.model, before) and server.state.version == version
        assert server.stats.rejected == {"norm above bound": 1}

    _run(body)


def test_norm_far_above_population_is_clipped_by_default() -> None:
    async def body() -> None:
        server = _server(norm_multiple=5.0, norm_warmup=2)
        for _ in range(2):
            _give_task(server, 1)
            server._on_upload(_upload(server, 1, Dense(torch.full((NUMEL,), 0.01))))
        before = server.state.model.clone()
        _give_task(server, 2)
        server._on_upload(_upload(server, 2, Dense(torch.full((NUMEL,), 1e3))))
        assert server.stats.clipped == 1 and server.stats.merged == 3
        step = float(torch.linalg.vector_norm(server.state.model - before))
        bound = 5.0 * float(torch.linalg.vector_norm(torch.full((NUMEL,), 0.01)))
        assert step <= bound  # the merge moved the model by at most alpha * bound

    _run(body)


def test_answer_to_an_older_task_is_not_taken_for_the_current_one() -> None:
    async def body() -> None:
        server = _server()
        _give_task(server, 1)
        old_id = server.tasks[1].id
        _give_task(server, 1)  # checked in again (reconnected): the first task is abandoned
        before = server.state.model.clone()
        msg = Message(
            1,
            0,
            TO_SERVER,
            Dense(torch.ones(NUMEL)),
            0.0,
            {"task": float(old_id), "version": 0.0, "samples": 5.0},
        )
        server._on_upload(msg)
        assert torch.equal(server.state.model, before)
        assert server.stats.rejected == {"unsolicited upload": 1}
        assert server.stats.abandoned == 1

    _run(body)


def test_client_that_left_cannot_upload_its_old_task() -> None:
    async def body() -> None:
        server = _server()
        before = server.state.model.clone()
        _give_task(server, 1)
        server._on_control(Message(1, 0, TO_SERVER, Control("left"), 0.0))
        assert server.stats.abandoned == 1 and not server.snapshots
        server._on_upload(_upload(server, 1, Dense(torch.ones(NUMEL))))
        assert torch.equal(server.state.model, before)
        assert server.stats.rejected == {"unsolicited upload": 1}

    _run(body)


def test_unknown_sender_and_control_are_counted() -> None:
    async def body() -> None:
        server = _server(clients=2)
        server._on_control(Message(7, 0, TO_SERVER, Control("checkin"), 0.0))
        server._on_control(Message(1, 0, TO_SERVER, Control("gimme"), 0.0))
        assert server.stats.rejected == {"unknown sender": 1, "unknown control message": 1}
        assert server.pool == set()

    _run(body)
