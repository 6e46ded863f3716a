"""FL on real processes: one server process (rank 0) and one process per client (1..C),
on one host or on many.

The server and client behaviours are the sim's (fl/roles.py); only the context differs,
and it is built from the shared runtime parts in comm/:
- transport: frames (comm/codec.py) over per-pair gloo groups (comm/transport.py), a
  star: the server has a pair with every client, a client only with the server; paced per
  link and on the server's NIC by comm/shaping.py with the population's bandwidths;
- compute: the real gradient, then a sleep up to what the client's GFLOP/s imply;
- time: every config time (compute, links, latency, availability, task timeout, eval grid,
  max_time, checkpoint period) is stretched by `engine.time_scale`; metrics are in wall
  seconds;
- the job's store (comm/job.py) carries membership, the start time, heartbeats and the
  stop flag; the process's loop, monitor thread and stop are comm/peer_process.py's.

The server is the job's coordinator. Clients register (`claim_rank`: one process per
client id) with a proof of the shared secret (`engine.secret` or DLION_SECRET: an HMAC
over a fresh nonce, comm/job.py); the server admits or refuses each (the refused process
exits 2 with the reason, the server logs it and goes on), connects to the admitted ones,
and starts the run when every client is connected, refused or known absent, or after
`engine.startup_timeout`. A client may also (re)join a running job: a crashed client's id
is free again once the server has dropped it. The server drops a client when its link
fails or its heartbeat is older than `engine.peer_timeout`; its task is abandoned, the
departure recorded, and the run goes on with the others.

Checkpoints and resume: the server writes its state (fl/checkpoint.py: global model,
version, config time, algorithm state such as FedBuff's buffer, CA2FL's cache, FADAS's
moments or FedCompass's speeds, the norm screen, server counters, bytes sent and
departures) every `checkpoint.every_s` config seconds and when it is stopped by SIGINT or
SIGTERM. `--resume` starts the server from the latest one: the clock, the version counter
and the totals continue from it (the start time T0 is moved back by the time already
run). Clients hold no state between tasks, so they simply start again; tasks in flight at
the checkpoint are lost.

Three ways to run it:
- `dlion train FL_CONFIG --engine dist` (`run_fl_dist`): this host, the launcher hosts the
  store and starts `python -m dlion.fl.processes serve|client` per rank;
- `dlion fl serve CONFIG --listen HOST:PORT` on one host (it hosts the store) and
  `dlion fl client CONFIG --server HOST:PORT --client-id K` on others;
- the same entry points with DLION_STORE/DLION_RUN_ID set (what the launcher does).

The server writes metrics.jsonl, summary.json, partition.json, global_model.pt and
checkpoint/; clients log to workers/rank-R.jsonl where they have an --out directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dlion.cluster.topology import MBPS
from dlion.comm.codec import encode
from dlion.comm.job import (
    Fault,
    Keys,
    StoreFactory,
    claim_rank,
    connect_all,
    decide,
    exit_text,
    first_line,
    host_store,
    job_store,
    last_line,
    launched_job,
    member_record,
    pair_label,
    parse_address,
    reap,
    shared_secret,
    store_client,
    store_factory,
    store_get_json,
    store_has,
    store_timeout,
    undecided,
    wait_decision,
)
from dlion.comm.messages import Control, Message
from dlion.comm.peer_process import PeerProcess, stretched
from dlion.comm.shaping import LinkShaper
from dlion.context import ComputeResult
from dlion.core.config import write_config
from dlion.core.errors import BadInput, SimulationError
from dlion.core.timescale import TimeScale
from dlion.fl import build_algorithm
from dlion.fl.base import ServerState
from dlion.fl.checkpoint import Restored, load_checkpoint, save_checkpoint
from dlion.fl.config import FLConfig, config_hash, load_fl_config
from dlion.fl.job import (
    IDLE_RECV_S,
    FLRunResult,
    FLSetup,
    client_replica,
    server_replica,
    write_partition,
)
from dlion.fl.roles import SERVER, TO_SERVER, ClientContext, Server, client
from dlion.jobs.dist_worker import process_main, say
from dlion.report import (
    EvalPoint,
    MetricsLog,
    read_metrics,
    run_summary,
    time_to_accuracy,
    write_json_atomic,
)
from dlion.training.replica import Replica

MAX_DIST_CLIENTS = 16  # one process per client on one host: keep it small
# Outside any job prefix: what a server hosting its own store publishes for its clients.
RUN_KEY = "dlion/fl-run"


class _DistFLContext(ClientContext):
    """The server's (rank 0) or one client's context on real time."""

    def __init__(self, proc: FLProcess, replica: Replica | None) -> None:
        self._replica: Replica | None = None
        self._proc = proc
        rank, size = proc.rank, proc.size
        peers = proc.peers
        lat = proc.time_scale.wall(proc.cfg.clients.latency_ms / 1e3)
        super().__init__(
            rank=rank,
            world=list(range(size)),
            sites=["server"] + ["client"] * (size - 1),
            replica=replica,  # type: ignore[arg-type]  # clients start without a model
            global_batch=proc.cfg.local.batch_size,
            recv_timeout=IDLE_RECV_S,
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
        p = self._proc
        gflops = p.profiles[self.rank - 1].gflops
        target = p.time_scale.wall(p.flops * batch_size / (gflops * 1e9))
        (grad, loss), measured = await stretched(lambda: self.replica.gradient(batch_size), target)
        self.compute_wall_s += measured
        return ComputeResult(grad, loss, batch_size, max(target, measured))

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        return await self._proc.transmit(dst, msg)

    # ---------------------------------------------------------------- client parts
    def online_span(self, t: float) -> tuple[float, float]:
        scale = self._proc.time_scale
        start, end = self._proc.profiles[self.rank - 1].online_span(scale.scenario(t))
        return scale.wall(start), scale.wall(end)

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


class FLProcess(FLSetup, PeerProcess):
    """One process of an FL dist job: the server (rank 0) or client `rank`."""

    ctx: _DistFLContext

    def __init__(
        self,
        cfg: FLConfig,
        rank: int,
        store_factory: StoreFactory,
        out_dir: Path | None,
        *,
        run_id: str,
        restored: Restored | None = None,
    ) -> None:
        torch.set_num_threads(cfg.engine.threads)
        PeerProcess.__init__(self, rank, store_factory, peer_timeout=cfg.engine.peer_timeout)
        self.cfg = cfg
        self.size = cfg.clients.count + 1
        self.time_scale = TimeScale(cfg.engine.time_scale)
        self.out_dir = out_dir
        self.run_id = run_id
        self.secret = shared_secret(cfg.engine.secret)
        self.restored = restored
        # Wall seconds already run before this (resumed) part: the clock continues.
        self.offset = 0.0 if restored is None else self.time_scale.wall(restored.time)
        self.t0 = time.time()
        # Created now: links formed before the start queue their news on it.
        self.loop = asyncio.new_event_loop()
        FLSetup.__init__(self, cfg)
        self.peers = list(range(1, self.size)) if rank == SERVER else [SERVER]
        self.incarnation = 0  # a client's: which registration of its id this process is
        self.peer_inc: dict[int, int] = {}  # the server's view: each linked client's
        self.live: set[int] = set()
        self.departures: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.joins: list[dict[str, Any]] = []
        self.client_beats: dict[int, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}
        self.signalled = 0  # the signal that stopped this process, if any
        self._decided: set[tuple[int, int]] = set()
        self._connected: dict[int, int] = {}  # server: client -> incarnation linked
        replica = server_replica(cfg, self.dataset, self.model) if rank == SERVER else None
        self.ctx = _DistFLContext(self, replica)
        nic = self.time_scale.rate(cfg.server.nic_mbps * MBPS) if rank == SERVER else None
        self.shaper = LinkShaper({p: self.link_rate(p) for p in self.peers}, nic)
        self.transport = self._pair_transport("gloo", cfg.engine.max_message_mb)
        path = None
        if out_dir is not None:
            path = out_dir / ("metrics.jsonl" if rank == SERVER else f"workers/rank-{rank}.jsonl")
            if rank != SERVER or restored is None:
                path.unlink(missing_ok=True)  # a resumed server appends to its history
        self.log = MetricsLog(path)
        self.ctx.set_hooks(
            lambda r, event, fields: self.log.write(event, t=self.ctx.now(), rank=r, **fields)
        )

    def link_rate(self, peer: int) -> float:
        """Bytes per wall second of the link to `peer` (the client's side of the star)."""
        c = peer if self.rank == SERVER else self.rank
        return self.time_scale.rate(self.profiles[c - 1].bandwidth_mbps * MBPS)

    def make_client_replica(self) -> Replica:
        shard = self.shards[self.rank - 1]
        return client_replica(
            self.cfg, self.template, self.dataset, shard, self.rank, self.ctx.now()
        )

    def _heartbeat(self, store: dist.Store) -> None:
        c = self.ctx
        self._beat(
            store,
            iterations=c.iteration,
            bytes_sent=c.bytes_sent,
            vanished=c.vanished,
            compute_wall_s=c.compute_wall_s,
            rejected=c.rejected,
        )

    # ---------------------------------------------------------------- start-up: server
    def admit(self, store: dist.Store | None = None) -> None:
        """Decide on every new registration; link to the admitted ones in the background
        (a client joining a running job included). `store`: the calling thread's client."""
        store = store or self.store
        for r, inc, record in undecided(store, range(1, self.size), self._decided):
            why = decide(store, self.secret, self.run_id, r, record)
            who = {
                "rank": r,
                "incarnation": inc,
                "host": record.get("host"),
                "pid": record.get("pid"),
            }
            if why:
                self.refused.append({**who, "t": round(self.ctx.now(), 6), "why": why})
                self.log.write("refused", t=self.ctx.now(), **who, why=why)
                continue
            threading.Thread(target=self._link_client, args=(r, inc), daemon=True).start()

    def _link_client(self, peer: int, inc: int) -> None:
        if self._link(peer, pair_label(SERVER, 0, peer, inc), "client_unreachable"):
            self._connected[peer] = inc
            self._from_thread(self._client_linked, peer, inc)

    def _client_linked(self, peer: int, inc: int) -> None:
        """On the loop: a linked client takes part (again, for a new incarnation)."""
        if peer in self.live and self.peer_inc.get(peer) == inc:
            return
        self.peer_inc[peer] = inc
        self.live.add(peer)
        if self._stop_event is not None:  # after the start: a join
            now = self.ctx.now()
            self.joins.append({"rank": peer, "incarnation": inc, "t": round(now, 6)})
            self.log.write("client_joined", t=now, rank=SERVER, peer=peer, incarnation=inc)

    def _waiting_for(self, r: int) -> bool:
        if r in self._connected or store_has(self.store, Keys.absent(r)):
            return False
        if not store_has(self.store, Keys.member(r)):
            return True
        inc = int(store_get_json(self.store, Keys.member(r)).get("incarnation", 0))
        return not store_has(self.store, Keys.refused(r, inc))

    def start_server(self) -> None:
        """Admit and link clients until every one is linked, refused or absent (or the
        start-up timeout), then set the common start (moved back by a resumed run's time)."""
        deadline = time.time() + self.cfg.engine.startup_timeout
        while True:
            self.admit()
            waiting = [r for r in range(1, self.size) if self._waiting_for(r)]
            if not waiting or time.time() > deadline:
                break
            time.sleep(0.05)
        self.live = set(self._connected)
        self.peer_inc = dict(self._connected)
        for r in sorted(set(range(1, self.size)) - self.live):
            why = "refused" if any(x["rank"] == r for x in self.refused) else "never connected"
            self.departures.append({"rank": r, "t": round(self.offset, 6), "why": why})
        self.t0 = time.time() + 0.2 - self.offset
        self.store.set(Keys.T0, repr(self.t0))
        self.store.set(Keys.GO, "1")

    # ---------------------------------------------------------------- start-up: client
    def join(self) -> None:
        """Register (one process per client id), wait for the server's word, link to it."""
        timeout = self.cfg.engine.startup_timeout
        self._heartbeat(self.store)  # fresh before the server can see this process
        record, holder = claim_rank(
            self.store,
            lambda inc: member_record(self.secret, self.run_id, self.rank, inc),
            self.rank,
        )
        if holder is not None:
            raise BadInput(
                f"--client-id {self.rank}: taken by another client process "
                f"(pid {holder.get('pid')} on {holder.get('host')})"
            )
        self.incarnation = int(record["incarnation"])
        decision, why = wait_decision(
            self.store, self.rank, self.incarnation, timeout, absent_counts=False
        )
        if decision == "refused":
            hint = " (engine.secret or DLION_SECRET)" if "secret" in why else ""
            raise PermissionError(f"client {self.rank}: refused by the server: {why}{hint}")
        if decision != "admitted":
            raise SimulationError(f"client {self.rank}: the server did not answer ({why})")
        label = pair_label(self.rank, self.incarnation, SERVER, 0)
        errors = connect_all(self.transport, {SERVER: label}, timeout)
        if errors:
            raise SimulationError(f"client {self.rank}: cannot reach the server: {errors[SERVER]}")
        self.live = {SERVER}

    # ---------------------------------------------------------------- the run
    def run(self) -> None:
        if self.rank != SERVER:
            self._wait_for_start()
            self.t0 = float(self.store.get(Keys.T0).decode())
        # The common start is a moment ahead (a resumed run's clock starts at its offset).
        time.sleep(max(0.0, self.t0 + self.offset - time.time()))
        main = self._server_main() if self.rank == SERVER else self._client_main()
        signals = (signal.SIGINT, signal.SIGTERM)
        self._run_loop(main, {sig: functools.partial(self._on_signal, sig) for sig in signals})

    def _wait_for_start(self) -> None:
        """Client: wait for the server's start, heartbeating meanwhile. The server drops a
        client whose heartbeat is older than `engine.peer_timeout` once the run starts, and
        admitting the other clients can take longer than that."""
        timeout = self.cfg.engine.startup_timeout
        deadline = time.time() + timeout
        next_beat = 0.0
        while not store_has(self.store, Keys.GO):
            now = time.time()
            if now > deadline:
                raise SimulationError(
                    f"client {self.rank}: the server did not start the run within {timeout:g} s"
                )
            if now >= next_beat:
                self._heartbeat(self.store)
                next_beat = now + self.cfg.engine.heartbeat_s
            time.sleep(0.05)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signalled = sig
        self.log.write("signal", t=self.ctx.now(), rank=self.rank, signal=sig.name)
        self.stop("interrupted" if self.rank == SERVER else "left")

    # ---------------------------------------------------------------- transport
    async def transmit(self, dst: int, msg: Message) -> float:
        return await self._paced_send(dst, encode(msg), time.monotonic())

    def _deliver(self, msg: Message) -> None:
        if msg.src in self.live:
            self.ctx.mailbox.deliver(msg)

    def _peer_gone(self, peer: int, why: str) -> None:
        """On the loop, once per peer and incarnation. The server abandons the client's
        task through the same "left" message an availability disconnect sends, and frees
        its id for a new process; a client stops."""
        if peer not in self.live or self._ending:
            return
        self.live.discard(peer)
        self.transport.drop(peer)
        now = self.ctx.now()
        self.log.write("peer_gone", t=now, rank=self.rank, peer=peer, why=why)
        if self.rank != SERVER:
            # The server's links close as it ends the run: after the stop flag, not a loss.
            ended = False
            with contextlib.suppress(Exception):
                ended = store_has(self.store, Keys.STOP)
            self.stop("stop" if ended else "server gone")
            return
        inc = self.peer_inc.get(peer, 0)
        self._connected.pop(peer, None)
        with contextlib.suppress(Exception):
            self.store.set(Keys.left(peer, inc), json.dumps({"t": now, "why": why}))
        self.departures.append({"rank": peer, "incarnation": inc, "t": round(now, 6), "why": why})
        self.ctx.mailbox.deliver(Message(peer, SERVER, TO_SERVER, Control("left"), now))

    def _watch(self, store: dist.Store) -> float:
        """Monitor thread: heartbeats, the stop flag, joins (server) and peers whose
        heartbeat went stale."""
        self._heartbeat(store)
        if self.rank != SERVER and store_has(store, Keys.STOP):
            self._from_thread(self.stop, "stop")
        if self.rank == SERVER:
            self.admit(store)
        for peer in list(self.live):
            record = self._check_heartbeat(store, peer, self.peer_inc.get(peer, 0))
            if record is not None and peer != SERVER:
                self.client_beats[peer] = record
        return self.cfg.engine.heartbeat_s

    # ---------------------------------------------------------------- roles
    async def _client_main(self) -> None:
        cfg = self.cfg
        algo = build_algorithm(
            cfg.algorithm.name, cfg.algorithm.options, cfg.clients.count, cfg.clients.concurrency
        )
        await self._until_stopped(asyncio.ensure_future(client(self.ctx, algo, cfg.local)))

    async def _server_main(self) -> None:
        cfg, scale, out_dir = self.cfg, self.time_scale, self.out_dir
        stop = self._stop_signal()
        replica = self.ctx.replica  # the server's is always there
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
        timeout = scale.wall(cfg.server.task_timeout_s)
        scaled = cfg.model_copy(
            update={"server": cfg.server.model_copy(update={"task_timeout_s": timeout})}
        )
        server = Server(self.ctx, algo, state, scaled, list(range(1, self.size)))
        restored = self.restored
        bytes_before, vanished_before = 0, 0
        if restored is not None:
            restored.apply(state, algo, server)
            bytes_before = int(restored.meta.get("bytes_sent", 0))
            vanished_before = int(restored.meta.get("vanished", 0))
            self.departures[:0] = list(restored.meta.get("departures", []))
        if out_dir is not None:
            write_partition(out_dir / "partition.json", cfg, self.dataset, self.shards)
        self.log.write(
            "start" if restored is None else "resume",
            t=self.ctx.now(),
            **self.start_fields(cfg, server.numel),
            engine="dist",
            time_scale=scale.factor,
            version=state.version,
            linked=sorted(self.live),
        )

        def bytes_sent() -> int:
            clients = sum(int(b.get("bytes_sent", 0)) for b in self.client_beats.values())
            return bytes_before + self.ctx.bytes_sent + clients

        def vanished() -> int:
            return vanished_before + sum(
                int(b.get("vanished", 0)) for b in self.client_beats.values()
            )

        def checkpoint(now: float) -> None:
            if out_dir is None:
                return
            totals = {"bytes_sent": bytes_sent(), "vanished": vanished()}
            began = time.perf_counter()
            path = save_checkpoint(
                out_dir / "checkpoint",
                cfg,
                scale.scenario(now),
                state,
                algo,
                server,
                {**totals, "departures": self.departures},  # type: ignore[dict-item]
            )
            seconds = time.perf_counter() - began
            size = sum(f.stat().st_size for f in path.iterdir())
            self.log.write("checkpoint", t=now, version=state.version, seconds=seconds, bytes=size)

        task = asyncio.ensure_future(server.run())
        stopper = asyncio.ensure_future(stop.wait())
        every, max_wall = scale.wall(cfg.evaluation.every_s), scale.wall(cfg.train.max_time)
        ckpt_every = None if cfg.checkpoint.every_s is None else scale.wall(cfg.checkpoint.every_s)
        next_ckpt = None if ckpt_every is None else (self.offset // ckpt_every + 1) * ckpt_every
        points: list[EvalPoint] = []
        eval_wall = 0.0
        last: tuple[torch.Tensor, tuple[float, float]] | None = None
        reason = "max_time"
        while True:
            start = time.perf_counter()
            if last is None or not torch.equal(last[0], state.model):
                last = (state.model.clone(), replica.evaluate(self.x_eval, self.y_eval))
            eval_wall += time.perf_counter() - start
            acc, loss = last[1]
            now = round(self.ctx.now(), 6)
            point = EvalPoint(now, state.version, acc, acc, loss, bytes_sent())
            points.append(point)
            self.log.write("eval", **point.__dict__)
            if stop.is_set():
                reason = self.stop_reason or "stopped"
                break
            if next_ckpt is not None and now >= next_ckpt - 1e-9 and now < max_wall:
                checkpoint(now)
                next_ckpt = (now // ckpt_every + 1) * ckpt_every  # type: ignore[operator]
            if task.done():
                reason = "server ended"
                break
            if now >= max_wall:
                break
            if acc >= cfg.train.target_acc and cfg.train.stop_at_target:
                reason = "target"
                break
            next_eval = min((round(now / every) + 1) * every, max_wall)
            await asyncio.wait(
                [task, stopper],
                timeout=max(0.0, next_eval - self.ctx.now()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        self._ending = True
        # Clients stop on the flag; the server's own links go quiet with them.
        with contextlib.suppress(Exception):
            self.store.set(Keys.STOP, reason)
        if reason == "interrupted":
            checkpoint(points[-1].t)  # the state as it was stopped: what --resume starts from
        await self._end_tasks(task)
        tta = time_to_accuracy(points, cfg.train.target_acc)
        self.log.write(
            "end", t=points[-1].t, tta_s=tta, reason=reason, server=server.stats.as_dict()
        )
        beats = self.client_beats.values()
        summary: dict[str, Any] = {
            **run_summary(
                points,
                scenario=cfg.name,
                strategy=cfg.algorithm.name,
                seed=cfg.train.seed,
                engine="dist",
                target_acc=cfg.train.target_acc,
            ),
            "clients": cfg.clients.count,
            "concurrency": cfg.clients.concurrency,
            "resumed_from_s": None if restored is None else restored.time,
            "resumed_version": None if restored is None else restored.version,
            "stop_reason": reason,
            "server": server.stats.as_dict(),
            "algorithm_stats": algo.stats(),
            # Client counters as of their last heartbeat (engine.heartbeat_s old at most).
            "local_steps": int(sum(b.get("iterations", 0) for b in beats)),
            "vanished": vanished(),
            "departures": self.departures,
            "refused": self.refused,
            "joins": self.joins,
            "peak_models_held": None,  # one process per client: at most one model each
            "rejected_messages": sum(server.stats.rejected.values()) + self.ctx.rejected,
            "time_scale": scale.factor,
            "tta_scenario_s": None if tta is None else scale.scenario(tta),
            "wall_s": self.ctx.now() - self.offset,
            "compute_wall_s": float(sum(b.get("compute_wall_s", 0.0) for b in beats)),
            "eval_wall_s": eval_wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if out_dir is not None:
            torch.save(state.model.clone(), out_dir / "global_model.pt")
            write_json_atomic(out_dir / "summary.json", summary)
        self.summary = summary


# ============================================================================ launcher


def run_fl_dist(
    cfg: FLConfig,
    *,
    out_dir: Path,
    faults: list[Fault] | None = None,
    resume: bool = False,
    rank_env: dict[int, dict[str, str]] | None = None,
) -> FLRunResult:
    """Run one FL job as C + 1 processes on this host; write the sim's files to out_dir.

    `faults`: signals ("KILL" or "TERM") sent to client ranks at config times (`at` is
    stretched by engine.time_scale like every other time). `resume`: continue from the
    latest checkpoint in out_dir. `rank_env`: extra environment for single ranks (a wrong
    secret in a test). Interrupted (Ctrl-C), the server is stopped first and writes a
    checkpoint to resume from. No progress bar: the server's metrics.jsonl grows as the
    run goes."""
    count = cfg.clients.count
    if count > MAX_DIST_CLIENTS:
        raise BadInput(
            f"clients.count: {count} clients; the FL dist engine runs one process per client "
            f"and allows at most {MAX_DIST_CLIENTS} (use the sim for populations)"
        )
    for f in faults or []:
        if not 1 <= f.rank <= count or f.signal == "JOIN":
            raise BadInput(f"fault {f}: only KILL or TERM of a client rank 1..{count}")
    # The secret travels to the processes in their environment, never in a file.
    secret = shared_secret(cfg.engine.secret)
    engine = cfg.engine.model_copy(update={"name": "dist", "secret": None})
    cfg = cfg.model_copy(update={"engine": engine})
    if resume:
        load_checkpoint(out_dir, cfg)  # CheckpointError before anything is started
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "global_model.pt"):
        (out_dir / name).unlink(missing_ok=True)
    if not resume:  # a new run in an old directory starts clean
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    config_path = write_config(out_dir, cfg)
    e = cfg.engine
    host = host_store(e.host, e.port, e.startup_timeout)
    run_id = secrets.token_hex(6)
    store = job_store(host, run_id)
    logs = out_dir / "workers"
    logs.mkdir(exist_ok=True)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    killed: list[dict[str, Any]] = []
    try:
        for rank in range(count + 1):
            env = {
                **os.environ,
                "DLION_STORE": f"{e.host}:{host.port}",
                "DLION_RUN_ID": run_id,
                "OMP_NUM_THREADS": str(e.threads),
                **({} if secret is None else {"DLION_SECRET": secret}),
                **(rank_env or {}).get(rank, {}),
            }
            role = ["serve"] if rank == SERVER else ["client", "--client-id", str(rank)]
            argv = [sys.executable, "-m", "dlion.fl.processes", *role, str(config_path)]
            argv += ["--out", str(out_dir), *(["--resume"] if resume and rank == SERVER else [])]
            with (logs / f"rank-{rank}.log").open("wb") as log_file:
                # Own session: a Ctrl-C reaches this launcher only, which stops the server
                # first (it checkpoints), then the clients.
                procs[rank] = subprocess.Popen(
                    argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
        while not store_has(store, Keys.GO) and procs[SERVER].poll() is None:
            for r in range(1, count + 1):  # a client that died starting is not waited for
                if procs[r].poll() is not None and not store_has(store, Keys.absent(r)):
                    store.set(Keys.absent(r), exit_text(procs[r].returncode))
            time.sleep(0.02)
        t0 = float(store.get(Keys.T0).decode()) if store_has(store, Keys.T0) else time.time()
        pending = sorted(faults or [], key=lambda f: f.at)
        # A stuck server is stopped well after its own deadline.
        limit = TimeScale(e.time_scale).wall(cfg.train.max_time) + e.peer_timeout + 60.0
        while procs[SERVER].poll() is None:
            now = time.time() - t0
            while pending and TimeScale(e.time_scale).wall(pending[0].at) <= now:
                f = pending.pop(0)
                if procs[f.rank].poll() is None:
                    procs[f.rank].send_signal(f.signum)
                    killed.append({"rank": f.rank, "t": round(now, 6), "signal": f.signal})
            if now > limit:
                procs[SERVER].kill()
                break
            time.sleep(0.02)
        with contextlib.suppress(Exception):
            store.set(Keys.STOP, "1")
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed: the server first (it writes a checkpoint
        # and tells the clients to stop), then any client still running.
        if procs.get(SERVER) is not None and procs[SERVER].poll() is None:
            procs[SERVER].terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs[SERVER].wait(timeout=30)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        raise
    finally:
        reap(procs.values())
    code = procs[SERVER].returncode
    summary_path = out_dir / "summary.json"
    if code != 0 or not summary_path.exists():
        log = logs / f"rank-{SERVER}.log"
        raise SimulationError(
            f"FL dist: the server ended with {exit_text(code)}: {last_line(log)} (see {log})"
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
    summary["client_exit_codes"] = {str(r): p.returncode for r, p in procs.items() if r != SERVER}
    write_json_atomic(summary_path, summary)
    events = read_metrics(out_dir / "metrics.jsonl")
    points = [
        EvalPoint(**{k: ev[k] for k in EvalPoint.__dataclass_fields__})
        for ev in events
        if ev["event"] == "eval"
    ]
    model = torch.load(out_dir / "global_model.pt", weights_only=True)
    return FLRunResult(summary, points, events, model)


# ============================================================================ process entry


def serve(cfg: FLConfig, out_dir: Path, *, listen: str | None, resume: bool) -> int:
    """The server process: host the job's store on `listen` (HOST:PORT) unless a launcher
    gave one, admit clients, run, write the run's files. Returns the exit code."""
    restored = load_checkpoint(out_dir, cfg) if resume else None
    job = launched_job(60.0)
    hosted = None
    if job is None:
        host, port = (cfg.engine.host, cfg.engine.port)
        if listen is not None:
            host, port = parse_address(listen, "--listen")
        hosted = host_store(host, port, cfg.engine.startup_timeout)
        run_id = secrets.token_hex(6)
        record = {"run_id": run_id, "config_hash": config_hash(cfg), "clients": cfg.clients.count}
        hosted.set(RUN_KEY, json.dumps(record))
        job = (store_factory(host, hosted.port, run_id, cfg.engine.startup_timeout), run_id)
        print(
            f"{cfg.name}: FL server on {host}:{hosted.port}, waiting for "
            f"{cfg.clients.count} clients (`dlion fl client CONFIG --server {host}:{hosted.port} "
            "--client-id K`)",
            flush=True,
        )
    factory, run_id = job
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    proc = FLProcess(cfg, SERVER, factory, out_dir, run_id=run_id, restored=restored)
    say("server: data and model built, admitting clients")
    proc.start_server()
    say(f"server: started with clients {sorted(proc.live)}")
    proc.run()
    s = proc.summary
    tta = "not reached" if s["tta_s"] is None else f"{s['tta_s']:.1f} s"
    print(
        f"{cfg.name} {cfg.algorithm.name}: {s['stop_reason']} at {s['time_s']:.1f} wall s, "
        f"version {s['iterations']}, accuracy {s['final_acc']:.2%}, time to target {tta}; "
        f"wrote {out_dir}/summary.json",
        flush=True,
    )
    if hosted is not None:  # the store lives until the clients have seen the stop flag
        time.sleep(2 * cfg.engine.heartbeat_s)
    # Stopped by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM), as a shell does.
    return 128 + int(proc.signalled) if s["stop_reason"] == "interrupted" else 0


def join_as_client(cfg: FLConfig, client_id: int, out_dir: Path | None, server: str | None) -> int:
    """One client process: find the job (a launcher's store or `server` HOST:PORT), register
    with the shared secret's proof, train until the server stops the run."""
    if not 1 <= client_id <= cfg.clients.count:
        raise BadInput(f"--client-id {client_id}: this config has clients 1..{cfg.clients.count}")
    job = launched_job(60.0)
    if job is None:
        if server is None:
            raise BadInput("--server HOST:PORT is required (where `dlion fl serve` listens)")
        host, port = parse_address(server, "--server")
        timeout = cfg.engine.startup_timeout
        try:
            root = store_client(host, port, timeout)
            root.wait([RUN_KEY], store_timeout(timeout))
        except Exception as err:
            raise BadInput(f"--server {server}: no FL server there ({first_line(err)})") from None
        record = json.loads(root.get(RUN_KEY).decode())
        if record.get("config_hash") != config_hash(cfg):
            raise BadInput(
                f"--server {server}: the server runs another config (data, population, model "
                "or algorithm differ); start the client with the server's config and --set"
            )
        job = (store_factory(host, port, record["run_id"], timeout), record["run_id"])
    factory, run_id = job
    proc = FLProcess(cfg, client_id, factory, out_dir, run_id=run_id)
    say(f"client {client_id}: data built, registering")
    proc.join()
    say(f"client {client_id}: linked to the server (incarnation {proc.incarnation})")
    proc.run()
    ctx = proc.ctx
    say(
        f"client {client_id}: done ({proc.stop_reason}): {ctx.iteration} local steps, "
        f"{ctx.bytes_sent / 1e6:.2f} MB sent"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dlion.fl.processes")
    roles = parser.add_subparsers(dest="role", required=True)
    srv = roles.add_parser("serve", help="the FL server (rank 0)")
    srv.add_argument("config")
    srv.add_argument("--out", type=Path, required=True)
    srv.add_argument("--listen", default=None, help="HOST:PORT the job's store binds to")
    srv.add_argument("--resume", action="store_true")
    srv.add_argument("--set", dest="overrides", action="append", default=[])
    cli = roles.add_parser("client", help="one FL client")
    cli.add_argument("config")
    cli.add_argument("--client-id", type=int, required=True)
    cli.add_argument("--server", default=None, help="HOST:PORT of `dlion fl serve`")
    cli.add_argument("--out", type=Path, default=None)
    cli.add_argument("--set", dest="overrides", action="append", default=[])
    return parser


def _run(argv: list[str]) -> int:
    sys.setswitchinterval(0.0005)  # receiver threads hand frames to the loop promptly
    args = _parser().parse_args(argv)
    cfg = load_fl_config(args.config, [*args.overrides, "engine.name=dist"])
    if args.role == "serve":
        return serve(cfg, args.out, listen=args.listen, resume=args.resume)
    return join_as_client(cfg, args.client_id, args.out, args.server)


def main(argv: list[str] | None = None) -> None:
    process_main(_run, argv)


if __name__ == "__main__":
    main()
