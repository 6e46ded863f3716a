"""One process of `dlion probe`'s link measurement (see dlion/probe/measure.py for the method).

    python -m dlion.probe.link_process RANK WORLD HOST PORT BYTES_PER_PAIR FRAMES PINGS TIMEOUT_S

Joins the probe's store, connects to every peer through the engine's transport, then for
each ordered pair k = (i, j), once the master says go: i streams the frames to j; j times
them and publishes the bandwidth; i then measures the round trip of small echoed frames and
publishes the latency. Frames start with one byte of kind: D data, P ping, Q pong.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from dlion.comm.transport import PairTransport
from dlion.probe.measure import KEY_BW, KEY_END, KEY_GO, KEY_LAT, KEY_READY, ordered_pairs


class _Receiver:
    """Frame arrivals per peer (receiver thread) and pongs (for the ping sender)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.arrivals: dict[int, list[tuple[int, float]]] = {}  # peer -> (bytes, last byte at)
        self.pongs: dict[int, int] = {}

    def timing(self, peer: int, nbytes: int, first: float, last: float) -> None:
        if nbytes < 2:  # pings and pongs are one byte: not part of a bandwidth stream
            return
        with self.lock:
            self.arrivals.setdefault(peer, []).append((nbytes, last))
            self.lock.notify_all()


def main(argv: list[str]) -> int:
    rank, world, host, port = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    bytes_per_pair, frames, pings, timeout_s = (
        int(argv[4]),
        int(argv[5]),
        int(argv[6]),
        float(argv[7]),
    )
    timeout = datetime.timedelta(seconds=timeout_s)

    def store_factory() -> dist.Store:
        return dist.TCPStore(host, port, None, False, timeout=timeout)

    run_links(rank, world, store_factory, bytes_per_pair, frames, pings, timeout_s)
    return 0


def run_links(
    rank: int,
    world: int,
    store_factory: Callable[[], dist.Store],
    bytes_per_pair: int,
    frames: int,
    pings: int,
    timeout_s: float,
) -> None:
    """This rank's part of the link measurement (module doc), through `store_factory`'s
    store (the probe's own, or a torchrun job's)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = store_factory()
    recv = _Receiver()
    transport: PairTransport

    def on_frame(peer: int, frame: memoryview) -> None:
        kind = bytes(frame[:1])
        if kind == b"P":
            transport.send(peer, b"Q", due=0.0)
        elif kind == b"Q":
            with recv.lock:
                recv.pongs[peer] = recv.pongs.get(peer, 0) + 1
                recv.lock.notify_all()

    def on_failure(peer: int, why: str) -> None:
        print(f"link to {peer} failed: {why}", flush=True)

    transport = PairTransport(
        store_factory,
        rank,
        backend="gloo",
        max_frame_bytes=max(bytes_per_pair, 1 << 20),
        on_frame=on_frame,
        on_failure=on_failure,
        on_timing=recv.timing,
    )
    threads = [
        threading.Thread(target=transport.connect, args=(p, "probe"), daemon=True)
        for p in range(world)
        if p != rank
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    store.set(KEY_READY.format(rank=rank), "1")
    frame_bytes = max(2, bytes_per_pair // frames)
    data = b"D" + bytes(frame_bytes - 1)
    for k, (src, dst) in enumerate(ordered_pairs(world)):
        if rank not in (src, dst):
            continue
        store.wait([KEY_GO.format(k=k)], timeout)
        if rank == src:
            for _ in range(frames):
                transport.send(dst, data, due=0.0)
            store.wait([KEY_BW.format(k=k)], timeout)
            store.set(KEY_LAT.format(k=k), repr(_latency(transport, recv, dst, pings, timeout_s)))
        else:
            store.set(KEY_BW.format(k=k), repr(_bandwidth(recv, src, frames, timeout_s)))
    store.wait([KEY_END], timeout)


def _bandwidth(recv: _Receiver, src: int, frames: int, timeout_s: float) -> float:
    """Bytes of frames 2..F over the time from frame 1's last byte to frame F's."""
    with recv.lock:
        if not recv.lock.wait_for(lambda: len(recv.arrivals.get(src, [])) >= frames, timeout_s):
            raise TimeoutError(f"only {len(recv.arrivals.get(src, []))} of {frames} frames")
        got = recv.arrivals.pop(src)[:frames]
    span = got[-1][1] - got[0][1]
    return sum(n for n, _ in got[1:]) / span


def _latency(
    transport: PairTransport, recv: _Receiver, dst: int, pings: int, timeout_s: float
) -> float:
    """Half the smallest round trip of one-byte frames, one at a time."""
    best = float("inf")
    for _ in range(pings):
        with recv.lock:
            before = recv.pongs.get(dst, 0)
        start = time.perf_counter()
        transport.send(dst, b"P", due=0.0)
        with recv.lock:
            # mypy cannot infer the type of a lambda with a default argument.
            if not recv.lock.wait_for(lambda b=before: recv.pongs.get(dst, 0) > b, timeout_s):  # type: ignore[misc]
                raise TimeoutError(f"no pong from {dst}")
        best = min(best, time.perf_counter() - start)
    return best / 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
