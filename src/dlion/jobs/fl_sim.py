"""The FL job in the sim: one server and N clients as coroutines on the virtual runtime
(engines/runtime.py), the same clock, network and run scaffold as the strategy job.

What is FL's own: the population (a star of links between the server and every client,
fl/job.py), clients that come and go (a message is lost if either end's connection
changed while it travelled), models that exist only while a client trains (a 200-client
run holds at most `concurrency` client models), the global model's evaluation and the
server's checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from dlion.comm.messages import Control, Message
from dlion.core.config import write_config
from dlion.core.errors import BadInput
from dlion.engines.runtime import VirtualContext, VirtualRuntime, virtual_runtime
from dlion.fl import build_algorithm
from dlion.fl.base import Algorithm, ServerState
from dlion.fl.checkpoint import load_checkpoint, save_checkpoint
from dlion.fl.config import FLConfig
from dlion.fl.job import (
    IDLE_RECV_S,
    FLRunResult,
    FLSetup,
    client_replica,
    server_replica,
    star_cluster,
    write_partition,
)
from dlion.fl.roles import SERVER, TO_SERVER, ClientContext, Server, client
from dlion.report import (
    EvalPoint,
    MetricsLog,
    TrainProgress,
    run_summary,
    time_to_accuracy,
    write_json_atomic,
)
from dlion.training.replica import Replica


class _Context(VirtualContext, ClientContext):
    """The server (rank 0) and every client use this context; only clients use the
    model-lifecycle and availability parts."""

    def __init__(self, job: _FLJob, rank: int, replica: Replica | None) -> None:
        self._replica: Replica | None = None
        size = job.cluster.size
        peers = [r for r in range(size) if r != rank] if rank == SERVER else [SERVER]
        super().__init__(
            job.runtime,
            rank=rank,
            world=list(range(size)),
            sites=["server"] + ["client"] * (size - 1),
            replica=replica,  # (clients start without a model)
            global_batch=job.cfg.local.batch_size,
            recv_timeout=IDLE_RECV_S,
            bandwidth_seed={p: job.cluster.link(rank, p).bandwidth for p in peers},
            latency={p: job.cluster.link(rank, p).latency for p in peers},
            header_bytes=job.cfg.engine.header_bytes,
            seed=job.cfg.train.seed,
        )
        self._job = job

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        job = self._job
        # A message travels on one connection: if either end disconnects before it has
        # arrived, it is lost (a device back online never receives its old session's task).
        sessions = (job.sessions[self.rank], job.sessions[dst])
        seconds = await job.runtime.network.transfer(self.rank, dst, wire_bytes)
        latency = job.cluster.link(self.rank, dst).latency
        job.runtime.loop.call_later(latency, job.deliver, self.rank, dst, sessions, msg)
        return seconds

    # ---------------------------------------------------------------- client parts
    def online_span(self, t: float) -> tuple[float, float]:
        return self._job.profiles[self.rank - 1].online_span(t)

    @property
    def num_samples(self) -> int:
        return len(self._job.shards[self.rank - 1])

    def load_model(self, flat: torch.Tensor) -> None:
        job = self._job
        if self._replica is None:
            self._replica = job.make_client_replica(self.rank)
            job.models_held += 1
            job.peak_models_held = max(job.peak_models_held, job.models_held)
        self._replica.set_params(flat)

    def free_model(self) -> None:
        if self._replica is not None:
            self._replica = None
            self._job.models_held -= 1

    def disconnect(self) -> None:
        job = self._job
        self.free_model()
        job.vanished += 1
        job.sessions[self.rank] += 1
        # The transport notices the dropped connection: the server hears "left" after the
        # link latency, at no bandwidth cost. The device itself sends nothing.
        left = Message(self.rank, SERVER, TO_SERVER, Control("left"), self.now())
        latency = job.cluster.link(self.rank, SERVER).latency
        job.runtime.loop.call_later(latency, job.contexts[SERVER].mailbox.deliver, left)


class _FLJob(FLSetup):
    """The population (server, clients, star links) and its state on the runtime."""

    def __init__(self, cfg: FLConfig, t0: float) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.cluster = star_cluster(cfg, self.profiles)
        self.server_replica = server_replica(cfg, self.dataset, self.model)
        self.t0 = t0  # virtual time at which this (possibly resumed) run starts
        self.models_held = 0
        self.peak_models_held = 0
        self.vanished = 0
        self.sessions = [0] * self.cluster.size  # connection generation per rank
        self._probe_cache: tuple[int, float] | None = None  # (version, proxy-set loss)
        self.bytes_before = 0  # bytes sent before a resumed run's checkpoint

    def start(self, runtime: VirtualRuntime) -> None:
        """Put the population on `runtime`: one context per rank."""
        self.runtime = runtime
        self.contexts: list[_Context] = [_Context(self, SERVER, self.server_replica)]
        self.contexts += [_Context(self, r, None) for r in range(1, self.cluster.size)]
        for ctx in self.contexts:
            ctx.set_hooks(runtime.record)

    def deliver(self, src: int, dst: int, sessions: tuple[int, int], msg: Message) -> None:
        if (self.sessions[src], self.sessions[dst]) == sessions:
            self.contexts[dst].mailbox.deliver(msg)

    def make_client_replica(self, rank: int) -> Replica:
        return client_replica(
            self.cfg, self.template, self.dataset, self.shards[rank - 1], rank, self.runtime.now()
        )

    def probe_loss(self, state: ServerState) -> float:
        """Loss of the global model on the server's proxy set. Every change of the global
        model makes a new version, so one evaluation per version suffices: a merge's
        "before" is the previous merge's "after"."""
        if self._probe_cache is not None and self._probe_cache[0] == state.version:
            return self._probe_cache[1]
        start = time.perf_counter()
        _, loss = self.server_replica.evaluate(self.server_replica.x, self.server_replica.y)
        self.runtime.eval_wall_s += time.perf_counter() - start
        self._probe_cache = (state.version, loss)
        return loss


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
            "`dlion train --engine dist` (fl/processes.py)"
        )
    torch.set_num_threads(cfg.engine.threads)
    algo = build_algorithm(
        cfg.algorithm.name, cfg.algorithm.options, cfg.clients.count, cfg.clients.concurrency
    )
    restored = load_checkpoint(resume, cfg) if resume is not None else None
    t0 = restored.time if restored is not None else 0.0
    job = _FLJob(cfg, t0)
    with virtual_runtime(job.cluster, flops_per_sample=job.flops, t0=t0) as runtime:
        job.start(runtime)
        state = ServerState(job.server_replica.flat)
        state.probe_loss = lambda: job.probe_loss(state)
        server = Server(job.contexts[SERVER], algo, state, cfg, list(range(1, job.cluster.size)))
        if restored is not None:
            restored.apply(state, algo, server)
            # Run totals continue across the restart.
            job.bytes_before = int(restored.meta.get("bytes_sent", 0))
            job.vanished = int(restored.meta.get("vanished", 0))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, cfg)
            write_partition(out_dir / "partition.json", cfg, job.dataset, job.shards)
            if restored is None:
                (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        runtime.log = MetricsLog(out_dir / "metrics.jsonl" if out_dir is not None else None)
        points = runtime.run(
            lambda bar: _main(job, server, algo, bar, out_dir, restored is not None),
            text=description or f"{cfg.name} {label or cfg.algorithm.name}",
            max_time=cfg.train.max_time,
            progress=progress,
        )
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
        "local_steps": sum(c.iteration for c in job.contexts),
        "vanished": job.vanished,
        "peak_models_held": job.peak_models_held,
        "rejected_messages": sum(server.stats.rejected.values()),
        **runtime.cost_fields(),
    }
    if out_dir is not None:
        write_json_atomic(out_dir / "summary.json", summary)
    return FLRunResult(summary, points, runtime.log.events, state.model.clone())


async def _main(
    job: _FLJob,
    server: Server,
    algo: Algorithm,
    bar: TrainProgress,
    out_dir: Path | None,
    resumed: bool,
) -> list[EvalPoint]:
    cfg, runtime = job.cfg, job.runtime
    runtime.log.write(
        "resume" if resumed else "start",
        t=runtime.now(),
        **job.start_fields(cfg, server.numel),
    )
    runtime.spawn(server.run())
    for ctx in job.contexts[1:]:
        runtime.spawn(client(ctx, algo, cfg.local))
    points: list[EvalPoint] = []
    last_eval: tuple[torch.Tensor, tuple[float, float]] | None = None
    every = cfg.evaluation.every_s
    ckpt_every = cfg.checkpoint.every_s
    next_ckpt = (runtime.now() // ckpt_every + 1) * ckpt_every if ckpt_every else None

    def step() -> bool:
        """One evaluation of the global model (and a checkpoint when due); True when the
        run ends there."""
        nonlocal last_eval, next_ckpt
        start = time.perf_counter()
        model = server.state.model
        if last_eval is None or not torch.equal(last_eval[0], model):
            last_eval = (model.clone(), job.server_replica.evaluate(job.x_eval, job.y_eval))
        runtime.eval_wall_s += time.perf_counter() - start
        acc, loss = last_eval[1]
        now = round(runtime.now(), 9)
        sent = job.bytes_before + sum(c.bytes_sent for c in job.contexts)
        point = EvalPoint(now, server.state.version, acc, acc, loss, sent)
        points.append(point)
        runtime.log.write("eval", **point.__dict__, models_held=job.models_held)
        bar.update(point.t, point.iteration, acc)
        if next_ckpt is not None and out_dir is not None and now >= next_ckpt - 1e-9:
            totals = {"bytes_sent": point.bytes_sent, "vanished": job.vanished}
            save_checkpoint(out_dir / "checkpoint", cfg, now, server.state, algo, server, totals)
            runtime.log.write("checkpoint", t=now, version=server.state.version)
            next_ckpt += ckpt_every  # type: ignore[operator]
        if runtime.stop.is_set() or now >= cfg.train.max_time:
            return True
        return acc >= cfg.train.target_acc and cfg.train.stop_at_target

    # Evaluate at exact multiples of every_s, so all algorithms share the time grid.
    await runtime.evaluate_until(
        step, lambda: min((round(points[-1].t / every) + 1) * every, cfg.train.max_time)
    )
    runtime.log.write(
        "end",
        t=points[-1].t,
        tta_s=time_to_accuracy(points, cfg.train.target_acc),
        server=json.loads(json.dumps(server.stats.as_dict())),
    )
    return points
