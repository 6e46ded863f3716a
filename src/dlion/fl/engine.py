"""The FL sim engine: one server and N clients as coroutines on the virtual-time loop.

Same machinery as engines/sim.py (VirtualTimeLoop, the max-min fair Network, the
WorkerContext base); what differs is the population: a star of links between the
server and every client, clients that come and go, and models that exist only while a
client trains (a 200-client run holds at most `concurrency` client models).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dlion.cluster import MBPS, Cluster, Link, Worker
from dlion.comm.messages import Control, Message
from dlion.context import ComputeResult
from dlion.data import Dataset
from dlion.engines.network import Network
from dlion.engines.sim import _quiet_gc
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.errors import BadInput
from dlion.experiment import cached_dataset
from dlion.fl import build_algorithm
from dlion.fl.base import Algorithm, ServerState
from dlion.fl.checkpoint import load_checkpoint, save_checkpoint
from dlion.fl.config import FLConfig
from dlion.fl.population import ClientProfile, make_population, split_clients
from dlion.fl.roles import SERVER, TO_SERVER, ClientContext, Server, client
from dlion.models import build_model, train_flops_per_sample
from dlion.replica import Replica
from dlion.report import (
    EvalPoint,
    MetricsLog,
    TrainProgress,
    run_summary,
    time_to_accuracy,
    write_json_atomic,
)

# An idle client's receive wakes up this often (virtual s) just to wait again; large so
# that idle clients cost almost no events.
_IDLE_RECV_S = 3600.0


@dataclass
class FLRunResult:
    summary: dict[str, Any]
    points: list[EvalPoint]
    events: list[dict[str, Any]]
    model: torch.Tensor  # final global model


def build_fl_model(cfg: FLConfig, dataset: Dataset) -> torch.nn.Module:
    """The FL job's model, seeded: every process and every replica builds the same one."""
    m = cfg.model
    return build_model(
        m.name,
        dataset.input_shape,
        dataset.num_classes,
        hidden=m.hidden,
        channels=m.channels,
        seed=cfg.train.seed,
    )


def client_replica(
    cfg: FLConfig,
    template: torch.nn.Module,
    dataset: Dataset,
    shard: np.ndarray,
    rank: int,
    now: float,
) -> Replica:
    """A client's model for one task, on its own shard (sim and dist engines alike)."""
    idx = torch.from_numpy(np.asarray(shard, dtype=np.int64))
    loc = cfg.local
    return Replica.from_tensors(
        # A copy of the template, not a fresh seeded build: the weights are overwritten
        # by the task's model at once, and seeding torch per task cost a quarter of
        # a 50-client run's wall time.
        copy.deepcopy(template),
        dataset.x_train[idx],
        dataset.y_train[idx],
        lr=loc.lr,
        momentum=loc.momentum,
        weight_decay=loc.weight_decay,
        # A fresh batch order per task: the seed mixes rank and start time.
        seed=cfg.train.seed * 1_000_003 + rank * 7919 + int(now * 1000),
    )


class _Context(ClientContext):
    """The server (rank 0) and every client use this context; only clients use the
    model-lifecycle and availability parts."""

    def __init__(self, engine: _Engine, rank: int, replica: Replica | None) -> None:
        self._replica: Replica | None = None
        peers = [r for r in range(engine.cluster.size) if r != rank] if rank == SERVER else [SERVER]
        super().__init__(
            rank=rank,
            world=list(range(engine.cluster.size)),
            sites=["server"] + ["client"] * (engine.cluster.size - 1),
            replica=replica,  # type: ignore[arg-type]  # clients start without a model
            global_batch=engine.cfg.local.batch_size,
            recv_timeout=_IDLE_RECV_S,
            bandwidth_seed={p: engine.cluster.link(rank, p).bandwidth for p in peers},
            latency={p: engine.cluster.link(rank, p).latency for p in peers},
            header_bytes=engine.cfg.engine.header_bytes,
            seed=engine.cfg.train.seed,
        )
        self._engine = engine

    def now(self) -> float:
        return self._engine.now()

    async def compute(self, batch_size: int) -> ComputeResult:
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        self._engine.compute_wall_s += time.perf_counter() - start
        seconds = self._engine.cluster.compute_time(self.rank, self._engine.flops * batch_size)
        await asyncio.sleep(seconds)
        return ComputeResult(grad, loss, batch_size, seconds)

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        engine = self._engine
        # A message travels on one connection: if either end disconnects before it has
        # arrived, it is lost (a device back online never receives its old session's task).
        sessions = (engine.sessions[self.rank], engine.sessions[dst])
        seconds = await engine.network.transfer(self.rank, dst, wire_bytes)
        latency = engine.cluster.link(self.rank, dst).latency
        engine.loop.call_later(latency, engine.deliver, self.rank, dst, sessions, msg)
        return seconds

    # ---------------------------------------------------------------- client parts
    def online_span(self, t: float) -> tuple[float, float]:
        return self._engine.profiles[self.rank - 1].online_span(t)

    @property
    def num_samples(self) -> int:
        return len(self._engine.shards[self.rank - 1])

    def load_model(self, flat: torch.Tensor) -> None:
        if self._replica is None:
            self._replica = self._engine.make_client_replica(self.rank)
            self._engine.models_held += 1
            self._engine.peak_models_held = max(
                self._engine.peak_models_held, self._engine.models_held
            )
        self._replica.set_params(flat)

    def free_model(self) -> None:
        if self._replica is not None:
            self._replica = None
            self._engine.models_held -= 1

    def disconnect(self) -> None:
        self.free_model()
        self._engine.vanished += 1
        self._engine.sessions[self.rank] += 1
        # The transport notices the dropped connection: the server hears "left" after the
        # link latency, at no bandwidth cost. The device itself sends nothing.
        left = Message(self.rank, SERVER, TO_SERVER, Control("left"), self.now())
        latency = self._engine.cluster.link(self.rank, SERVER).latency
        self._engine.loop.call_later(latency, self._engine.contexts[SERVER].mailbox.deliver, left)


class _Engine:
    def __init__(self, cfg: FLConfig, loop: asyncio.AbstractEventLoop, t0: float) -> None:
        self.cfg = cfg
        self.loop = loop
        self.t0 = t0  # virtual time at which this (possibly resumed) run starts
        d = cfg.data
        # The same per-process cache as the other engines (fixed split seed 0).
        self.dataset = cached_dataset(
            d.name, d.path, 0, d.test_fraction, d.num_samples, d.num_features, d.num_classes
        )
        self.shards = split_clients(self.dataset.y_train.numpy(), cfg)
        self.profiles: list[ClientProfile] = make_population(cfg)
        self.cluster = _star(cfg, self.profiles)
        self.network = Network(loop, self.cluster)
        self.server_model = self._build_model()
        self.flops = train_flops_per_sample(self.server_model, self.dataset.input_shape)
        self._template = self._build_model()
        x_eval, y_eval = self.dataset.x_test, self.dataset.y_test
        limit = cfg.evaluation.max_test_samples
        if limit is not None and limit < len(x_eval):
            x_eval, y_eval = x_eval[:limit], y_eval[:limit]
        self.x_eval, self.y_eval = x_eval, y_eval
        # (spec) The server's proxy set for FedASMU's loss observations: a seeded sample of
        # the training data, as a server holding a little public data would have.
        g = torch.Generator().manual_seed(cfg.train.seed)
        n_train = len(self.dataset.y_train)
        probe = torch.randperm(n_train, generator=g)[: min(cfg.server.probe_samples, n_train)]
        self.server_replica = Replica.from_tensors(
            self.server_model,
            self.dataset.x_train[probe],
            self.dataset.y_train[probe],
            lr=cfg.local.lr,
            momentum=0.0,
            weight_decay=0.0,
            seed=cfg.train.seed,
        )
        self.contexts: list[_Context] = [_Context(self, SERVER, self.server_replica)]
        self.contexts += [_Context(self, r, None) for r in range(1, self.cluster.size)]
        self.compute_wall_s = 0.0
        self.eval_wall_s = 0.0
        self.models_held = 0
        self.peak_models_held = 0
        self.vanished = 0
        self.sessions = [0] * self.cluster.size  # connection generation per rank
        self._probe_cache: tuple[int, float] | None = None  # (version, proxy-set loss)
        self.bytes_before = 0  # bytes sent before a resumed run's checkpoint
        self.log: MetricsLog
        for ctx in self.contexts:
            ctx._on_record = self._record

    def now(self) -> float:
        return self.t0 + self.loop.time()

    def deliver(self, src: int, dst: int, sessions: tuple[int, int], msg: Message) -> None:
        if (self.sessions[src], self.sessions[dst]) == sessions:
            self.contexts[dst].mailbox.deliver(msg)

    def _build_model(self) -> torch.nn.Module:
        return build_fl_model(self.cfg, self.dataset)

    def make_client_replica(self, rank: int) -> Replica:
        return client_replica(
            self.cfg, self._template, self.dataset, self.shards[rank - 1], rank, self.now()
        )

    def _record(self, rank: int, event: str, fields: dict[str, Any]) -> None:
        self.log.write(event, t=self.now(), rank=rank, **fields)

    def probe_loss(self, state: ServerState) -> float:
        """Loss of the global model on the server's proxy set. Every change of the global
        model makes a new version, so one evaluation per version suffices: a merge's
        "before" is the previous merge's "after"."""
        if self._probe_cache is not None and self._probe_cache[0] == state.version:
            return self._probe_cache[1]
        start = time.perf_counter()
        _, loss = self.server_replica.evaluate(self.server_replica.x, self.server_replica.y)
        self.eval_wall_s += time.perf_counter() - start
        self._probe_cache = (state.version, loss)
        return loss


def _star(cfg: FLConfig, profiles: list[ClientProfile]) -> Cluster:
    """Server (rank 0) and one link per client, both directions; the server's NIC is shared
    by all transfers, so many concurrent downloads slow each other down."""
    lat = cfg.clients.latency_ms / 1e3
    # The server never trains; its capacity is never used for time.
    workers = [Worker(0, "server", 1e12, cfg.server.nic_mbps * MBPS)]
    links: dict[tuple[int, int], Link] = {}
    for p in profiles:
        rank = p.client + 1
        workers.append(Worker(rank, "client", p.gflops * 1e9, None))
        links[(0, rank)] = links[(rank, 0)] = Link(p.bandwidth_mbps * MBPS, lat)
    return Cluster(workers, links)


def run_fl(
    cfg: FLConfig,
    *,
    out_dir: Path | None = None,
    label: str | None = None,
    progress: bool = True,
    description: str | None = None,
    resume: Path | None = None,
) -> FLRunResult:
    """Run one federated job in the sim; write metrics.jsonl, summary.json, partition.json
    (and checkpoints if configured) to out_dir. `resume`: a run directory whose latest
    checkpoint (checked against this config) the server starts from."""
    if cfg.engine.name != "sim":
        raise BadInput(
            f"engine.name={cfg.engine.name}: this runs the FL sim; dist jobs run through "
            "`dlion train --engine dist` (fl/dist.py)"
        )
    torch.set_num_threads(cfg.engine.threads)
    algo = build_algorithm(
        cfg.algorithm.name, cfg.algorithm.options, cfg.clients.count, cfg.clients.concurrency
    )
    restored = load_checkpoint(resume, cfg) if resume is not None else None
    t0 = restored.time if restored is not None else 0.0
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        engine = _Engine(cfg, loop, t0)
        state = ServerState(engine.server_replica.flat)
        state.probe_loss = lambda: engine.probe_loss(state)
        server = Server(
            engine.contexts[SERVER], algo, state, cfg, list(range(1, engine.cluster.size))
        )
        if restored is not None:
            restored.apply(state, algo, server)
            # Run totals continue across the restart.
            engine.bytes_before = int(restored.meta.get("bytes_sent", 0))
            engine.vanished = int(restored.meta.get("vanished", 0))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
            _write_partition(out_dir / "partition.json", engine)
            if restored is None:
                (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        engine.log = MetricsLog(out_dir / "metrics.jsonl" if out_dir is not None else None)
        text = description or f"{cfg.name} {label or cfg.algorithm.name}"
        with engine.log, TrainProgress(text, cfg.train.max_time, enabled=progress) as bar:
            wall_start = time.perf_counter()
            with _quiet_gc():
                points = loop.run_until_complete(
                    _main(engine, server, algo, bar, out_dir, restored is not None)
                )
            wall = time.perf_counter() - wall_start
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    summary: dict[str, Any] = {
        **run_summary(
            points,
            scenario=cfg.name,
            strategy=label or cfg.algorithm.name,
            seed=cfg.train.seed,
            engine="sim",
            target_acc=cfg.train.target_acc,
        ),
        "clients": cfg.clients.count,
        "concurrency": cfg.clients.concurrency,
        "resumed_from_s": t0 if restored is not None else None,
        "server": server.stats.as_dict(),
        "algorithm_stats": algo.stats(),
        "local_steps": sum(c.iteration for c in engine.contexts),
        "vanished": engine.vanished,
        "peak_models_held": engine.peak_models_held,
        "rejected_messages": sum(server.stats.rejected.values()),
        "wall_s": wall,
        "compute_wall_s": engine.compute_wall_s,
        "eval_wall_s": engine.eval_wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if out_dir is not None:
        write_json_atomic(out_dir / "summary.json", summary)
    return FLRunResult(summary, points, engine.log.events, state.model.clone())


def _write_partition(path: Path, engine: _Engine) -> None:
    write_partition(path, engine.cfg, engine.dataset, engine.shards)


def write_partition(path: Path, cfg: FLConfig, dataset: Dataset, shards: list[np.ndarray]) -> None:
    """client -> training-set indices, with sizes and label counts, saved with the run."""
    labels = dataset.y_train.numpy()
    k = dataset.num_classes
    clients = [
        {
            "client": i,
            "rank": i + 1,
            "size": len(idx),
            "label_counts": np.bincount(labels[idx], minlength=k).tolist(),
            "indices": idx.tolist(),
        }
        for i, idx in enumerate(shards)
    ]
    d = cfg.data
    write_json_atomic(
        path,
        {
            "dataset": d.name,
            "scheme": d.partition,
            "alpha": d.alpha,
            "seed": cfg.train.seed,
            "clients": clients,
        },
    )


async def _main(
    engine: _Engine,
    server: Server,
    algo: Algorithm,
    bar: TrainProgress,
    out_dir: Path | None,
    resumed: bool,
) -> list[EvalPoint]:
    cfg = engine.cfg
    engine.log.write(
        "resume" if resumed else "start",
        t=engine.now(),
        scenario=cfg.name,
        algorithm=cfg.algorithm.name,
        seed=cfg.train.seed,
        clients=cfg.clients.count,
        concurrency=cfg.clients.concurrency,
        parameters=server.numel,
        flops_per_sample=engine.flops,
    )
    tasks = [asyncio.ensure_future(server.run())]
    tasks += [asyncio.ensure_future(client(ctx, algo, cfg.local)) for ctx in engine.contexts[1:]]
    failures: list[BaseException] = []
    stop = asyncio.Event()

    def on_done(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            stop.set()

    for task in tasks:
        task.add_done_callback(on_done)
    points: list[EvalPoint] = []
    last_eval: tuple[torch.Tensor, tuple[float, float]] | None = None
    every = cfg.evaluation.every_s
    ckpt_every = cfg.checkpoint.every_s
    next_ckpt = (engine.now() // ckpt_every + 1) * ckpt_every if ckpt_every else None
    try:
        while True:
            start = time.perf_counter()
            model = server.state.model
            if last_eval is None or not torch.equal(last_eval[0], model):
                last_eval = (
                    model.clone(),
                    engine.server_replica.evaluate(engine.x_eval, engine.y_eval),
                )
            engine.eval_wall_s += time.perf_counter() - start
            acc, loss = last_eval[1]
            now = round(engine.now(), 9)
            point = EvalPoint(
                now,
                server.state.version,
                acc,
                acc,
                loss,
                engine.bytes_before + sum(c.bytes_sent for c in engine.contexts),
            )
            points.append(point)
            engine.log.write("eval", **point.__dict__, models_held=engine.models_held)
            bar.update(point.t, point.iteration, acc)
            if next_ckpt is not None and out_dir is not None and now >= next_ckpt - 1e-9:
                totals = {"bytes_sent": point.bytes_sent, "vanished": engine.vanished}
                save_checkpoint(
                    out_dir / "checkpoint", cfg, now, server.state, algo, server, totals
                )
                engine.log.write("checkpoint", t=now, version=server.state.version)
                next_ckpt += ckpt_every  # type: ignore[operator]
            if stop.is_set() or now >= cfg.train.max_time:
                break
            if acc >= cfg.train.target_acc and cfg.train.stop_at_target:
                break
            # Evaluate at exact multiples of every_s, so all algorithms share the time grid.
            next_eval = min((round(now / every) + 1) * every, cfg.train.max_time)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_eval - engine.now())
    finally:
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
    if failures:
        raise failures[0]
    engine.log.write(
        "end",
        t=points[-1].t,
        tta_s=time_to_accuracy(points, cfg.train.target_acc),
        server=json.loads(json.dumps(server.stats.as_dict())),
    )
    return points
