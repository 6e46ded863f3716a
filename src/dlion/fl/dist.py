"""FL on real processes: one server process (rank 0) and one process per client (1..C).

The server and client behaviours are the sim's (fl/roles.py); only the context differs,
and it is built from the dist engine's parts:
- transport: frames (comm/codec.py) over per-pair gloo groups (comm/transport.py), a
  star: the server has a pair with every client, a client only with the server; paced per
  link and on the server's NIC by comm/shaping.py with the population's bandwidths;
- compute: the real gradient, then a sleep up to what the client's GFLOP/s imply;
- time: every config time (compute, links, latency, availability, task timeout, eval grid,
  max_time) is stretched by `engine.time_scale`, and metrics are in wall seconds;
- membership: the job's TCPStore (hosted by `run_fl_dist`) carries readiness, the start
  time, heartbeats and the stop flag (keys from engines/dist.py). The server drops a
  client when its link fails (a killed process resets its connections at once) or its
  heartbeat is older than `engine.peer_timeout`; the client's task is abandoned, the
  departure recorded, and the server goes on with the others.

The server process evaluates the global model on the eval grid and writes metrics.jsonl,
summary.json, partition.json and global_model.pt; clients log to workers/rank-R.jsonl.
`run_fl_dist` (what `dlion train FL_CONFIG --engine dist` calls) hosts the store, spawns
`python -m dlion.fl.dist CONFIG --out OUT` per rank, applies test faults, and reaps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from dlion.cluster import MBPS
from dlion.comm.codec import BadFrame, decode_from, encode
from dlion.comm.job import Fault, Keys, job_store, pair_label, store_get_json, store_has
from dlion.comm.messages import Control, Message
from dlion.comm.shaping import LinkShaper
from dlion.comm.transport import PairTransport
from dlion.context import ComputeResult
from dlion.errors import BadInput, SimulationError
from dlion.experiment import cached_dataset
from dlion.fl import build_algorithm
from dlion.fl.base import ServerState
from dlion.fl.config import FLConfig, load_fl_config
from dlion.fl.engine import FLRunResult, build_fl_model, client_replica, write_partition
from dlion.fl.population import make_population, split_clients
from dlion.fl.roles import SERVER, TO_SERVER, ClientContext, Server, client
from dlion.models import train_flops_per_sample
from dlion.replica import Replica
from dlion.report import EvalPoint, MetricsLog, time_to_accuracy, write_json_atomic
from dlion.worker import process_main, say

MAX_DIST_CLIENTS = 16  # one process per client on one host: keep it small
_IDLE_RECV_S = 3600.0

StoreFactory = Callable[[], dist.Store]


class _DistFLContext(ClientContext):
    """The server's (rank 0) or one client's context on real time."""

    def __init__(self, proc: FLProcess, replica: Replica | None) -> None:
        self._replica: Replica | None = None
        self._proc = proc
        rank, size, scale = proc.rank, proc.size, proc.scale
        peers = proc.peers
        lat = proc.cfg.clients.latency_ms / 1e3 * scale
        super().__init__(
            rank=rank,
            world=list(range(size)),
            sites=["server"] + ["client"] * (size - 1),
            replica=replica,  # type: ignore[arg-type]  (clients start without a model)
            global_batch=proc.cfg.local.batch_size,
            recv_timeout=_IDLE_RECV_S,
            bandwidth_seed={p: proc.link_rate(p) for p in peers},
            latency=dict.fromkeys(peers, lat),
            header_bytes=proc.cfg.engine.header_bytes,
            seed=proc.cfg.train.seed,
        )
        self.models_held = 0
        self.vanished = 0
        self.compute_wall_s = 0.0

    def now(self) -> float:
        return time.time() - self._proc.t0

    async def compute(self, batch_size: int) -> ComputeResult:
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        measured = time.perf_counter() - start
        self.compute_wall_s += measured
        p = self._proc
        gflops = p.profiles[self.rank - 1].gflops
        target = p.scale * p.flops * batch_size / (gflops * 1e9)
        if target > measured:
            await asyncio.sleep(target - measured)
        return ComputeResult(grad, loss, batch_size, max(target, measured))

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        return await self._proc.transmit(dst, msg)

    # ---------------------------------------------------------------- client parts
    def online_span(self, t: float) -> tuple[float, float]:
        scale = self._proc.scale
        start, end = self._proc.profiles[self.rank - 1].online_span(t / scale)
        return start * scale, end * scale

    @property
    def num_samples(self) -> int:
        return len(self._proc.shards[self.rank - 1])

    def load_model(self, flat: torch.Tensor) -> None:
        if self._replica is None:
            self._replica = self._proc.make_client_replica()
            self.models_held = 1
        self._replica.set_params(flat)

    def free_model(self) -> None:
        self._replica = None
        self.models_held = 0

    def disconnect(self) -> None:
        """Offline (availability): the device's process stays, but its session ends. The
        server is told at once, as the sim's transport does; frames already handed to the
        transport (an upload) still arrive, before the notice."""
        self.free_model()
        self.vanished += 1
        left = Message(self.rank, SERVER, TO_SERVER, Control("left"), self.now())
        self._proc.transport.send(SERVER, encode(left), due=time.monotonic())


class FLProcess:
    """One process of an FL dist job: the server (rank 0) or client `rank`."""

    def __init__(
        self, cfg: FLConfig, rank: int, store_factory: StoreFactory, out_dir: Path
    ) -> None:
        torch.set_num_threads(cfg.engine.threads)
        self.cfg = cfg
        self.rank = rank
        self.size = cfg.clients.count + 1
        self.scale = cfg.engine.time_scale
        self.out_dir = out_dir
        self._store_factory = store_factory
        self.store = store_factory()
        self.t0 = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopped = threading.Event()
        self._ending = False
        d = cfg.data
        self.dataset = cached_dataset(
            d.name, d.path, 0, d.test_fraction, d.num_samples, d.num_features, d.num_classes
        )
        self.shards = split_clients(self.dataset.y_train.numpy(), cfg)
        self.profiles = make_population(cfg)
        self.peers = list(range(1, self.size)) if rank == SERVER else [SERVER]
        self.live: set[int] = set()
        self.departures: list[dict[str, Any]] = []
        self.client_beats: dict[int, dict[str, Any]] = {}
        model = self._build_model()
        self.flops = train_flops_per_sample(model, self.dataset.input_shape)
        self._template = model
        replica: Replica | None = None
        if rank == SERVER:
            g = torch.Generator().manual_seed(cfg.train.seed)
            n_train = len(self.dataset.y_train)
            probe = torch.randperm(n_train, generator=g)[: min(cfg.server.probe_samples, n_train)]
            replica = Replica.from_tensors(
                model,
                self.dataset.x_train[probe],
                self.dataset.y_train[probe],
                lr=cfg.local.lr,
                momentum=0.0,
                weight_decay=0.0,
                seed=cfg.train.seed,
            )
            self._template = self._build_model()
        self.ctx = _DistFLContext(self, replica)
        nic = cfg.server.nic_mbps * MBPS / self.scale if rank == SERVER else None
        self.shaper = LinkShaper({p: self.link_rate(p) for p in self.peers}, nic)
        e = cfg.engine
        self.transport = PairTransport(
            store_factory,
            rank,
            backend="gloo",
            # Idle links wait for frames for a long time: the gloo timeout must outlast the run.
            timeout_s=max(e.startup_timeout, e.peer_timeout, 2 * cfg.train.max_time * self.scale),
            max_frame_bytes=int(e.max_message_mb * 1e6),
            on_frame=self._on_frame,
            on_failure=lambda peer, why: self._from_thread(self._peer_gone, peer, why),
            on_refused=lambda peer, why: self._from_thread(self._reject, peer, why),
        )
        name = "metrics.jsonl" if rank == SERVER else f"workers/rank-{rank}.jsonl"
        (out_dir / "workers").mkdir(parents=True, exist_ok=True)
        (out_dir / name).unlink(missing_ok=True)
        self.log = MetricsLog(out_dir / name)
        self.ctx._on_record = lambda r, event, fields: self.log.write(
            event, t=self.ctx.now(), rank=r, **fields
        )

    def _build_model(self) -> torch.nn.Module:
        return build_fl_model(self.cfg, self.dataset)

    def link_rate(self, peer: int) -> float:
        """Bytes per wall second of the link to `peer` (the client's side of the star)."""
        c = peer if self.rank == SERVER else self.rank
        return self.profiles[c - 1].bandwidth_mbps * MBPS / self.scale

    def make_client_replica(self) -> Replica:
        shard = self.shards[self.rank - 1]
        return client_replica(
            self.cfg, self._template, self.dataset, shard, self.rank, self.ctx.now()
        )

    # ---------------------------------------------------------------- start-up
    def connect(self) -> None:
        """Form the pair groups (the server with every client, in parallel); a client that
        cannot be reached is gone from the start."""
        errors: dict[int, str] = {}

        def one(peer: int) -> None:
            try:
                self.transport.connect(peer, incarnation=pair_label(self.rank, 0, peer, 0))
            except Exception as err:  # recorded; the peer counts as gone
                errors[peer] = str(err).splitlines()[0] if str(err) else type(err).__name__

        threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in self.peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.rank != SERVER and errors:
            raise SimulationError(f"client {self.rank}: cannot reach the server: {errors}")
        self.live = {p for p in self.peers if p not in errors}
        for peer, why in errors.items():
            self.departures.append({"rank": peer, "t": 0.0, "why": f"unreachable: {why}"})
        self.store.set(Keys.ready(self.rank), "1")

    def run(self) -> None:
        self.store.wait([Keys.GO], datetime.timedelta(seconds=self.cfg.engine.startup_timeout))
        self.t0 = float(self.store.get(Keys.T0).decode())
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        monitor = threading.Thread(target=self._monitor, daemon=True, name="monitor")
        monitor.start()
        try:
            main = self._server_main() if self.rank == SERVER else self._client_main()
            loop.run_until_complete(main)
        finally:
            self._stopped.set()
            self.log.close()
            loop.close()

    # ---------------------------------------------------------------- transport
    async def transmit(self, dst: int, msg: Message) -> float:
        frame = encode(msg)
        start = time.monotonic()
        done = self.shaper.reserve(dst, start, len(frame))
        if not self.transport.send(dst, frame, due=done + self.ctx.latency(dst)):
            return 0.0
        await asyncio.sleep(done - start)
        return done - start

    def _on_frame(self, peer: int, frame: memoryview) -> None:
        limit = self.transport.max_frame_bytes
        try:
            msg = decode_from(frame, peer=peer, me=self.rank, max_bytes=limit)
        except BadFrame as err:
            self._from_thread(self._reject, peer, str(err))
        else:
            self._from_thread(self._deliver, msg)

    def _deliver(self, msg: Message) -> None:
        if msg.src in self.live:
            self.ctx.mailbox.deliver(msg)

    def _reject(self, peer: int, why: str) -> None:
        self.ctx.rejected += 1
        self.ctx.record("rejected", src=peer, why=why)

    def _peer_gone(self, peer: int, why: str) -> None:
        """On the loop, once per peer. The server abandons the client's task through the
        same "left" message an availability disconnect sends; a client stops."""
        if peer not in self.live or self._ending:
            return
        self.live.discard(peer)
        self.transport.drop(peer)
        now = self.ctx.now()
        self.log.write("peer_gone", t=now, rank=self.rank, peer=peer, why=why)
        if self.rank != SERVER:
            self._stop()
            return
        self.departures.append({"rank": peer, "t": round(now, 6), "why": why})
        self.ctx.mailbox.deliver(Message(peer, SERVER, TO_SERVER, Control("left"), now))

    def _stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def _from_thread(self, fn: Callable[..., object], *args: object) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _monitor(self) -> None:
        """Heartbeats, the stop flag, and (server) clients whose heartbeat went stale."""
        e = self.cfg.engine
        try:
            store = self._store_factory()
            while not self._stopped.is_set():
                ctx = self.ctx
                beat = {
                    "wall": time.time(),
                    "iterations": ctx.iteration,
                    "bytes_sent": ctx.bytes_sent,
                    "vanished": ctx.vanished,
                    "compute_wall_s": ctx.compute_wall_s,
                    "rejected": ctx.rejected,
                }
                store.set(Keys.heartbeat(self.rank), json.dumps(beat))
                if store_has(store, Keys.STOP):
                    self._from_thread(self._stop)
                for peer in list(self.live):
                    if not store_has(store, Keys.heartbeat(peer)):
                        continue
                    record = store_get_json(store, Keys.heartbeat(peer))
                    if peer != SERVER:
                        self.client_beats[peer] = record
                    if time.time() - float(record["wall"]) > e.peer_timeout:
                        why = f"no heartbeat for {e.peer_timeout:g} s"
                        self._from_thread(self._peer_gone, peer, why)
                self._stopped.wait(e.heartbeat_s)
        except Exception as err:  # the store is gone: the job is over
            self.log.write("store_lost", t=self.ctx.now(), rank=self.rank, why=str(err))
            self._from_thread(self._stop)

    # ---------------------------------------------------------------- roles
    async def _client_main(self) -> None:
        cfg = self.cfg
        self._stop_event = asyncio.Event()
        algo = build_algorithm(
            cfg.algorithm.name, cfg.algorithm.options, cfg.clients.count, cfg.clients.concurrency
        )
        task = asyncio.ensure_future(client(self.ctx, algo, cfg.local))
        stopper = asyncio.ensure_future(self._stop_event.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        self._ending = True
        await _cancel_others()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _server_main(self) -> None:
        cfg, scale = self.cfg, self.scale
        self._stop_event = asyncio.Event()
        assert self.ctx._replica is not None
        replica = self.ctx._replica
        algo = build_algorithm(
            cfg.algorithm.name, cfg.algorithm.options, cfg.clients.count, cfg.clients.concurrency
        )
        state = ServerState(replica.flat)
        probe_cache: dict[int, float] = {}

        def probe_loss() -> float:
            if state.version not in probe_cache:
                probe_cache.clear()
                probe_cache[state.version] = replica.evaluate(replica.x, replica.y)[1]
            return probe_cache[state.version]

        state.probe_loss = probe_loss
        # The server's timeout is a config time: stretched like every other.
        timeout = cfg.server.task_timeout_s * scale
        scaled = cfg.model_copy(
            update={"server": cfg.server.model_copy(update={"task_timeout_s": timeout})}
        )
        server = Server(self.ctx, algo, state, scaled, list(range(1, self.size)))
        x_eval, y_eval = self.dataset.x_test, self.dataset.y_test
        limit = cfg.evaluation.max_test_samples
        if limit is not None and limit < len(x_eval):
            x_eval, y_eval = x_eval[:limit], y_eval[:limit]
        write_partition(self.out_dir / "partition.json", cfg, self.dataset, self.shards)
        self.log.write(
            "start",
            t=0.0,
            scenario=cfg.name,
            algorithm=cfg.algorithm.name,
            seed=cfg.train.seed,
            clients=cfg.clients.count,
            concurrency=cfg.clients.concurrency,
            parameters=server.numel,
            flops_per_sample=self.flops,
            engine="dist",
            time_scale=scale,
        )
        task = asyncio.ensure_future(server.run())
        every, max_wall = cfg.evaluation.every_s * scale, cfg.train.max_time * scale
        points: list[EvalPoint] = []
        eval_wall = 0.0
        last: tuple[torch.Tensor, tuple[float, float]] | None = None
        while True:
            start = time.perf_counter()
            if last is None or not torch.equal(last[0], state.model):
                last = (state.model.clone(), replica.evaluate(x_eval, y_eval))
            eval_wall += time.perf_counter() - start
            acc, loss = last[1]
            now = round(self.ctx.now(), 6)
            point = EvalPoint(now, state.version, acc, acc, loss, self._bytes_sent())
            points.append(point)
            self.log.write("eval", **point.__dict__)
            if task.done() or now >= max_wall:
                break
            if acc >= cfg.train.target_acc and cfg.train.stop_at_target:
                break
            next_eval = min((round(now / every) + 1) * every, max_wall)
            await asyncio.wait([task], timeout=max(0.0, next_eval - self.ctx.now()))
        self._ending = True
        # Clients stop on the flag; the server's own links go quiet with them.
        with contextlib.suppress(Exception):
            self.store.set(Keys.STOP, "1")
        await _cancel_others()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        tta = time_to_accuracy(points, cfg.train.target_acc)
        self.log.write("end", t=points[-1].t, tta_s=tta, server=server.stats.as_dict())
        torch.save(state.model.clone(), self.out_dir / "global_model.pt")
        beats = self.client_beats.values()
        final = points[-1]
        summary: dict[str, Any] = {
            "scenario": cfg.name,
            "strategy": cfg.algorithm.name,
            "seed": cfg.train.seed,
            "engine": "dist",
            "target_acc": cfg.train.target_acc,
            "tta_s": tta,
            "final_acc": final.mean_acc,
            "final_loss": final.mean_loss,
            "time_s": final.t,
            "bytes_sent": final.bytes_sent,
            "final_min_acc": final.min_acc,
            "iterations": final.iteration,
            "clients": cfg.clients.count,
            "concurrency": cfg.clients.concurrency,
            "resumed_from_s": None,
            "server": server.stats.as_dict(),
            "algorithm_stats": algo.stats(),
            # Client counters as of their last heartbeat (engine.heartbeat_s old at most).
            "local_steps": int(sum(b.get("iterations", 0) for b in beats)),
            "vanished": int(sum(b.get("vanished", 0) for b in beats)),
            "departures": self.departures,
            "peak_models_held": None,  # one process per client: at most one model each
            "rejected_messages": sum(server.stats.rejected.values()) + self.ctx.rejected,
            "time_scale": scale,
            "tta_scenario_s": None if tta is None else tta / scale,
            "wall_s": self.ctx.now(),
            "compute_wall_s": float(sum(b.get("compute_wall_s", 0.0) for b in beats)),
            "eval_wall_s": eval_wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        write_json_atomic(self.out_dir / "summary.json", summary)

    def _bytes_sent(self) -> int:
        clients = sum(int(b.get("bytes_sent", 0)) for b in self.client_beats.values())
        return self.ctx.bytes_sent + clients


async def _cancel_others() -> None:
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in leftovers:
        t.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


# ============================================================================ launcher


def run_fl_dist(
    cfg: FLConfig,
    *,
    out_dir: Path,
    faults: list[Fault] | None = None,
) -> FLRunResult:
    """Run one FL job as C + 1 processes on this host; write the sim's files to out_dir.

    `faults`: signals ("KILL" or "TERM") sent to client ranks at config times (`at` is
    stretched by engine.time_scale like every other time). No progress bar: the server's
    metrics.jsonl grows as the run goes."""
    count = cfg.clients.count
    if count > MAX_DIST_CLIENTS:
        raise BadInput(
            f"clients.count: {count} clients; the FL dist engine runs one process per client "
            f"and allows at most {MAX_DIST_CLIENTS} (use the sim for populations)"
        )
    for f in faults or []:
        if not 1 <= f.rank <= count or f.signal == "JOIN":
            raise BadInput(f"fault {f}: only KILL or TERM of a client rank 1..{count}")
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"name": "dist"})})
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl", "global_model.pt"):
        (out_dir / name).unlink(missing_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    e = cfg.engine
    host = dist.TCPStore(
        e.host,
        e.port,
        None,
        True,
        timeout=datetime.timedelta(seconds=e.startup_timeout),
        wait_for_workers=False,
    )
    run_id = secrets.token_hex(6)
    store = job_store(host, run_id)
    logs = out_dir / "workers"
    logs.mkdir(exist_ok=True)
    size = count + 1
    procs: dict[int, subprocess.Popen[bytes]] = {}
    killed: list[dict[str, Any]] = []
    try:
        for rank in range(size):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(size),
                "DLION_STORE": f"{e.host}:{host.port}",
                "DLION_RUN_ID": run_id,
                "OMP_NUM_THREADS": str(e.threads),
            }
            with (logs / f"rank-{rank}.log").open("wb") as log_file:
                procs[rank] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dlion.fl.dist",
                        str(config_path),
                        "--out",
                        str(out_dir),
                    ],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
        deadline = time.time() + e.startup_timeout
        while not all(
            store_has(store, Keys.ready(r)) or procs[r].poll() is not None for r in range(size)
        ):
            if procs[SERVER].poll() is not None or time.time() > deadline:
                break
            time.sleep(0.02)
        t0 = time.time()
        store.set(Keys.T0, repr(t0))
        store.set(Keys.GO, "1")
        pending = sorted(faults or [], key=lambda f: f.at)
        # A stuck server is stopped well after its own deadline.
        limit = cfg.train.max_time * e.time_scale + e.peer_timeout + 60.0
        while procs[SERVER].poll() is None:
            now = time.time() - t0
            while pending and pending[0].at * e.time_scale <= now:
                f = pending.pop(0)
                if procs[f.rank].poll() is None:
                    sig = signal.SIGKILL if f.signal == "KILL" else signal.SIGTERM
                    procs[f.rank].send_signal(sig)
                    killed.append({"rank": f.rank, "t": round(now, 6), "signal": f.signal})
            if now > limit:
                procs[SERVER].kill()
                break
            time.sleep(0.02)
        with contextlib.suppress(Exception):
            store.set(Keys.STOP, "1")
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed: SIGTERM to every live process (a
        # client takes it as an announced leave); _reap then waits and kills stragglers.
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        raise
    finally:
        _reap(procs)
    code = procs[SERVER].returncode
    summary_path = out_dir / "summary.json"
    if code != 0 or not summary_path.exists():
        raise SimulationError(
            f"FL dist: the server exited with code {code} (see {logs}/rank-{SERVER}.log)"
        )
    signalled = {k["rank"] for k in killed}
    # A client that crashed on its own (a traceback in its log, exit 1) is a bug, not a
    # departure to tolerate silently.
    crashed = [r for r, p in procs.items() if r not in signalled and p.returncode == 1]
    if crashed:
        raise SimulationError(
            f"FL dist: client(s) {crashed} failed (see {logs}/rank-{crashed[0]}.log)"
        )
    summary = json.loads(summary_path.read_text())
    summary["signals"] = killed
    write_json_atomic(summary_path, summary)
    events = [
        json.loads(line)
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    points = [
        EvalPoint(**{k: ev[k] for k in EvalPoint.__dataclass_fields__})
        for ev in events
        if ev["event"] == "eval"
    ]
    model = torch.load(out_dir / "global_model.pt", weights_only=True)
    return FLRunResult(summary, points, events, model)


def _reap(procs: dict[int, subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    deadline = time.time() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ============================================================================ process entry


def _run(argv: list[str]) -> int:
    sys.setswitchinterval(0.0005)  # receiver threads hand frames to the loop promptly
    parser = argparse.ArgumentParser(prog="python -m dlion.fl.dist")
    parser.add_argument("config", help="FL config (YAML path or shipped name)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    args = parser.parse_args(argv)
    cfg = load_fl_config(args.config)
    try:
        rank = int(os.environ["RANK"])
        host, _, port = os.environ["DLION_STORE"].rpartition(":")
        run_id = os.environ["DLION_RUN_ID"]
    except (KeyError, ValueError):
        raise BadInput(
            "dlion.fl.dist: RANK, DLION_STORE and DLION_RUN_ID must be set "
            "(`dlion train FL_CONFIG --engine dist` sets them)"
        ) from None
    timeout = datetime.timedelta(seconds=cfg.engine.startup_timeout)

    def factory() -> dist.Store:
        return job_store(dist.TCPStore(host, int(port), None, False, timeout=timeout), run_id)

    say(f"rank {rank}: config loaded")
    proc = FLProcess(cfg, rank, factory, args.out)
    say(f"rank {rank}: data and model built, connecting")
    proc.connect()
    say(f"rank {rank}: connected to {sorted(proc.live)}")
    proc.run()
    say(f"rank {rank}: done")
    return 0


def main() -> None:
    process_main(_run)


if __name__ == "__main__":
    main()
