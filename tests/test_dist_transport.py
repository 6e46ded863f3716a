"""Shaping arithmetic and the pair transport, both in one process (no worker launch)."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from dlion.cluster.topology import Cluster
from dlion.comm.shaping import LinkShaper, Pacer, pacer_rate, worker_shaper
from dlion.comm.transport import CHUNK, FIRST_BLOCK, RECV_DEPTH, PairTransport, chunk_frame
from dlion.core.timescale import UNIT, TimeScale
from helpers import small_config


def test_pacer_serializes_messages_at_its_rate() -> None:
    pacer = Pacer(rate=1000.0)
    assert pacer.reserve(0.0, 500) == pytest.approx(0.5)
    # A second message queued behind the first, not in parallel with it.
    assert pacer.reserve(0.1, 500) == pytest.approx(1.0)
    # After an idle spell the pacer starts from the send time.
    assert pacer.reserve(5.0, 100) == pytest.approx(5.1)


def test_nic_is_shared_by_links_to_different_peers() -> None:
    shaper = LinkShaper({1: 1000.0, 2: 1000.0}, nic_rate=1000.0)
    assert shaper.reserve(1, 0.0, 1000) == pytest.approx(1.0)
    # The link to 2 is idle, but the NIC is busy until t=1.
    assert shaper.reserve(2, 0.0, 1000) == pytest.approx(2.0)


def test_without_a_nic_links_run_in_parallel() -> None:
    shaper = LinkShaper({1: 1000.0, 2: 500.0}, nic_rate=None)
    assert shaper.reserve(1, 0.0, 1000) == pytest.approx(1.0)
    assert shaper.reserve(2, 0.0, 1000) == pytest.approx(2.0)


def test_a_shared_pipe_is_paced_as_this_senders_slice_of_it() -> None:
    """Sites a (ranks 0, 1) and b (2, 3), an 8 Mbit/s pipe a -> b: each sender of a paces
    its half, 0.5 MB/s, and its messages to 2 and 3 queue on that half; an all-to-all
    round ends at 4 x 100,064 B / 1 MB/s, as in the sim. Time scale 2 halves the rates."""
    cfg = small_config(
        workers=[
            {"site": "a", "capacity_gflops": 1.0, "count": 2},
            {"site": "b", "capacity_gflops": 1.0, "count": 2},
        ],
        sites=[{"name": "a"}, {"name": "b"}],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 8.0, "latency_ms": 0.0}],
    )
    cluster = Cluster.from_config(cfg.cluster)
    shaper = worker_shaper(cluster, 0, scale=UNIT)
    assert shaper.reserve(2, 0.0, 100_064) == pytest.approx(0.200128)
    assert shaper.reserve(3, 0.0, 100_064) == pytest.approx(0.400256)
    assert shaper.reserve(1, 0.0, 100_064) == pytest.approx(100_064 / 125e6)  # intra-site
    # Rank 1's slice is its own: it does not queue behind rank 0's messages.
    assert worker_shaper(cluster, 1, scale=UNIT).reserve(2, 0.0, 100_064) == pytest.approx(0.200128)
    assert worker_shaper(cluster, 0, scale=TimeScale(2.0)).reserve(
        2, 0.0, 100_064
    ) == pytest.approx(0.400256)
    assert pacer_rate(cluster, ("site", "a", "b"), 0.0, UNIT) == 0.5e6


class _Pair:
    """Two transports (ranks 0 and 1) in this process, connected through a local store."""

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            None,
            True,
            timeout=datetime.timedelta(seconds=20),
            wait_for_workers=False,
        )
        self.frames: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}
        self.failures: dict[int, list[tuple[int, str]]] = {0: [], 1: []}
        self.t = [
            PairTransport(
                self._client,
                r,
                backend="gloo",
                max_frame_bytes=max_frame_bytes,
                on_frame=lambda peer, f, r=r: self.frames[r].append((peer, f)),
                on_failure=lambda peer, why, r=r: self.failures[r].append((peer, why)),
            )
            for r in (0, 1)
        ]
        threads = [threading.Thread(target=self.t[r].connect, args=(1 - r, "0")) for r in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def _client(self) -> dist.Store:
        # A client per caller, as in two processes: a client serializes its calls, and each
        # side blocks in the rendezvous until the other has written its address.
        return dist.TCPStore(
            "127.0.0.1", self.store.port, None, False, timeout=datetime.timedelta(seconds=20)
        )

    def wait_for(self, cond: object, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while not cond():  # type: ignore[operator]
            assert time.time() < deadline, "condition not met in time"
            time.sleep(0.01)


def test_frames_arrive_in_order_and_not_before_their_due_time() -> None:
    pair = _Pair()
    start = time.monotonic()
    for i in range(5):
        assert pair.t[0].send(1, bytes([i]) * 100, due=start + 0.2)
    pair.wait_for(lambda: len(pair.frames[1]) == 5)
    assert time.monotonic() - start >= 0.2
    assert [f[0] for _, f in pair.frames[1]] == [0, 1, 2, 3, 4]
    assert all(peer == 0 for peer, _ in pair.frames[1])
    assert pair.failures == {0: [], 1: []}


def test_frames_below_and_above_the_first_block_arrive_whole() -> None:
    # Small frames and ones just past the first block (the NCCL wire's) arrive intact.
    pair = _Pair()
    sizes = [1, FIRST_BLOCK - 9, FIRST_BLOCK - 8, FIRST_BLOCK - 7, 5000]
    sent = [bytes((i + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]
    for frame in sent:
        assert pair.t[0].send(1, frame, due=0.0)
    pair.wait_for(lambda: len(pair.frames[1]) == len(sent))
    assert [bytes(f) for _, f in pair.frames[1]] == sent
    assert all(not f.readonly for _, f in pair.frames[1])  # decoded in place (codec.py)
    assert pair.failures == {0: [], 1: []}


def test_an_oversized_announcement_drops_the_link_and_is_reported() -> None:
    pair = _Pair(max_frame_bytes=1000)
    pair.t[0].send(1, b"x" * 5000, due=0.0)
    pair.wait_for(lambda: pair.failures[1])
    peer, why = pair.failures[1][0]
    assert peer == 0 and "5000 bytes (limit 1000)" in why
    assert pair.frames[1] == []
    # Nothing more is accepted on a failed link.
    assert pair.t[1].send(0, b"y", due=0.0) is False


def test_backend_choice_and_a_clear_error_for_nccl_without_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from dlion.core.errors import ConfigError
    from dlion.engines.dist import resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "gloo"
    assert resolve_backend("gloo") == "gloo"
    with pytest.raises(ConfigError, match=r"engine\.backend: nccl needs CUDA"):
        resolve_backend("nccl")


def test_a_quiet_pair_stays_connected() -> None:
    # gloo closes a pair whose receive times out; pairs that exchange nothing for a while
    # (ps workers never talk to each other) must survive that.
    pair = _Pair()
    time.sleep(2.5)
    assert pair.t[0].send(1, b"still there", due=0.0)
    pair.wait_for(lambda: len(pair.frames[1]) == 1)
    assert bytes(pair.frames[1][0][1]) == b"still there"
    assert pair.failures == {0: [], 1: []}


def test_frames_around_the_chunk_size_arrive_whole_and_in_order() -> None:
    # gloo's wire: length and first bytes in one operation of at most CHUNK bytes, the rest
    # in CHUNK-sized ones; more operations than the receives posted ahead (RECV_DEPTH).
    pair = _Pair()
    sizes = [
        0,
        CHUNK - 9,
        CHUNK - 8,
        CHUNK - 7,
        2 * CHUNK - 8,
        3 * CHUNK + 5,
        RECV_DEPTH * CHUNK * 2,
    ]
    sent = [bytes((i + j) % 251 for j in range(n)) for i, n in enumerate(sizes)] * 3
    for frame in sent:
        assert pair.t[0].send(1, frame, due=0.0)
    pair.wait_for(lambda: len(pair.frames[1]) == len(sent), timeout=30.0)
    assert [bytes(f) for _, f in pair.frames[1]] == sent
    assert pair.failures == {0: [], 1: []}


def test_chunk_frame_splits_after_the_length() -> None:
    frame = bytes(range(256)) * 40  # 10,240 bytes: CHUNK - 8, CHUNK, the rest
    blocks = chunk_frame(frame)
    assert [b.numel() for b in blocks] == [CHUNK, CHUNK, 10_240 - (2 * CHUNK - 8)]
    assert int.from_bytes(bytes(blocks[0][:8].tolist()), "little") == 10_240
    assert b"".join(bytes(b.tolist()) for b in blocks)[8:] == frame
    assert [b.numel() for b in chunk_frame(b"abc")] == [11]


def test_a_frame_crosses_without_waiting_for_the_receiving_thread() -> None:
    """The receiver keeps receives posted ahead, so a frame's bytes flow while its thread
    is busy. (The old wire posted the rest's receive only once the length had arrived:
    gloo sends an operation once the receive is posted, so the sender waited mid-frame for
    that notice, which on a busy pair queues behind the reverse traffic.)"""
    release = threading.Event()
    pair = _Pair()
    sent_at: dict[str, float] = {}

    def slow(peer: int, frame: memoryview) -> None:
        if len(frame) == 1:
            release.wait(10.0)  # the receiving thread is busy with the first frame

    pair.t[1].on_frame = slow
    assert pair.t[0].send(1, b"x", due=0.0)
    time.sleep(0.2)  # the receiver is inside `slow` now
    frame = b"y" * (100 * 1024)  # 25 chunks: within the receives posted ahead
    pair.t[0].send(1, frame, due=0.0, on_sent=lambda: sent_at.setdefault("t", time.monotonic()))
    pair.wait_for(lambda: "t" in sent_at, timeout=5.0)
    assert not release.is_set()  # left the sender while the receiver was still busy
    release.set()


def test_an_urgent_frame_goes_ahead_of_the_queued_ones() -> None:
    pair = _Pair()
    later = time.monotonic() + 0.3
    for i in range(3):
        assert pair.t[0].send(1, bytes([i]) * 10, due=later)
    assert pair.t[0].send(1, b"u", due=0.0, urgent=True)
    pair.wait_for(lambda: len(pair.frames[1]) == 4)
    order = [bytes(f) for _, f in pair.frames[1]]
    # The sender may already hold frame 0 (waiting for its due time); never frames 1-2.
    assert order.index(b"u") <= 1, order
    assert [f for f in order if f != b"u"] == [bytes([i]) * 10 for i in range(3)]
