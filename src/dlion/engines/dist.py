"""The dist engine, worker side: one process runs one worker's strategy on real time.

The strategy is the same coroutine the sim runs; only the context differs:
- compute: the real gradient, then a sleep that stretches the step to what the worker's
  configured capacity and step overhead imply, times the run's time scale (so 6 unequal
  workers can be emulated on a small host; if the real step is already longer it is
  counted as an overrun);
- transport: frames (comm/codec.py) over per-pair torch.distributed groups
  (comm/transport.py), paced per link and NIC by comm/shaping.py; `ctx.allreduce_sum`
  is one native collective on unshaped links only, the sim's ring of these frames on
  shaped ones (engines/collective.py);
- links are measured, not assumed: with transport pacing a send's paced time feeds the
  per-link bandwidth estimate (`ctx.bandwidth`); without it (shaping kernel or none, i.e.
  real links) the receiver times each frame from its first chunk's arrival to its last
  byte and acknowledges (bytes, seconds) to the sender, whose estimate follows the frames
  long enough to time (`reading_counts`), so a link whose rate changes mid-run is
  followed within a few sends. A send there ends when its bytes have crossed, as in the
  sim, not when the kernel took them (comm/delivery.py: the estimate's crossing time,
  then at most one acknowledged frame beyond), so messages sized to the estimate cannot
  queue up in socket buffers. The configured speeds are not even the start: when the
  links are formed, each worker sends every peer four frames of `engine.probe_bytes`
  back to back, and the median of the receiver's rates for the last three (the first
  opens the connection's window and wakes the receiving thread) seeds the estimate.
  Without it a link configured 10x too slow would stay so: the strategy sizes its
  messages to the estimate, and frames too short to time are never timed;
- membership: peers are dropped when their link fails (a killed process resets its
  connections at once), when they announce leaving (SIGTERM), or when their heartbeat in
  the job's store is older than `engine.peer_timeout`. A dropped peer wakes every receive
  waiting on it with PeerGone, exactly as in the sim.

The job's store (a torch.distributed TCPStore hosted by the launcher, or by torchrun's
agent) carries everything that is not training traffic: registration with an optional
shared-secret proof, heartbeats, leave notices, snapshots for evaluation, the stop flag
and each worker's final counters. Key layout, membership and pair rendezvous: comm/job.py;
the process's loop, monitor thread, heartbeat checks and stop: comm/peer_process.py (both
shared with FL on real processes, fl/processes.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dlion.cluster.topology import Cluster
from dlion.cluster.vector_cost import charger_for
from dlion.comm.codec import BadFrame, decode_from, encode
from dlion.comm.collectives import CollectiveFailed, ring_bytes
from dlion.comm.delivery import ACK_MIN_BYTES, DeliveryLedger, reading_counts
from dlion.comm.job import (
    Keys,
    check_membership,
    connect_all,
    member_record,
    pair_label,
    register,
    shared_secret,
    store_get_json,
    store_has,
    store_timeout,
    wait_decision,
)
from dlion.comm.messages import Control, Dense, Message
from dlion.comm.peer_process import PeerProcess, stretched
from dlion.comm.shaping import pacer_rate, worker_shaper
from dlion.context import (
    ComputeResult,
    PaysVectorWorkInRealTime,
    WorkerContext,
    worker_setup,
)
from dlion.core.config import ExperimentConfig
from dlion.core.errors import ConfigError
from dlion.core.registry import get_strategy, parse_options
from dlion.core.timescale import TimeScale
from dlion.engines.collective import CollectiveGroups, group_key
from dlion.engines.dist_checkpoint import WorkerCheckpointer
from dlion.engines.network import all_to_all_rates
from dlion.report import MetricsLog
from dlion.training.experiment import make_replica, prepare

# The receiver's acknowledgement of a timed frame (engine traffic: never in a mailbox).
DELIVERY_TAG = "__delivered"
# The frames each worker sends every peer when the links are formed (engine traffic): one
# to open the connection, then three timed ones whose median seeds the estimate.
PROBE_TAG = "__probe"
PROBE_FRAMES = 4


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("engine.backend: nccl needs CUDA, and none is available here")
    return name


@dataclass
class WorkerCounters:
    """What a worker reports when it ends (final/RANK in the store)."""

    rank: int
    iterations: int
    bytes_sent: int
    messages_sent: int
    rejected: int
    overruns: int
    status: str  # "stopped", "left" or "failed"
    error: str | None = None
    charged_s: float = 0.0  # modelled wall seconds of vector work paid (vector_cost.py)
    charge_overruns: int = 0  # charges whose real work outlasted the modelled time


class DistContext(PaysVectorWorkInRealTime, WorkerContext):
    """WorkerContext on real time. All scenario times are stretched by `time_scale`, so a
    strategy sees consistent units: wall seconds and bytes per wall second."""

    def __init__(self, worker: DistWorker, replica: Any) -> None:
        setup = worker_setup(
            worker.cfg, worker.cluster, worker.rank, worker.expected_rates, worker.time_scale
        )
        super().__init__(replica=replica, **setup)
        self._worker = worker
        self.overruns = 0
        self.vector = charger_for(
            worker.cfg,
            worker.cluster,
            worker.rank,
            worker.flops_per_sample,
            time_scale=worker.time_scale,
        )
        self._deliveries: dict[int, list[float]] = {}  # recent receiver-timed rates per peer

    def now(self) -> float:
        return time.time() - self._worker.t0

    async def compute(self, batch_size: int) -> ComputeResult:
        w = self._worker
        # Capacity traces are in scenario time: the step starts at now / time_scale.
        flops = w.flops_per_sample * batch_size
        scale = w.time_scale
        target = scale.wall(w.cluster.compute_time(self.rank, flops, scale.scenario(self.now())))
        # The gradient is taken now, on the parameters as they are at the call (strategies
        # that serve peers while computing, like AD-PSGD, rely on this).
        (grad, loss), measured = await stretched(lambda: self.replica.gradient(batch_size), target)
        self.overruns += measured >= target
        return ComputeResult(grad, loss, batch_size, max(target, measured))

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        return await self._worker.transmit(dst, msg)

    async def allreduce_sum(
        self, vector: torch.Tensor, tag: str, *, ranks: list[int], epoch: int | None = None
    ) -> torch.Tensor:
        """On unshaped links (`engine.shaping: none`), one torch.distributed all-reduce
        over a group of `ranks` (engines/collective.py). On shaped links the ring of
        point-to-point messages the sim charges (`WorkerContext.allreduce_sum`): its
        chunks are paced (transport) or cross the tc classes and site pipes (kernel) and
        pay each link's latency like every other message. The native collective's bytes
        went around both (the transport's pacers and latencies never saw them): all-reduce
        ran 4.8x faster than the shaped network allows (RESULTS.md sections 12c, 12e)."""
        if self._worker.cfg.engine.shaping != "none":
            return await super().allreduce_sum(vector, tag, ranks=ranks, epoch=epoch)
        return await self._worker.allreduce_sum(vector, sorted(ranks), epoch)

    def observe_delivery(self, peer: int, nbytes: int, seconds: float) -> None:
        """The receiver timed `nbytes` to `peer` arriving over `seconds`: the estimate
        follows the last `engine.delivery_window` such rates (`delivery_estimate`)."""
        window = self._deliveries.setdefault(peer, [])
        first = not window
        window.append(nbytes / seconds)
        engine = self._worker.cfg.engine
        del window[: -engine.delivery_window]
        # The first measurement replaces the configured speed whatever it says.
        previous = None if first else self.bandwidth(peer)
        self.set_bandwidth(peer, delivery_estimate(window, previous, engine.delivery_max_rise))


def delivery_estimate(rates: list[float], previous: float | None, max_rise: float) -> float:
    """A link's bandwidth from its last few receiver-timed rates: the smallest, and at
    most `max_rise` x the `previous` estimate (None: no cap).

    A single reading misleads on a loaded host, mostly one way: a receiver thread that
    wakes late finds part of a frame, or all of it, already buffered, which shortens the
    span and overstates the rate (10-2500x the tc rate at load average 12-16, more than
    half the readings of 20-30 kB frames in some runs); a sender stalled mid-frame
    lengthens it, rarely and less (down to 0.4x). Overstated readings steer the sender to
    frames the link cannot carry in time, which then queue in the kernel; understated
    ones only shrink a few messages. So the estimate is the smallest of the window (a
    slower link is followed at its first timed frame), and since late wake-ups come in
    runs that can fill the window, a rise is followed at most `max_rise` x per
    acknowledgement (a link 10x faster is reached after log(10) / log(max_rise) of them).
    (The median of 3, before: runs of late readings moved the estimate 10-100x and
    slowed DLion 2-3x on a 4 Mbit/s pipe; RESULTS.md section 15b.)"""
    if not rates:
        raise ValueError("delivery_estimate: no rates")
    low = min(rates)
    return low if previous is None else min(low, max_rise * previous)


class DistWorker(PeerProcess):
    """One worker process: store registration, pair links, heartbeats, the strategy loop."""

    ctx: DistContext

    def __init__(
        self,
        cfg: ExperimentConfig,
        rank: int,
        store_factory: Callable[[], dist.Store],
        *,
        run_id: str,
        out_dir: Path | None,
        incarnation: int = 0,
        resume: bool = False,
    ) -> None:
        torch.set_num_threads(cfg.engine.threads)
        super().__init__(rank, store_factory, peer_timeout=cfg.engine.peer_timeout)
        self.cfg = cfg
        self.run_id = run_id
        self.time_scale = TimeScale(cfg.engine.time_scale)
        # The scenario's capacity and bandwidth traces apply here as in the sim (scaled).
        self.cluster = Cluster.from_config(cfg.cluster).with_dynamics(
            cfg.dynamics, cfg.train.max_time
        )
        self.incarnation = incarnation
        self.joining = incarnation > 0
        # What the strategy is told to expect per link, as in the sim (shared pipes split
        # all-to-all).
        self.expected_rates = all_to_all_rates(self.cluster)
        prep = prepare(cfg, self.cluster.size)
        self.flops_per_sample = prep.flops_per_sample
        self.backend = resolve_backend(cfg.engine.backend)
        self.secret = shared_secret(cfg.engine.secret)
        self.t0 = 0.0
        self.ctx = DistContext(self, make_replica(cfg, prep, rank))
        # Periodic checkpoints of this worker's state; `resume`: start from the latest.
        self.checkpointer = WorkerCheckpointer(cfg, rank, out_dir)
        if resume and out_dir is not None:
            self.checkpointer.restore(self.ctx, out_dir, self.cluster.size)
        self.live: set[int] = set()  # members: peers in this worker's view
        self.linked: set[int] = set()  # peers with a working link (members and joiners)
        self.peer_inc: dict[int, int] = dict.fromkeys(range(self.cluster.size), 0)
        self._joins_seen: set[tuple[int, int]] = set()
        self._inflight: dict[int, set[asyncio.Future[None]]] = {}
        # Messages held for their link's latency (kernel shaping, `_arrive`), per peer.
        self._held: dict[int, collections.deque[Message]] = {}
        self._next_snapshot = 0  # the next evaluation point to publish
        self._leaving = False
        self.shaper = worker_shaper(self.cluster, rank, self.time_scale)
        self.collectives = CollectiveGroups(
            store_factory,
            backend=self.backend,
            timeout_s=max(cfg.engine.peer_timeout, cfg.engine.startup_timeout),
        )
        self.transport = self._pair_transport(
            self.backend,
            cfg.engine.max_message_mb,
            # Paced sends measure themselves; real links are timed at the receiver.
            on_timing=None if cfg.engine.shaping == "transport" else self._on_timing,
        )
        name = f"rank-{rank}.jsonl" if incarnation == 0 else f"rank-{rank}.{incarnation}.jsonl"
        events = None if out_dir is None else out_dir / "workers" / name
        if events is not None:
            events.unlink(missing_ok=True)  # a new run in an old directory starts clean
        self.log = MetricsLog(events)
        # Receiver threads: the last frame's (bytes, first, last) per peer, until it is
        # decoded; the last byte of a peer's first probe frame. Sender side: answers to our
        # probes, (bytes, seconds) per peer.
        self._arrival: dict[int, tuple[int, float, float]] = {}
        self._probe_rates: dict[int, list[float]] = {}
        self._probed: dict[int, tuple[int, float]] = {}
        self._probe_answers = threading.Condition()
        # Sends that end when their bytes have crossed (comm/delivery.py): the sender's
        # ledger (on the loop) and the receiver threads' count of acknowledged frames.
        self.delivery = DeliveryLedger()
        self._received: dict[int, int] = {}
        self.ctx.set_hooks(
            lambda r, event, fields: self.log.write(event, t=self.ctx.now(), rank=r, **fields)
        )

    # ---------------------------------------------------------------- start-up
    def register(self) -> None:
        record = member_record(self.secret, self.run_id, self.rank, self.incarnation)
        register(self.store, record, self.rank)

    def connect_peers(self) -> None:
        """Wait for the coordinator to admit this worker, then connect to every admitted
        peer (in parallel); refused, missing or unreachable peers are gone from the start."""
        timeout = self.cfg.engine.startup_timeout
        if wait_decision(self.store, self.rank, self.incarnation, timeout)[0] != "admitted":
            raise PermissionError("refused by the job: shared secret mismatch (DLION_SECRET)")
        if self.joining:
            self._connect_as_joiner(timeout)
            return
        verified: list[int] = []
        for peer in self.ctx.peers():
            decision, _ = wait_decision(self.store, peer, 0, timeout)
            # The coordinator decides; checking the proof here too costs nothing.
            record = store_get_json(self.store, Keys.member(peer)) if decision == "admitted" else {}
            if decision == "admitted" and check_membership(self.secret, self.run_id, peer, record):
                verified.append(peer)
            else:
                self.log.write("refused", t=0.0, rank=self.rank, peer=peer, why=decision)
        errors = self._connect_all(verified)
        self.live = {p for p in verified if p not in errors}
        self.linked = set(self.live)
        for peer in set(self.ctx.peers()) - self.live:
            self.ctx.mailbox.peer_left(peer)
            self.log.write(
                "peer_unreachable",
                t=0.0,
                rank=self.rank,
                peer=peer,
                why=errors.get(peer, "refused or missing"),
            )
        self._probe_links(sorted(self.live))
        self.store.set(Keys.ready(self.rank), "1")

    def _probe_links(self, peers: list[int]) -> None:
        """Seed every link's estimate with a measurement, not the config (module doc):
        PROBE_FRAMES frames of `engine.probe_bytes` to each peer at once, then the
        receivers' answers."""
        size = self.cfg.engine.probe_bytes
        if self.transport.on_timing is None or size == 0 or not peers:
            return
        values = torch.zeros(max(1, size // 4))
        for peer in peers:
            for seq in range(PROBE_FRAMES):
                probe = Message(self.rank, peer, PROBE_TAG, Dense(values), 0.0, {"seq": seq})
                self.transport.send(peer, encode(probe), due=0.0)
        deadline = time.time() + self.cfg.engine.startup_timeout
        with self._probe_answers:
            self._probe_answers.wait_for(
                lambda: all(p in self._probed or not self.transport.has_link(p) for p in peers),
                max(0.0, deadline - time.time()),
            )
            answers = dict(self._probed)
        for peer, (nbytes, seconds) in sorted(answers.items()):
            self.ctx.observe_delivery(peer, nbytes, seconds)
            self.log.write(
                "link_probe",
                t=0.0,
                rank=self.rank,
                peer=peer,
                measured=nbytes / seconds,
                configured=self.time_scale.rate(self.expected_rates[(self.rank, peer)]),
            )

    def _connect_all(self, peers: list[int]) -> dict[int, str]:
        """Form the pair groups with `peers` in parallel; returns {peer: error} for failures."""
        labels = {p: pair_label(self.rank, self.incarnation, p, self.peer_inc[p]) for p in peers}
        return connect_all(self.transport, labels, self.cfg.engine.startup_timeout)

    def _connect_as_joiner(self, timeout: float) -> None:
        """A (re)joining worker: the coordinator's join record names the live members and
        their incarnations; they connect back when they see it."""
        self.store.wait([Keys.join(self.rank)], store_timeout(timeout))
        record = store_get_json(self.store, Keys.join(self.rank))
        members = [int(p) for p in record["live"]]
        self.peer_inc.update({int(p): int(i) for p, i in record["incarnations"].items()})
        errors = self._connect_all(members)
        self.linked = {p for p in members if p not in errors}
        self.log.write("joining", t=0.0, rank=self.rank, peers=sorted(self.linked), errors=errors)

    # ---------------------------------------------------------------- the run
    def run(self) -> WorkerCounters:
        self.store.wait([Keys.GO], store_timeout(self.cfg.engine.startup_timeout))
        self.t0 = float(self.store.get(Keys.T0).decode())
        # `kill -USR1 PID` prints what every coroutine of this worker is waiting on.
        signals = {signal.SIGTERM: self._on_sigterm, signal.SIGUSR1: _dump_tasks}
        status, error = "stopped", None
        try:
            self._run_loop(self._main(), signals)
            if self._leaving:
                status = "left"
        except Exception as err:  # reported to the coordinator, then re-raised
            status, error = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            counters = WorkerCounters(
                self.rank,
                self.ctx.iteration,
                self.ctx.bytes_sent,
                self.ctx.messages_sent,
                self.ctx.rejected,
                self.ctx.overruns,
                status,
                error,
                self.ctx.charged_s,
                self.ctx.charge_overruns,
            )
            with contextlib.suppress(Exception):
                self.store.set(
                    Keys.final(self.rank, self.incarnation), json.dumps(counters.__dict__)
                )
        return counters

    async def _main(self) -> None:
        spec = get_strategy(self.cfg.strategy.name)
        options = parse_options(spec, self.cfg.strategy.options)
        self._stop_signal()  # a stop while joining ends the run
        if self.joining:
            await self._join()

        # Beside the strategy, this worker answers state requests (joiners, regrouping
        # collectives), as in the sim. A task (not a bare gather) so cancelling it at the
        # end cancels both and is not mistaken for a failure.
        async def strategy_and_service() -> None:
            await asyncio.gather(spec.worker(self.ctx, options), self.ctx.serve_state())

        await self._until_stopped(asyncio.ensure_future(strategy_and_service()))

    def _on_sigterm(self) -> None:
        # A clean leave: tell the job first, so peers drop us now instead of after the
        # heartbeat timeout, then stop like any other end of run.
        self._leaving = True
        with contextlib.suppress(Exception):
            self.store.set(
                Keys.left(self.rank, self.incarnation), json.dumps({"t": self.ctx.now()})
            )
        self.log.write("leave", t=self.ctx.now(), rank=self.rank)
        self.stop("sigterm")

    # ---------------------------------------------------------------- transport
    async def transmit(self, dst: int, msg: Message) -> float:
        """Send one message; returns the (wall) seconds it occupied the link."""
        assert self.loop is not None
        frame = encode(msg)
        start = time.monotonic()
        mode = self.cfg.engine.shaping
        if mode == "transport":
            # Bandwidth traces are in scenario time, like the sim's.
            t = self.time_scale.scenario(self.ctx.now())
            for r in self.cluster.route(self.rank, dst):
                self.shaper.set_rate(r, pacer_rate(self.cluster, r, t, self.time_scale))
            return await self._paced_send(dst, frame, start)
        # Kernel shaping: tc shapes the rate, and the link's latency is added by the
        # receiver (`_arrive`), so the frame leaves now and the send ends when its bytes
        # have left, as in the sim, not a latency later.
        fut: asyncio.Future[None] = self.loop.create_future()
        self._inflight.setdefault(dst, set()).add(fut)
        index, crossed = self.delivery.on_send(dst, len(frame), start, self.ctx.bandwidth(dst))

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def sent() -> None:
            self._from_thread(resolve)

        if not self.transport.send(dst, frame, due=start, on_sent=sent):
            self._inflight[dst].discard(fut)
            return 0.0
        try:
            await fut
        finally:
            # _peer_gone may have dropped dst's whole set (waking this future) meanwhile.
            self._inflight.get(dst, set()).discard(fut)
        # gloo reports a send done once the socket took it (up to megabytes of buffer), not
        # once it arrived: the send ends when its bytes have crossed (comm/delivery.py).
        await self._until_crossed(dst, index, crossed)
        # That time comes from the estimate itself: report none, the receiver's
        # acknowledgement feeds the estimate.
        return 0.0

    async def _until_crossed(self, dst: int, index: int, crossed: float) -> None:
        """The rest of a send on a real link: its modelled crossing time, then the window
        of acknowledged frames (comm/delivery.py)."""
        wait = crossed - time.monotonic()
        if wait > 0 and dst in self.linked:
            await asyncio.sleep(wait)
        timeout = self.cfg.engine.peer_timeout
        if dst in self.linked and not await self.delivery.wait(dst, index, timeout):
            self.log.write(
                "ack_timeout",
                t=self.ctx.now(),
                rank=self.rank,
                peer=dst,
                unacknowledged=self.delivery.unacknowledged(dst),
            )

    # ---------------------------------------------------------------- native all-reduce
    async def allreduce_sum(
        self, vector: torch.Tensor, ranks: list[int], epoch: int | None
    ) -> torch.Tensor:
        """Sum `vector` over `ranks` with one collective of the membership's group, formed
        on first use; CollectiveFailed when the membership changes meanwhile or a member
        fails (after waiting up to the peer timeout for the membership to show it)."""
        assert self.loop is not None
        if len(ranks) == 1:
            return vector.clone()
        incs = [(r, self.incarnation if r == self.rank else self.peer_inc[r]) for r in ranks]
        key = group_key(self.ctx.epoch if epoch is None else epoch, incs)
        key += f"#{self.collectives.attempts.get(key, 0)}"
        view = self.ctx.view_change(epoch)
        try:
            group = self.collectives.get(key)
            if group is None:
                form = self.collectives.form
                forming = asyncio.ensure_future(
                    asyncio.to_thread(form, key, ranks.index(self.rank), len(ranks))
                )
                start = time.perf_counter()
                group = await self._collective_step(forming, view, key, "forming the group")
                self.log.write(
                    "collective_group",
                    t=self.ctx.now(),
                    rank=self.rank,
                    key=key,
                    members=ranks,
                    seconds=time.perf_counter() - start,
                )
            # Reduced in place: a buffer of its own, never the caller's tensor.
            out = vector.detach().to(self.collectives.device, dtype=torch.float32, copy=True)
            done: asyncio.Future[None] = self.loop.create_future()
            work = group.allreduce([out])
            work.get_future().add_done_callback(lambda f: self._from_thread(_settle, done, f))
            await self._collective_step(done, view, key, "all-reduce")
            # Counted as the ring the sim charges (what this member sends in it), so byte
            # counts compare across engines.
            pos = ranks.index(self.rank)
            self.ctx.bytes_sent += ring_bytes(
                vector.numel(), len(ranks), pos, self.ctx.header_bytes
            )
            self.ctx.messages_sent += 2 * (len(ranks) - 1)
            return out.cpu()
        finally:
            self.ctx.mailbox.forget(view)

    async def _collective_step(
        self, step: asyncio.Future[Any], view: asyncio.Future[Any], key: str, what: str
    ) -> Any:
        await asyncio.wait([step, view], return_when=asyncio.FIRST_COMPLETED)
        if step.done() and step.exception() is None:
            return step.result()
        self.collectives.retire(key)
        if not step.done():
            # Given up: the step ends on its own (its group's timeout at the latest).
            step.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise CollectiveFailed(f"{what}: the membership changed")
        err = step.exception()
        # A member died (its connections reset): wait until the membership shows it, so
        # the caller re-forms over the survivors instead of meeting the dead one again.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(view), self.cfg.engine.peer_timeout)
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        self.log.write("collective_failed", t=self.ctx.now(), rank=self.rank, what=what, why=why)
        raise CollectiveFailed(f"{what}: {why}")

    def _on_timing(self, peer: int, nbytes: int, first: float, last: float) -> None:
        """Receiver thread: a frame arrived whole; it is acknowledged once decoded."""
        self._arrival[peer] = (nbytes, first, last)

    def _acknowledge(
        self,
        peer: int,
        nbytes: int,
        seconds: float,
        probe: bool = False,
        count: int = 0,
        frame: int = 0,
    ) -> None:
        """Receiver thread: tell `peer` how long `nbytes` of its `frame`-byte frame took
        to arrive (seconds 0: not timed) and how many acknowledged frames of its have
        arrived (`count`)."""
        meta = {"bytes": float(nbytes), "seconds": seconds, "n": float(count)}
        meta["frame"] = float(frame or nbytes)
        if probe:
            meta["probe"] = 1.0
        ack = Message(self.rank, peer, DELIVERY_TAG, Control("delivered"), 0.0, meta)
        self.transport.send(peer, encode(ack), due=0.0, urgent=True)

    def _count_arrival(self, peer: int, arrival: tuple[int, float, float] | None) -> None:
        """Receiver thread: a data frame from `peer` arrived; acknowledge it if it is one
        its sender counts (comm/delivery.py), with its timing if it is large enough."""
        if arrival is None or arrival[0] < ACK_MIN_BYTES:
            return
        nbytes, first, last = arrival
        count = self._received.get(peer, 0) + 1
        self._received[peer] = count
        spanned = self.transport.timed_bytes(nbytes)
        self._acknowledge(peer, spanned, max(0.0, last - first), count=count, frame=nbytes)

    def _answer_probe(self, peer: int, msg: Message, arrival: tuple[int, float, float]) -> None:
        """Receiver thread: the first probe frame opens the connection's window and wakes
        this thread; each later one is timed as any frame (its length's arrival to its
        last byte) and the median of those rates answers the probe (a single frame on a
        loaded host reads 0.5-1.4x the tc rate, either way)."""
        nbytes, first, last = arrival
        seq = int(msg.meta.get("seq", 0))
        if seq == 0 or last <= first:
            return
        rates = self._probe_rates.setdefault(peer, [])
        rates.append(self.transport.timed_bytes(nbytes) / (last - first))
        if seq == PROBE_FRAMES - 1:
            rate = statistics.median(self._probe_rates.pop(peer))
            self._acknowledge(peer, nbytes, nbytes / rate, probe=True)

    def _delivered(self, msg: Message) -> None:
        """On the loop: `msg.src` received (and may have timed) one of our frames: the
        window of sends opens, and the link estimate follows the timing."""
        self.delivery.on_ack(msg.src, int(msg.meta.get("n", 0)))
        nbytes, seconds = int(msg.meta.get("bytes", 0)), float(msg.meta.get("seconds", 0.0))
        frame = int(msg.meta.get("frame", nbytes))
        if nbytes <= 0 or not seconds > 0:
            return
        estimate, least = self.ctx.bandwidth(msg.src), self.cfg.engine.measure_min_bytes
        if not reading_counts(frame, nbytes, estimate, least):
            return
        self.ctx.observe_delivery(msg.src, nbytes, seconds)
        self.log.write(
            "link_rate",
            t=self.ctx.now(),
            wall=time.time(),
            rank=self.rank,
            peer=msg.src,
            measured=nbytes / seconds,
            estimate=self.ctx.bandwidth(msg.src),
        )

    def _on_frame(self, peer: int, frame: memoryview) -> None:
        """Receiver thread: decode off the loop, then deliver (or reject) on it; engine
        traffic (probes, acknowledgements) is handled here."""
        limit = self.transport.max_frame_bytes
        try:
            msg = decode_from(frame, peer=peer, me=self.rank, max_bytes=limit)
        except BadFrame as err:
            # Still acknowledged: its sender counted it.
            self._count_arrival(peer, self._arrival.pop(peer, None))
            self._from_thread(self._reject, peer, str(err))
            return
        arrival = self._arrival.pop(peer, None)
        if msg.tag == PROBE_TAG:
            if arrival is not None:
                self._answer_probe(peer, msg, arrival)
            return
        if msg.tag == DELIVERY_TAG and msg.meta.get("probe"):
            nbytes, seconds = int(msg.meta.get("bytes", 0)), float(msg.meta.get("seconds", 0))
            if nbytes > 0 and seconds > 0:
                with self._probe_answers:
                    self._probed[peer] = (nbytes, seconds)
                    self._probe_answers.notify_all()
            return
        if msg.tag != DELIVERY_TAG:
            self._count_arrival(peer, arrival)
        self._from_thread(self._arrive, msg)

    def _arrive(self, msg: Message) -> None:
        """On the loop: a message arrived whole. On kernel-shaped links it is delivered
        the link's latency after its last byte (tc shapes only the rate; netem, which could
        delay packets, is not available), in arrival order per peer; acknowledgements are
        engine traffic and go at once.

        The latency used to be added at the sender, which held each frame that long before
        handing it to the kernel: the same arrival, but every send then ended a latency
        after the sim's (whose send ends when its bytes have left), and each ring step
        of an all-reduce across a pipe waited one latency more (1.55x the sim's time to
        target on microcloud-hetero; RESULTS.md section 12e)."""
        if self.cfg.engine.shaping != "kernel" or msg.tag == DELIVERY_TAG:
            self._deliver(msg)
            return
        assert self.loop is not None
        self._held.setdefault(msg.src, collections.deque()).append(msg)
        # One timer per message; each delivers the peer's oldest held message, so the
        # order holds even when timers of equal due time fire out of order.
        self.loop.call_later(self.ctx.latency(msg.src), self._release, msg.src)

    def _release(self, peer: int) -> None:
        held = self._held.get(peer)
        if held:
            self._deliver(held.popleft())

    def _deliver(self, msg: Message) -> None:
        # Joiners are linked before they are members: their state requests must get through.
        # (The link itself is the test: the loop may not have recorded a new one yet.)
        if not self.transport.has_link(msg.src):
            return
        if msg.tag == DELIVERY_TAG:
            self._delivered(msg)
        else:
            self.ctx.mailbox.deliver(msg)

    # ---------------------------------------------------------------- membership
    def _peer_gone(self, peer: int, why: str) -> None:
        """On the loop: drop `peer` everywhere, once, and wake whoever waits on it."""
        if peer not in self.linked or self._ending:
            return
        stopping = False
        with contextlib.suppress(Exception):
            stopping = store_has(self.store, Keys.STOP)
        if stopping:  # a peer that saw the stop flag first closed its links: not news
            self.stop("stop")
            return
        self.linked.discard(peer)
        self.transport.drop(peer)
        self._held.pop(peer, None)
        self.delivery.reset(peer)
        if peer not in self.live:  # a joiner that never became a member: nothing to tell
            self.log.write("joiner_lost", t=self.ctx.now(), rank=self.rank, peer=peer, why=why)
            return
        self.live.discard(peer)
        # Epochs count the membership changes this worker has learned of; every survivor
        # learns of the same departures, so they agree on the number.
        self.ctx.peer_left(peer, self.ctx.epoch + 1)
        for fut in self._inflight.pop(peer, set()):
            if not fut.done():
                fut.set_result(None)
        now = self.ctx.now()
        self.log.write("peer_gone", t=now, rank=self.rank, peer=peer, why=why)
        with contextlib.suppress(Exception):
            key = Keys.detected(peer, self.peer_inc[peer], self.rank)
            self.store.set(key, json.dumps({"t": now, "why": why}))

    def _watch(self, store: dist.Store) -> float:
        """Monitor thread: heartbeats, leave notices, stale peers, the stop flag, evaluation
        snapshots."""
        every = self.time_scale.wall(self.cfg.evaluation.every_s)
        now = time.time() - self.t0
        self._beat(store, t=now, iteration=self.ctx.iteration, epoch=self.ctx.epoch)
        if store_has(store, Keys.STOP):
            self._from_thread(self.stop, "stop")
        self._watch_joins(store)
        for peer in list(self.linked):
            if store_has(store, Keys.left(peer, self.peer_inc[peer])):
                self._from_thread(self._peer_gone, peer, "left")
            else:
                self._check_heartbeat(store, peer, self.peer_inc[peer])
        if self.checkpointer.due():
            self._from_thread(self._checkpoint)
        while self._next_snapshot * every <= now:
            self._from_thread(self._publish_snapshot, self._next_snapshot)
            self._next_snapshot += 1
        return min(self.cfg.engine.heartbeat_s, max(0.0, self._next_snapshot * every - now))

    # ---------------------------------------------------------------- joins
    def _watch_joins(self, store: dist.Store) -> None:
        """Monitor thread: connect to joiners the coordinator announced, and admit them as
        members once they have published the iteration they take part from."""
        for r in range(self.cluster.size):
            if r == self.rank or not store_has(store, Keys.join(r)):
                continue
            record = store_get_json(store, Keys.join(r))
            inc = int(record["inc"])
            if self.rank not in record["live"] or (r, inc) in self._joins_seen:
                continue
            if inc > self.peer_inc[r] or r not in self.linked:
                self._joins_seen.add((r, inc))
                threading.Thread(target=self._link_joiner, args=(r, inc), daemon=True).start()
        for r in range(self.cluster.size):
            inc = self.peer_inc[r]
            if r in self.linked and r not in self.live and store_has(store, Keys.since(r, inc)):
                admission = store_get_json(store, Keys.since(r, inc))
                self._from_thread(self._admit, r, int(admission["since"]), int(admission["epoch"]))

    def _link_joiner(self, peer: int, inc: int) -> None:
        label = pair_label(self.rank, self.incarnation, peer, inc)
        self._received[peer] = 0  # a new link: its sender counts from 1 again
        if self._link(peer, label, "joiner_unreachable"):
            self._from_thread(self._linked, peer, inc)

    def _linked(self, peer: int, inc: int) -> None:
        self.peer_inc[peer] = inc
        self.linked.add(peer)
        self.delivery.reset(peer)
        self.log.write("joiner_linked", t=self.ctx.now(), rank=self.rank, peer=peer, inc=inc)

    def _admit(self, peer: int, since: int, epoch: int) -> None:
        """On the loop: `peer` takes part from iteration `since`, in membership `epoch`."""
        if peer in self.live or peer not in self.linked:
            return
        self.live.add(peer)
        self.ctx.peer_joined(peer, since, max(epoch, self.ctx.epoch + 1))
        # The joiner starts sending only after every member has acknowledged: anything it
        # sent before our peer_joined would be dropped as its previous life's leftovers.
        self.store.set(Keys.acked(peer, self.peer_inc[peer], self.rank), "1")
        late = self.ctx.iteration >= since
        self.log.write(
            "peer_joined",
            t=self.ctx.now(),
            rank=self.rank,
            peer=peer,
            since=since,
            at_iteration=self.ctx.iteration,
            late=late,
        )

    async def _join(self) -> None:
        """This worker is (re)joining: take the current model from a live member, then pick
        the iteration it takes part from, far enough ahead that every member hears of it
        first (engine.join_margin_s of the fastest member's progress), and publish it."""
        self.ctx.set_view(dict.fromkeys(self.linked, 0), 0)
        donor = await self.ctx.join_from_live_peer()
        beats = [store_get_json(self.store, Keys.heartbeat(p)) for p in sorted(self.linked)]
        margin_s = self.cfg.engine.join_margin_s
        since = self.ctx.iteration + 1
        epoch = 0
        for beat in beats:
            rate = beat["iteration"] / max(beat["t"], 1e-6)  # the member's iterations per second
            ahead = rate * (time.time() - beat["wall"] + margin_s)
            since = max(since, int(beat["iteration"] + ahead) + 1)
            epoch = max(epoch, int(beat["epoch"]) + 1)
        self.live = set(self.linked)
        self.ctx.set_view(dict.fromkeys(self.live, 0), epoch, since)
        self.ctx.iteration = since
        self.store.set(
            Keys.since(self.rank, self.incarnation),
            json.dumps({"since": since, "epoch": epoch, "donor": donor, "t": self.ctx.now()}),
        )
        self.log.write(
            "join", t=self.ctx.now(), rank=self.rank, donor=donor, since=since, epoch=epoch
        )
        deadline = time.time() + self.cfg.engine.peer_timeout
        waiting = set(self.live)
        while waiting and time.time() < deadline:
            waiting = {
                p
                for p in waiting
                if p in self.linked
                and not store_has(self.store, Keys.acked(self.rank, self.incarnation, p))
            }
            await asyncio.sleep(0.01)
        if waiting:
            self.log.write(
                "join_unacknowledged", t=self.ctx.now(), rank=self.rank, peers=sorted(waiting)
            )

    def _checkpoint(self) -> None:
        """On the loop, between strategy steps: this worker's state to disk."""
        path = self.checkpointer.save(self.ctx)
        self.log.write("checkpoint", t=self.ctx.now(), rank=self.rank, path=str(path))

    def _publish_snapshot(self, k: int) -> None:
        """On the loop, between strategy steps: the replica and counters for eval point k."""
        ctx = self.ctx
        meta = {
            "t": ctx.now(),
            "iteration": float(ctx.iteration),
            "bytes_sent": float(ctx.bytes_sent),
            "rejected": float(ctx.rejected),
        }
        msg = Message(self.rank, -1, "snapshot", Dense(ctx.replica.model_state()), ctx.now(), meta)
        with contextlib.suppress(Exception):
            # torch's stub types the value as str; the store takes bytes (binary-safe).
            self.store.set(Keys.snapshot(k, self.rank), encode(msg))  # type: ignore[arg-type]


def _settle(done: asyncio.Future[None], work: torch.futures.Future[Any]) -> None:
    """On the loop: pass a collective's completion (or error) to its waiting future."""
    if done.done():
        return
    try:
        work.value()
    except Exception as err:  # the collective failed: the caller decides
        done.set_exception(err)
    else:
        done.set_result(None)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=sys.stderr)
    sys.stderr.flush()
