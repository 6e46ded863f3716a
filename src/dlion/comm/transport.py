"""Point-to-point frames between worker processes over torch.distributed.

Every pair of workers gets its own two-rank process group (gloo on CPU, NCCL on GPU),
rendezvoused through the job's store under the pair's own key prefix. A pair group
fails alone: when a peer dies its groups report an error on the next (or pending)
operation, and the other pairs carry on. A world-sized group could not do that, and it
could not admit a worker that joins later. Each peer has a sender thread (a FIFO of
frames, each released at its due time so shaped links keep their latency) and a
receiver thread (length, then bytes); both hand results to the worker's event loop
through callbacks. The receiver also times each frame, from its first operation's arrival
to its last byte's (`on_timing`): on a real link that is the frame's `timed_bytes` over the
link's rate, which is how the dist engine and `dlion probe` measure links without
trusting the config.

On the wire (gloo, CPU) a frame is its length (8 bytes) and first bytes in one operation
of at most `CHUNK` bytes, then the rest in operations of `CHUNK` bytes, the last one
shorter; the receiver keeps `RECV_DEPTH` receives of `CHUNK` bytes posted at all times and
copies each chunk into the frame's buffer. Why: gloo's tcp pairs send an operation only
once the receiver has posted its receive (a recv-ready notice crosses back to the
sender), and that notice travels in the reverse direction's stream, behind the peer's own
frames. An earlier wire (a fixed 1 kB first block, then the rest in one operation sized
from it) posted the rest's receive only once the length had arrived, so every frame
stalled mid-way for a notice queued behind the reverse traffic: on a 20 Mbit/s pair link
with frames both ways, frames read 11 Mbit/s whenever one came the other way (half the
time), and a link 0 -> 1 slowed to 2 Mbit/s made frames 1 -> 0 read 1.9 Mbit/s on their
20 Mbit/s link (RESULTS.md section 15c). gloo accepts an operation shorter than the
posted receive, so receives posted ahead need no sizes. NCCL needs exact sizes, so on
GPUs the old wire stays (`FIRST_BLOCK`, then the rest). Acknowledgements (`send(...,
urgent=True)`) go ahead of the frames queued to leave.

Which address gloo listens on: by default gloo binds to whatever this host's name resolves
to, which on many hosts is a loopback address (Debian's 127.0.1.1, a container's
127.0.0.1, a network namespace's host name) that no other machine can reach. So, unless
GLOO_SOCKET_IFNAME names an interface, each pair group listens on the local address the
kernel would use to reach the job's store (`reachable_address`): the one interface the
other hosts of the job can reach too.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

FrameCallback = Callable[[int, memoryview], None]
# The fixed first block of every frame: 8 bytes of length, then up to 1016 bytes of the
# frame (control messages, acknowledgements and small tensors fit whole).
FIRST_BLOCK = 1024
_LENGTH = 8
# gloo's wire (module doc): operations of at most CHUNK bytes, RECV_DEPTH of them posted
# ahead by the receiver (256 kB: several frames' worth on the slow links this is for).
CHUNK = 4096
RECV_DEPTH = 64
PAIR_OP_TIMEOUT = datetime.timedelta(days=30)
FailureCallback = Callable[[int, str], None]
RefusedCallback = Callable[[int, str], None]
# (peer, frame bytes, time.perf_counter() when its length arrived, when its last byte did)
TimingCallback = Callable[[int, int, float, float], None]


@dataclass
class _Outgoing:
    due: float  # time.monotonic() at which the frame may go
    frame: bytes
    on_sent: Callable[[], None] | None


def _view(frame: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # gloo only reads the frame: a read-only view saves copying it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(frame, dtype=torch.uint8)


def chunk_frame(frame: bytes) -> list[torch.Tensor]:
    """gloo's wire: the frame's length (8 bytes) and its first CHUNK - 8 bytes, then the
    rest in operations of CHUNK bytes, the last one shorter (module doc)."""
    n = len(frame)
    head = min(n, CHUNK - _LENGTH)
    first = bytearray(_LENGTH + head)
    first[:_LENGTH] = n.to_bytes(_LENGTH, "little")
    first[_LENGTH:] = frame[:head]
    blocks = [torch.frombuffer(first, dtype=torch.uint8)]
    if n > head:
        view = _view(frame)
        blocks += [view[i : i + CHUNK] for i in range(head, n, CHUNK)]
    return blocks


class _Outbox:
    """A link's frames waiting to leave: urgent ones (acknowledgements) first, each kind
    in order; None ends the sender."""

    def __init__(self) -> None:
        self._urgent: collections.deque[_Outgoing | None] = collections.deque()
        self._normal: collections.deque[_Outgoing | None] = collections.deque()
        self._ready = threading.Condition()

    def put(self, item: _Outgoing | None, urgent: bool = False) -> None:
        with self._ready:
            (self._urgent if urgent else self._normal).append(item)
            self._ready.notify()

    def get(self) -> _Outgoing | None:
        with self._ready:
            self._ready.wait_for(lambda: bool(self._urgent or self._normal))
            return self._urgent.popleft() if self._urgent else self._normal.popleft()


class _PeerLink:
    def __init__(self, transport: PairTransport, peer: int, group: dist.ProcessGroup) -> None:
        self.transport = transport
        self.peer = peer
        self.group = group
        self.other = 0 if peer < transport.rank else 1  # the peer's rank inside the pair
        self.outbox = _Outbox()
        self.failed = False
        self.sender = threading.Thread(target=self._send_loop, daemon=True, name=f"send-{peer}")
        self.receiver = threading.Thread(target=self._recv_loop, daemon=True, name=f"recv-{peer}")
        self.sender.start()
        self.receiver.start()

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.transport.device)

    def _send_loop(self) -> None:
        chunked = self.transport.device.type == "cpu"
        while True:
            item = self.outbox.get()
            if item is None or self.failed:
                return
            delay = item.due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                blocks = chunk_frame(item.frame) if chunked else self._two_blocks(item.frame)
                # All posted before waiting: the pair keeps them in order.
                works = [self.group.send([self._tensor(b)], self.other, 0) for b in blocks]
                for work in works:
                    work.wait()
            except Exception as err:  # any transport error means the link is gone
                self._fail(f"send failed: {err}")
                return
            if item.on_sent is not None:
                item.on_sent()

    @staticmethod
    def _two_blocks(frame: bytes) -> list[torch.Tensor]:
        """NCCL's wire: FIRST_BLOCK bytes (length, then the frame's first bytes), then the
        rest in one operation (NCCL needs a receive of the exact size)."""
        n = len(frame)
        head = min(n, FIRST_BLOCK - _LENGTH)
        first = bytearray(FIRST_BLOCK)
        first[:_LENGTH] = n.to_bytes(_LENGTH, "little")
        first[_LENGTH : _LENGTH + head] = frame[:head]
        blocks = [torch.frombuffer(first, dtype=torch.uint8)]
        if n > head:
            blocks.append(_view(frame)[head:])
        return blocks

    def _recv_loop(self) -> None:
        try:
            if self.transport.device.type == "cpu":
                self._recv_chunks()
            else:
                self._recv_blocks()
        except Exception as err:  # any transport error means the link is gone
            self._fail(f"receive failed: {err}")

    def _check_length(self, n: int) -> bool:
        limit = self.transport.max_frame_bytes
        if 0 <= n <= limit:
            return True
        # We cannot skip the bytes without receiving them, so the stream from this peer is
        # unusable: refuse the frame and drop the link rather than allocate what it asks.
        why = f"announced a frame of {n} bytes (limit {limit})"
        self.transport.on_refused(self.peer, why)
        self._fail(why)
        return False

    def _recv_chunks(self) -> None:
        """gloo's wire (module doc): RECV_DEPTH receives of CHUNK bytes always posted, so
        the sender never waits for a receive to be posted mid-frame."""
        posted: collections.deque[tuple[torch.Tensor, Any]] = collections.deque()

        def post(buf: torch.Tensor) -> None:
            posted.append((buf, self.group.recv([buf], self.other, 0)))

        for _ in range(RECV_DEPTH):
            post(torch.empty(CHUNK, dtype=torch.uint8))
        while not self.failed:
            buf, work = posted.popleft()
            work.wait()
            first = time.perf_counter()
            n = int.from_bytes(buf[:_LENGTH].numpy().tobytes(), "little")
            if not self._check_length(n):
                return
            head = min(n, CHUNK - _LENGTH)
            out = torch.empty(n, dtype=torch.uint8)
            out[:head] = buf[_LENGTH : _LENGTH + head]
            post(buf)  # copied out: the buffer takes a later chunk
            filled, last = head, first
            while filled < n and not self.failed:
                buf, work = posted.popleft()
                work.wait()
                last = time.perf_counter()
                size = min(n - filled, CHUNK)
                out[filled : filled + size] = buf[:size]
                post(buf)
                filled += size
            if filled < n:
                return  # dropped mid-frame: never deliver part of one
            self._arrived(n, first, last, out)

    def _recv_blocks(self) -> None:
        while not self.failed:
            block = self._tensor(torch.empty(FIRST_BLOCK, dtype=torch.uint8))
            self.group.recv([block], self.other, 0).wait()
            first = time.perf_counter()
            block = block.cpu()
            n = int.from_bytes(block[:_LENGTH].numpy().tobytes(), "little")
            if not self._check_length(n):
                return
            head = min(n, FIRST_BLOCK - _LENGTH)
            if n == head:
                buf = block[_LENGTH : _LENGTH + n]
            else:
                buf = torch.empty(n, dtype=torch.uint8)
                buf[:head] = block[_LENGTH : _LENGTH + head]
                rest = self._tensor(torch.empty(n - head, dtype=torch.uint8))
                self.group.recv([rest], self.other, 0).wait()
                buf[head:] = rest.cpu()
            self._arrived(n, first, time.perf_counter(), buf)

    def _arrived(self, n: int, first: float, last: float, buf: torch.Tensor) -> None:
        if self.transport.on_timing is not None:
            self.transport.on_timing(self.peer, n, first, last)
        # numpy's stub gives ndarray the buffer protocol only for Python >= 3.12.
        self.transport.on_frame(self.peer, memoryview(buf.numpy()))  # type: ignore[arg-type]

    def _fail(self, why: str) -> None:
        # gloo appends advice meant for collective users; the first sentence is the news.
        why = why.split(" This is typically")[0]
        if not self.failed:
            self.failed = True
            self.transport.on_failure(self.peer, why)


def store_host(store: dist.Store) -> str | None:
    """The host of the TCPStore under `store` (through PrefixStores), if it is one."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store.host if isinstance(store, dist.TCPStore) else None


def reachable_address(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent: a UDP connect
    only picks the route and its source address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # any port: nothing is sent
        return str(s.getsockname()[0])


def gloo_bind_address(store: dist.Store) -> str | None:
    """Where this process's gloo groups listen (module doc); None: gloo's default
    (GLOO_SOCKET_IFNAME is set, or the store is not a TCPStore)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    host = store_host(store)
    if host is None:
        return None
    address = reachable_address(socket.gethostbyname(host) if ":" not in host else host)
    # A store on loopback means a one-host job: the peers are on loopback too.
    return address if not ipaddress.ip_address(address).is_loopback else "127.0.0.1"


class PairTransport:
    """This worker's links to its peers; `connect` one peer at a time, then `send` frames."""

    def __init__(
        self,
        store_factory: Callable[[], dist.Store],
        rank: int,
        *,
        backend: str,
        max_frame_bytes: int,
        on_frame: FrameCallback,
        on_failure: FailureCallback,
        on_refused: RefusedCallback | None = None,
        on_timing: TimingCallback | None = None,
    ) -> None:
        self.store_factory = store_factory
        self.rank = rank
        self.backend = backend
        # The pair's operations never time out: gloo closes a pair whose receive times out,
        # and a pair may legitimately stay quiet for minutes (ps workers never talk to each
        # other). Dead peers are found by connection errors and heartbeats instead, and
        # the rendezvous itself is bounded by the caller (`connect` runs in a thread it
        # waits on for at most the start-up timeout).
        self.timeout = PAIR_OP_TIMEOUT
        self.max_frame_bytes = max_frame_bytes
        self.on_frame = on_frame
        self.on_failure = on_failure
        self.on_refused = on_refused or (lambda peer, why: None)
        self.on_timing = on_timing
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._links: dict[int, _PeerLink] = {}
        self._lock = threading.Lock()
        self._bind: tuple[str | None] | None = None  # gloo_bind_address, found once

    def _gloo(self, prefix: dist.Store, me: int) -> dist.ProcessGroup:
        """A two-rank gloo group whose device listens where the peers can reach it."""
        with self._lock:
            if self._bind is None:
                self._bind = (gloo_bind_address(prefix),)
            address = self._bind[0]
        # torch's stubs type ProcessGroupGloo as a c10d Backend without send/recv (it has
        # them at run time) and lack _Options, the options class its constructor takes.
        if address is None:  # gloo's default (it reads GLOO_SOCKET_IFNAME itself)
            return dist.ProcessGroupGloo(prefix, me, 2, self.timeout)  # type: ignore[return-value]
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = self.timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return dist.ProcessGroupGloo(prefix, me, 2, options)  # type: ignore[return-value]

    def connect(self, peer: int, incarnation: str) -> None:
        """Form the pair group with `peer` (blocks until the peer does the same).

        `incarnation` names this meeting (both sides must agree): a worker that rejoins gets
        a fresh prefix, so it never meets the keys of its previous life.
        """
        lo, hi = sorted((self.rank, peer))
        # A client of its own: the rendezvous blocks in the store until the peer arrives,
        # and connections to several peers proceed in parallel.
        prefix = dist.PrefixStore(f"pair/{lo}-{hi}/{incarnation}/", self.store_factory())
        me = 0 if self.rank == lo else 1
        if self.backend == "nccl":
            # torch's stub: NCCL's `options` has no default (it has one), and it is a Backend.
            group: dist.ProcessGroup = dist.ProcessGroupNCCL(prefix, me, 2)  # type: ignore[call-arg,assignment]
        else:
            group = self._gloo(prefix, me)
        with self._lock:
            self._links[peer] = _PeerLink(self, peer, group)

    def send(
        self,
        peer: int,
        frame: bytes,
        *,
        due: float,
        on_sent: Callable[[], None] | None = None,
        urgent: bool = False,
    ) -> bool:
        """Queue `frame` for `peer`, to leave at `due` (time.monotonic()); False if the link
        is gone. An `urgent` frame (a small acknowledgement) goes ahead of the queued ones:
        it waits behind at most the frame being sent."""
        link = self._links.get(peer)
        if link is None or link.failed:
            return False
        link.outbox.put(_Outgoing(due, frame, on_sent), urgent=urgent)
        return True

    def timed_bytes(self, n: int) -> int:
        """Of a frame of `n` bytes, those that arrive after its first operation: the bytes
        the receiver's timing (`on_timing`: first to last) spans."""
        first = CHUNK if self.device.type == "cpu" else FIRST_BLOCK
        return max(0, n - (first - _LENGTH))

    def has_link(self, peer: int) -> bool:
        link = self._links.get(peer)
        return link is not None and not link.failed

    def drop(self, peer: int) -> None:
        """Stop using the link to `peer` (it left); its threads end on their next operation."""
        link = self._links.pop(peer, None)
        if link is not None:
            link.failed = True
            link.outbox.put(None)
