"""The dist engine, worker side: one process runs one worker's strategy on real time.

The strategy is the same coroutine the sim runs; only the context differs:
- compute: the real gradient, then a sleep that stretches the step to what the worker's
  configured capacity implies, times the run's time scale (so 6 unequal workers can be
  emulated on a small host; if the real step is already longer it is counted as an
  overrun);
- transport: frames (comm/codec.py) over per-pair torch.distributed groups
  (engines/transport.py), paced per link and NIC by engines/shaping.py;
- membership: peers are dropped when their link fails (a killed process resets its
  connections at once), when they announce leaving (SIGTERM), or when their heartbeat in
  the job's store is older than `engine.peer_timeout`. A dropped peer wakes every receive
  waiting on it with PeerGone, exactly as in the sim.

The job's store (a torch.distributed TCPStore hosted by the launcher, or by torchrun's
agent) carries everything that is not training traffic: registration with an optional
shared-secret proof, heartbeats, leave notices, snapshots for evaluation, the stop flag
and each worker's final counters. Key layout: see `Keys`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dlion.cluster import Cluster
from dlion.comm.codec import BadFrame, decode, encode
from dlion.comm.messages import Dense, Message
from dlion.config import ExperimentConfig
from dlion.context import ComputeResult, WorkerContext
from dlion.engines.dist_checkpoint import WorkerCheckpointer
from dlion.engines.shaping import LinkShaper
from dlion.engines.transport import PairTransport
from dlion.experiment import make_replica, prepare
from dlion.report import MetricsLog
from dlion.strategies import get_strategy, parse_options


class Keys:
    """Store keys of one job (all under the job's prefix)."""

    T0 = "t0"  # wall-clock start (time.time()) shared by every process
    GO = "go"
    STOP = "stop"

    @staticmethod
    def member(rank: int) -> str:
        return f"member/{rank}"

    @staticmethod
    def admitted(rank: int) -> str:
        return f"admitted/{rank}"

    @staticmethod
    def refused(rank: int) -> str:
        return f"refused/{rank}"

    @staticmethod
    def ready(rank: int) -> str:
        return f"ready/{rank}"

    @staticmethod
    def heartbeat(rank: int) -> str:
        return f"hb/{rank}"

    @staticmethod
    def left(rank: int) -> str:
        return f"left/{rank}"

    @staticmethod
    def detected(peer: int, by: int) -> str:
        return f"detected/{peer}/{by}"

    @staticmethod
    def snapshot(k: int, rank: int) -> str:
        return f"snap/{k}/{rank}"

    @staticmethod
    def final(rank: int) -> str:
        return f"final/{rank}"


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("engine.backend=nccl needs CUDA, and none is available here")
    return name


def job_secret(cfg: ExperimentConfig) -> str | None:
    return os.environ.get("DLION_SECRET") or cfg.engine.secret


def membership_proof(secret: str | None, run_id: str, rank: int, nonce: str) -> str:
    """HMAC of (run, rank, nonce) under the shared secret; the secret never travels."""
    if secret is None:
        return ""
    text = f"{run_id}:{rank}:{nonce}".encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def check_membership(secret: str | None, run_id: str, rank: int, record: dict[str, Any]) -> bool:
    if secret is None:
        return True
    claimed = str(record.get("proof", ""))
    expected = membership_proof(secret, run_id, rank, str(record.get("nonce", "")))
    return hmac.compare_digest(claimed, expected)


def job_store(store: dist.Store, run_id: str) -> dist.Store:
    """The job's keys live under their own prefix, so a shared store (torchrun's) stays tidy."""
    return dist.PrefixStore(f"dlion/{run_id}/", store)


def store_get_json(store: dist.Store, key: str) -> dict[str, Any]:
    return json.loads(store.get(key).decode())


def store_has(store: dist.Store, key: str) -> bool:
    return bool(store.check([key]))


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


class DistContext(WorkerContext):
    """WorkerContext on real time. All scenario times are stretched by `time_scale`, so a
    strategy sees consistent units: wall seconds and bytes per wall second."""

    def __init__(self, worker: DistWorker, replica: Any) -> None:
        cfg, cluster, rank = worker.cfg, worker.cluster, worker.rank
        scale = cfg.engine.time_scale
        peers = [r for r in range(cluster.size) if r != rank]
        super().__init__(
            rank=rank,
            world=list(range(cluster.size)),
            sites=[w.site for w in cluster.workers],
            replica=replica,
            global_batch=cfg.train.batch_per_worker * cluster.size,
            recv_timeout=cfg.engine.recv_timeout * scale,
            bandwidth_seed={p: cluster.link(rank, p).bandwidth / scale for p in peers},
            latency={p: cluster.link(rank, p).latency * scale for p in peers},
            bandwidth_ema=cfg.engine.bandwidth_ema,
            header_bytes=cfg.engine.header_bytes,
            seed=cfg.train.seed,
        )
        self._worker = worker
        self.overruns = 0

    def now(self) -> float:
        return time.time() - self._worker.t0

    async def compute(self, batch_size: int) -> ComputeResult:
        # The gradient is taken now, on the parameters as they are at the call (strategies
        # that serve peers while computing, like AD-PSGD, rely on this).
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        measured = time.perf_counter() - start
        w = self._worker
        target = w.scale * w.cluster.compute_time(self.rank, w.flops_per_sample * batch_size)
        if target > measured:
            await asyncio.sleep(target - measured)
        else:
            self.overruns += 1
        return ComputeResult(grad, loss, batch_size, max(target, measured))

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        return await self._worker.transmit(dst, msg)


class DistWorker:
    """One worker process: store registration, pair links, heartbeats, the strategy loop."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        rank: int,
        store_factory: Callable[[], dist.Store],
        *,
        run_id: str,
        out_dir: Path | None,
        resume: bool = False,
    ) -> None:
        torch.set_num_threads(cfg.engine.threads)
        self.cfg = cfg
        self.rank = rank
        # One store client per thread that talks to the store: a client serializes its
        # calls, and a rendezvous blocked in one must not hold up heartbeats or another.
        self._store_factory = store_factory
        self.store = store_factory()
        self.run_id = run_id
        self.scale = cfg.engine.time_scale
        self.cluster = Cluster.from_config(cfg.cluster)
        prep = prepare(cfg, self.cluster.size)
        self.flops_per_sample = prep.flops_per_sample
        self.backend = resolve_backend(cfg.engine.backend)
        self.secret = job_secret(cfg)
        self.t0 = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ctx = DistContext(self, make_replica(cfg, prep, rank))
        # Periodic checkpoints of this worker's state; `resume`: start from the latest.
        self.checkpointer = WorkerCheckpointer(cfg, rank, out_dir)
        if resume and out_dir is not None:
            self.checkpointer.restore(self.ctx, out_dir, self.cluster.size)
        self.live: set[int] = set()
        self._inflight: dict[int, set[asyncio.Future[None]]] = {}
        self._stop_reason: str | None = None
        self._stopped = threading.Event()
        self._leaving = False
        worker = self.cluster.workers[rank]
        self.shaper = LinkShaper(
            {p: self.cluster.link(rank, p).bandwidth / self.scale for p in self.ctx.peers()},
            None if worker.nic_bytes_per_s is None else worker.nic_bytes_per_s / self.scale,
        )
        self.transport = PairTransport(
            store_factory,
            rank,
            backend=self.backend,
            timeout_s=max(cfg.engine.peer_timeout, cfg.engine.startup_timeout),
            max_frame_bytes=int(cfg.engine.max_message_mb * 1e6),
            on_frame=self._on_frame,
            on_failure=lambda peer, why: self._from_thread(self._peer_gone, peer, why),
            on_refused=lambda peer, why: self._from_thread(self._reject, peer, why),
        )
        events = None if out_dir is None else out_dir / "workers" / f"rank-{rank}.jsonl"
        if events is not None:
            events.unlink(missing_ok=True)  # a new run in an old directory starts clean
        self.log = MetricsLog(events)
        self.ctx._on_record = lambda r, event, fields: self.log.write(
            event, t=self.ctx.now(), rank=r, **fields
        )

    # ---------------------------------------------------------------- start-up
    def register(self) -> None:
        nonce = secrets.token_hex(16)
        record = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "nonce": nonce,
            "proof": membership_proof(self.secret, self.run_id, self.rank, nonce),
        }
        self.store.set(Keys.member(self.rank), json.dumps(record))

    def _decision(self, rank: int, timeout: float) -> str:
        """The coordinator's word on `rank`: "admitted", "refused" or "missing"."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if store_has(self.store, Keys.admitted(rank)):
                return "admitted"
            if store_has(self.store, Keys.refused(rank)):
                return "refused"
            time.sleep(0.02)
        return "missing"

    def connect_peers(self) -> None:
        """Wait for the coordinator to admit this worker, then connect to every admitted
        peer (in parallel); refused, missing or unreachable peers are gone from the start."""
        timeout = self.cfg.engine.startup_timeout
        if self._decision(self.rank, timeout) != "admitted":
            raise PermissionError("refused by the job: shared secret mismatch (DLION_SECRET)")
        verified: list[int] = []
        for peer in self.ctx.peers():
            decision = self._decision(peer, timeout)
            # The coordinator decides; checking the proof here too costs nothing.
            record = store_get_json(self.store, Keys.member(peer)) if decision == "admitted" else {}
            if decision == "admitted" and check_membership(self.secret, self.run_id, peer, record):
                verified.append(peer)
            else:
                self.log.write("refused", t=0.0, rank=self.rank, peer=peer, why=decision)
        errors: dict[int, str] = {}

        def connect(peer: int) -> None:
            try:
                self.transport.connect(peer, incarnation="0")
            except Exception as err:  # recorded; the peer counts as gone
                errors[peer] = str(err).splitlines()[0] if str(err) else type(err).__name__

        threads = [threading.Thread(target=connect, args=(p,), daemon=True) for p in verified]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.live = {p for p in verified if p not in errors}
        for peer in set(self.ctx.peers()) - self.live:
            self.ctx.mailbox.peer_left(peer)
            self.log.write(
                "peer_unreachable",
                t=0.0,
                rank=self.rank,
                peer=peer,
                why=errors.get(peer, "refused or missing"),
            )
        self.store.set(Keys.ready(self.rank), "1")

    # ---------------------------------------------------------------- the run
    def run(self) -> WorkerCounters:
        self.store.wait([Keys.GO], _seconds(self.cfg.engine.startup_timeout))
        self.t0 = float(self.store.get(Keys.T0).decode())
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        monitor = threading.Thread(target=self._monitor, daemon=True, name="monitor")
        monitor.start()
        status, error = "stopped", None
        try:
            loop.run_until_complete(self._main())
            if self._leaving:
                status = "left"
        except Exception as err:  # reported to the coordinator, then re-raised
            status, error = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            self._stopped.set()
            counters = WorkerCounters(
                self.rank,
                self.ctx.iteration,
                self.ctx.bytes_sent,
                self.ctx.messages_sent,
                self.ctx.rejected,
                self.ctx.overruns,
                status,
                error,
            )
            with contextlib.suppress(Exception):
                self.store.set(Keys.final(self.rank), json.dumps(counters.__dict__))
            self.log.close()
            loop.close()
        return counters

    async def _main(self) -> None:
        spec = get_strategy(self.cfg.strategy.name)
        options = parse_options(spec, self.cfg.strategy.options)
        self._stop_event = asyncio.Event()
        # Beside the strategy, this worker answers state requests (joiners, regrouping
        # collectives), as in the sim.
        task = asyncio.ensure_future(
            asyncio.gather(spec.worker(self.ctx, options), self.ctx.serve_state())
        )
        stopper = asyncio.ensure_future(self._stop_event.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in leftovers:
            t.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    def stop(self, reason: str) -> None:
        """Called on the loop: end the strategy (stop flag, or this worker is leaving)."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop_event.set()

    def _on_sigterm(self) -> None:
        # A clean leave: tell the job first, so peers drop us now instead of after the
        # heartbeat timeout, then stop like any other end of run.
        self._leaving = True
        with contextlib.suppress(Exception):
            self.store.set(Keys.left(self.rank), json.dumps({"t": self.ctx.now()}))
        self.log.write("leave", t=self.ctx.now(), rank=self.rank)
        self.stop("sigterm")

    # ---------------------------------------------------------------- transport
    async def transmit(self, dst: int, msg: Message) -> float:
        """Send one message; returns the (wall) seconds it occupied the link."""
        assert self.loop is not None
        frame = encode(msg)
        start = time.monotonic()
        mode = self.cfg.engine.shaping
        latency = self.ctx.latency(dst) if mode != "none" else 0.0
        if mode == "transport":
            done = self.shaper.reserve(dst, start, len(frame))
            if not self.transport.send(dst, frame, due=done + latency):
                return 0.0
            await asyncio.sleep(done - start)
            return done - start
        fut: asyncio.Future[None] = self.loop.create_future()
        self._inflight.setdefault(dst, set()).add(fut)

        def sent() -> None:
            self._from_thread(lambda: fut.done() or fut.set_result(None))

        if not self.transport.send(dst, frame, due=start + latency, on_sent=sent):
            self._inflight[dst].discard(fut)
            return 0.0
        try:
            await fut
        finally:
            self._inflight[dst].discard(fut)
        return max(0.0, time.monotonic() - start - latency)

    def _on_frame(self, peer: int, frame: bytes) -> None:
        """Receiver thread: decode off the loop, then deliver (or reject) on it."""
        try:
            msg = decode(frame, self.transport.max_frame_bytes)
        except BadFrame as err:
            self._from_thread(self._reject, peer, str(err))
            return
        if msg.src != peer or msg.dst != self.rank:
            self._from_thread(self._reject, peer, f"frame claims {msg.src}->{msg.dst}")
            return
        self._from_thread(self._deliver, msg)

    def _deliver(self, msg: Message) -> None:
        if msg.src in self.live:
            self.ctx.mailbox.deliver(msg)

    def _reject(self, peer: int, why: str) -> None:
        self.ctx.rejected += 1
        self.ctx.record("rejected", src=peer, why=why)

    # ---------------------------------------------------------------- membership
    def _peer_gone(self, peer: int, why: str) -> None:
        """On the loop: drop `peer` everywhere, once, and wake whoever waits on it."""
        if peer not in self.live:
            return
        self.live.discard(peer)
        self.transport.drop(peer)
        # Epochs count the membership changes this worker has learned of; every survivor
        # learns of the same departures, so they agree on the number.
        self.ctx._peer_left(peer, self.ctx.epoch + 1)
        for fut in self._inflight.pop(peer, set()):
            if not fut.done():
                fut.set_result(None)
        now = self.ctx.now()
        self.log.write("peer_gone", t=now, rank=self.rank, peer=peer, why=why)
        with contextlib.suppress(Exception):
            self.store.set(Keys.detected(peer, self.rank), json.dumps({"t": now, "why": why}))

    def _from_thread(self, fn: Callable[..., object], *args: object) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to do
                loop.call_soon_threadsafe(fn, *args)

    def _monitor(self) -> None:
        """Heartbeats, leave notices, stale peers, the stop flag, evaluation snapshots."""
        every = self.cfg.evaluation.every_s * self.scale
        beat = self.cfg.engine.heartbeat_s
        timeout = self.cfg.engine.peer_timeout
        next_snapshot = 0
        try:
            store = self._store_factory()
            while not self._stopped.is_set():
                now = time.time() - self.t0
                store.set(Keys.heartbeat(self.rank), repr(time.time()))
                if store_has(store, Keys.STOP):
                    self._from_thread(self.stop, "stop")
                for peer in list(self.live):
                    if store_has(store, Keys.left(peer)):
                        self._from_thread(self._peer_gone, peer, "left")
                    elif store_has(store, Keys.heartbeat(peer)):
                        seen = float(store.get(Keys.heartbeat(peer)).decode())
                        if time.time() - seen > timeout:
                            self._from_thread(
                                self._peer_gone, peer, f"no heartbeat for {timeout:g} s"
                            )
                if self.checkpointer.due():
                    self._from_thread(self._checkpoint)
                while next_snapshot * every <= now:
                    self._from_thread(self._publish_snapshot, next_snapshot)
                    next_snapshot += 1
                wake = min(beat, max(0.0, next_snapshot * every - now))
                self._stopped.wait(wake)
        except Exception as err:  # the store is gone: the job is over
            self.log.write("store_lost", t=self.ctx.now(), rank=self.rank, why=str(err))
            self._from_thread(self.stop, "store lost")

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
        msg = Message(self.rank, -1, "snapshot", Dense(ctx.replica.params()), ctx.now(), meta)
        with contextlib.suppress(Exception):
            self.store.set(Keys.snapshot(k, self.rank), encode(msg))


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
