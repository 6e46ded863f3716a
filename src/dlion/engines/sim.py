"""The sim engine: real gradients on real data, with time taken from the cluster description.

Compute time = training FLOPs per sample x batch / worker capacity. Transfer time =
latency + encoded size / bandwidth, with max-min fair sharing of links and NICs
(engines/network.py). Everything runs as coroutines on one virtual-time asyncio loop,
so a run is deterministic for a config and seed and independent of the host's speed.
Evaluation of the replicas happens between events and costs no virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dlion.cluster import Cluster
from dlion.comm.messages import Message
from dlion.config import ExperimentConfig
from dlion.context import ComputeResult, WorkerContext
from dlion.engines.network import Network
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.experiment import Prepared, make_replica, prepare
from dlion.replica import Replica
from dlion.report import EvalPoint, MetricsLog, TrainProgress, time_to_accuracy, write_json_atomic
from dlion.strategies import get_strategy, parse_options


@dataclass
class RunResult:
    summary: dict[str, Any]
    points: list[EvalPoint]
    events: list[dict[str, Any]]
    wall_s: float
    compute_wall_s: float  # wall time spent inside gradient computations
    replicas: list[Replica] = field(repr=False, default_factory=list)


class SimContext(WorkerContext):
    def __init__(self, engine: _SimEngine, rank: int, replica: Replica) -> None:
        cluster = engine.cluster
        peers = [r for r in range(cluster.size) if r != rank]
        super().__init__(
            rank=rank,
            world=list(range(cluster.size)),
            sites=[w.site for w in cluster.workers],
            replica=replica,
            global_batch=engine.global_batch,
            recv_timeout=engine.cfg.engine.recv_timeout,
            bandwidth_seed={p: cluster.link(rank, p).bandwidth for p in peers},
            latency={p: cluster.link(rank, p).latency for p in peers},
            header_bytes=engine.cfg.engine.header_bytes,
            seed=engine.cfg.train.seed,
        )
        self._engine = engine

    def now(self) -> float:
        return self._engine.loop.time()

    async def compute(self, batch_size: int) -> ComputeResult:
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        self._engine.compute_wall_s += time.perf_counter() - start
        flops = self._engine.prep.flops_per_sample * batch_size
        seconds = self._engine.cluster.compute_time(self.rank, flops)
        await asyncio.sleep(seconds)
        return ComputeResult(grad, loss, batch_size, seconds)

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        seconds = await self._engine.network.transfer(self.rank, dst, wire_bytes)
        latency = self._engine.cluster.link(self.rank, dst).latency
        self._engine.loop.call_later(latency, self._engine.contexts[dst].mailbox.deliver, msg)
        return seconds


class _SimEngine:
    def __init__(self, cfg: ExperimentConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.cluster = Cluster.from_config(cfg.cluster)
        self.global_batch = cfg.train.batch_per_worker * self.cluster.size
        self.prep: Prepared = prepare(cfg, self.cluster.size)
        self.network = Network(loop, self.cluster)
        self.compute_wall_s = 0.0
        self.contexts = [
            SimContext(self, r, make_replica(cfg, self.prep, r)) for r in range(self.cluster.size)
        ]
        self.eval_wall_s = 0.0
        # Parameters already evaluated (this round or earlier) and their (acc, loss): identical
        # replicas (all-reduce, or no update since the last round) are evaluated once.
        self._eval_cache: list[tuple[torch.Tensor, tuple[float, float]]] = []
        self.stop = asyncio.Event()
        self.log: MetricsLog
        for ctx in self.contexts:
            ctx._on_record = self._record
            ctx._on_iteration = self._iteration_done

    def _evaluate_replica(self, replica: Replica) -> tuple[float, float]:
        for params, result in self._eval_cache:
            if torch.equal(params, replica.flat):
                return result
        result = replica.evaluate(self.prep.x_eval, self.prep.y_eval)
        self._eval_cache.append((replica.params(), result))
        del self._eval_cache[: -len(self.contexts)]  # remember one round's worth
        return result

    def _record(self, rank: int, event: str, fields: dict[str, Any]) -> None:
        self.log.write(event, t=self.loop.time(), rank=rank, **fields)

    def _iteration_done(self, rank: int) -> None:
        cap = self.cfg.train.max_iterations
        if cap is not None and min(c.iteration for c in self.contexts) >= cap:
            self.stop.set()

    def evaluate(self) -> EvalPoint:
        start = time.perf_counter()
        results = [self._evaluate_replica(c.replica) for c in self.contexts]
        self.eval_wall_s += time.perf_counter() - start
        accs = [a for a, _ in results]
        return EvalPoint(
            t=round(self.loop.time(), 9),  # the eval grid is k * every_s; drop float dust
            iteration=round(sum(c.iteration for c in self.contexts) / len(self.contexts)),
            mean_acc=sum(accs) / len(accs),
            min_acc=min(accs),
            mean_loss=sum(loss for _, loss in results) / len(results),
            bytes_sent=sum(c.bytes_sent for c in self.contexts),
        )


def run_sim(
    cfg: ExperimentConfig,
    *,
    out_dir: Path | None = None,
    label: str | None = None,
    progress: bool = True,
    description: str | None = None,
) -> RunResult:
    """Run one experiment in the simulator; write metrics.jsonl and summary.json to out_dir."""
    torch.set_num_threads(cfg.engine.threads)
    spec = get_strategy(cfg.strategy.name)
    options = parse_options(spec, cfg.strategy.options)
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        engine = _SimEngine(cfg, loop)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        engine.log = MetricsLog(out_dir / "metrics.jsonl" if out_dir is not None else None)
        text = description or f"{cfg.name} {label or spec.name}"
        with engine.log, TrainProgress(text, cfg.train.max_time, enabled=progress) as bar:
            # Wall time of the training loop alone (data loading and setup excluded).
            wall_start = time.perf_counter()
            with _quiet_gc():
                points = loop.run_until_complete(_main(engine, spec.worker, options, bar))
            wall = time.perf_counter() - wall_start
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    last = points[-1]
    summary: dict[str, Any] = {
        "scenario": cfg.name,
        "strategy": label or cfg.strategy.name,
        "seed": cfg.train.seed,
        "engine": "sim",
        "target_acc": cfg.train.target_acc,
        "tta_s": time_to_accuracy(points, cfg.train.target_acc),
        "final_acc": last.mean_acc,
        "final_loss": last.mean_loss,
        "time_s": last.t,
        "bytes_sent": last.bytes_sent,
        "final_min_acc": last.min_acc,
        "iterations": last.iteration,
        "workers": engine.cluster.size,
        "rejected_messages": sum(c.rejected for c in engine.contexts),
        "wall_s": wall,
        "compute_wall_s": engine.compute_wall_s,
        "eval_wall_s": engine.eval_wall_s,
        # Peak resident memory of this process so far (KiB on Linux), for scale-out reports.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if out_dir is not None:
        write_json_atomic(out_dir / "summary.json", summary)
    return RunResult(
        summary,
        points,
        engine.log.events,
        wall,
        engine.compute_wall_s,
        [c.replica for c in engine.contexts],
    )


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """Fewer cyclic-GC passes during the event loop: setup objects (data, replicas) are
    frozen out of the collector's scans and young-generation passes are rarer. With 32
    workers this cut the loop's wall time by about a quarter; results are unaffected."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


async def _main(
    engine: _SimEngine, worker: Any, options: Any, bar: TrainProgress
) -> list[EvalPoint]:
    cfg = engine.cfg
    engine.log.write(
        "start",
        scenario=cfg.name,
        strategy=cfg.strategy.name,
        seed=cfg.train.seed,
        workers=engine.cluster.size,
        global_batch=engine.global_batch,
        parameters=engine.contexts[0].replica.numel,
        flops_per_sample=engine.prep.flops_per_sample,
    )
    tasks = [asyncio.ensure_future(worker(ctx, options)) for ctx in engine.contexts]
    failures: list[BaseException] = []

    def on_done(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            engine.stop.set()

    for task in tasks:
        task.add_done_callback(on_done)
    points: list[EvalPoint] = []
    try:
        while True:
            point = engine.evaluate()
            points.append(point)
            engine.log.write("eval", **point.__dict__)
            bar.update(point.t, point.iteration, point.mean_acc)
            reached = point.mean_acc >= cfg.train.target_acc
            if engine.stop.is_set() or point.t >= cfg.train.max_time:
                break
            if reached and cfg.train.stop_at_target:
                break
            # Evaluate at exact multiples of every_s, so all strategies share the time grid.
            next_eval = min((len(points)) * cfg.evaluation.every_s, cfg.train.max_time)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.stop.wait(), next_eval - engine.loop.time())
    finally:
        # Workers and anything they started (background sends) stop with the run.
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
    if failures:
        raise failures[0]
    engine.log.write("end", t=points[-1].t, tta_s=time_to_accuracy(points, cfg.train.target_acc))
    return points
