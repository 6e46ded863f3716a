"""The sim engine: real gradients on real data, with time taken from the cluster description.

Compute time = training FLOPs per sample x batch / worker capacity. Transfer time =
latency + encoded size / bandwidth, with max-min fair sharing of links and NICs
(engines/network.py). Everything runs as coroutines on one virtual-time asyncio loop,
so a run is deterministic for a config and seed and independent of the host's speed.
Evaluation of the replicas happens between events and costs no virtual time.

Dynamics (config `dynamics`): capacities and link bandwidths follow piecewise-constant
traces (compute time integrates the capacity; flows in flight are re-rated when a
bandwidth changes), and workers leave, crash or join on a schedule. The engine is the
membership authority: a departing worker's coroutines (and every task they started) are
cancelled; peers learn of a `leave` at once and of a `crash` after `engine.peer_timeout`
(WorkerContext._peer_left); a joining worker fetches the current model from a live peer
(WorkerContext.join_from_live_peer) and is admitted from an iteration no live worker has
started (WorkerContext._peer_joined). Evaluation averages over the running workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlion.cluster import Cluster
from dlion.comm.messages import Message
from dlion.config import ExperimentConfig, MembershipEvent, initially_absent, write_config
from dlion.context import ComputeResult, WorkerContext
from dlion.dynamics import membership_schedule
from dlion.engines.network import Network, all_to_all_rates
from dlion.engines.sim_checkpoint import SimCheckpointer, checkpoint_root
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.experiment import Prepared, make_replica, prepare, save_trained_model
from dlion.registry import get_strategy, parse_options
from dlion.replica import Replica
from dlion.report import (
    EvalPoint,
    MetricsLog,
    TrainProgress,
    reached_target,
    run_summary,
    time_to_accuracy,
    worst,
    write_json_atomic,
)
from dlion.vector_cost import charger_for


@dataclass
class RunResult:
    summary: dict[str, Any]
    points: list[EvalPoint]
    events: list[dict[str, Any]]
    wall_s: float
    compute_wall_s: float  # wall time spent inside gradient computations
    replicas: list[Replica] = field(repr=False, default_factory=list)


# The rank whose worker created a task: every task a worker starts (background sends,
# server roles) inherits it, so a departure cancels exactly that worker's tasks.
_OWNER: contextvars.ContextVar[int | None] = contextvars.ContextVar("dlion_owner", default=None)


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
            bandwidth_seed={p: engine.expected_rates[(rank, p)] for p in peers},
            latency={p: cluster.link(rank, p).latency for p in peers},
            bandwidth_ema=engine.cfg.engine.bandwidth_ema,
            header_bytes=engine.cfg.engine.header_bytes,
            seed=engine.cfg.train.seed,
            step_overhead=cluster.workers[rank].step_overhead_s,
        )
        self._engine = engine
        self.vector = charger_for(engine.cfg, cluster, rank, engine.prep.flops_per_sample)

    def now(self) -> float:
        return self._engine.loop.time()

    async def compute(self, batch_size: int) -> ComputeResult:
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        self._engine.compute_wall_s += time.perf_counter() - start
        flops = self._engine.prep.flops_per_sample * batch_size
        seconds = self._engine.cluster.compute_time(self.rank, flops, self.now())
        await asyncio.sleep(seconds)
        return ComputeResult(grad, loss, batch_size, seconds)

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        engine = self._engine
        seconds = await engine.network.transfer(self.rank, dst, wire_bytes)
        latency = engine.cluster.link(self.rank, dst).latency
        engine.loop.call_later(latency, engine.deliver, dst, engine.incarnation[dst], msg)
        return seconds


class _SimEngine:
    def __init__(self, cfg: ExperimentConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.cluster = Cluster.from_config(cfg.cluster).with_dynamics(
            cfg.dynamics, cfg.train.max_time
        )
        self.global_batch = cfg.train.batch_per_worker * self.cluster.size
        self.prep: Prepared = prepare(cfg, self.cluster.size)
        self.network = Network(loop, self.cluster)
        # What each worker is told to expect per link (shared pipes split all-to-all).
        self.expected_rates = all_to_all_rates(self.cluster)
        self.compute_wall_s = 0.0
        self.contexts = [
            SimContext(self, r, make_replica(cfg, self.prep, r)) for r in range(self.cluster.size)
        ]
        # Membership: `running` workers execute; `believed` are those their peers count as
        # live, with the iteration each takes part from (a crashed worker stays believed
        # until the peer timeout). `incarnation` tells a returning worker's messages from
        # its predecessor's. `epoch` numbers the membership changes peers are told of.
        self.schedule: list[MembershipEvent] = membership_schedule(
            cfg.dynamics, self.cluster.size, cfg.train.max_time
        )
        absent = initially_absent(self.schedule)
        self.running: set[int] = set(range(self.cluster.size)) - absent
        self.believed: dict[int, int] = dict.fromkeys(sorted(self.running), 0)
        self.incarnation = [0] * self.cluster.size
        self.epoch = 0
        self.membership: list[dict[str, Any]] = []
        self.tasks: dict[int, set[asyncio.Task[Any]]] = {r: set() for r in range(self.cluster.size)}
        self.retired_bytes = 0  # bytes sent by incarnations that have left
        self.retired_rejected = 0
        self.worker: Any = None
        self.options: Any = None
        self.failures: list[BaseException] = []
        for ctx in self.contexts:
            ctx._set_view({r: 0 for r in self.running if r != ctx.rank}, 0)
        self.eval_wall_s = 0.0
        # Parameters already evaluated (this round or earlier) and their (acc, loss): identical
        # replicas (all-reduce, or no update since the last round) are evaluated once.
        self._eval_cache: list[tuple[torch.Tensor, tuple[float, float]]] = []
        self.stop = asyncio.Event()
        self.log: MetricsLog
        self.checkpointer: SimCheckpointer | None = None
        for ctx in self.contexts:
            ctx._on_record = self._record
            ctx._on_iteration = self._iteration_done

    # ------------------------------------------------------------------ membership
    def task_factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        """Create a task and file it under the worker that started it."""
        owner = context.get(_OWNER, None) if context is not None else _OWNER.get()
        task = asyncio.Task(coro, loop=loop, context=context)
        if owner is not None:
            self.tasks[owner].add(task)
            task.add_done_callback(self.tasks[owner].discard)
        return task

    def live_contexts(self) -> list[SimContext]:
        return [self.contexts[r] for r in sorted(self.running)]

    def deliver(self, dst: int, incarnation: int, msg: Message) -> None:
        """A message reaches `dst` only if the worker it was sent to still runs."""
        if dst in self.running and self.incarnation[dst] == incarnation:
            self.contexts[dst].mailbox.deliver(msg)

    def start_worker(self, rank: int, joining: bool) -> None:
        context = contextvars.copy_context()
        context.run(_OWNER.set, rank)
        task = self.loop.create_task(
            self._run_worker(self.contexts[rank], joining), context=context
        )
        task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failures.append(task.exception())  # type: ignore[arg-type]
            self.stop.set()

    async def _run_worker(self, ctx: SimContext, joining: bool) -> None:
        if joining:
            donor = await ctx.join_from_live_peer()
            self._admit(ctx, donor)
        await asyncio.gather(self.worker(ctx, self.options), ctx.serve_state())

    def _log_membership(self, rank: int, event: str, **fields: Any) -> None:
        t = self.loop.time()
        self.membership.append({"t": t, "rank": rank, "event": event, **fields})
        self.log.write("membership", t=t, rank=rank, change=event, **fields)

    def guarded(self, action: Any, *args: Any) -> None:
        """Run a scheduled membership action; an error in it fails the run (the loop would
        only log an exception raised in a callback)."""
        try:
            action(*args)
        except Exception as exc:  # re-raised by _main once the loop stops
            self.failures.append(exc)
            self.stop.set()

    def _stop_worker(self, rank: int) -> None:
        self.running.discard(rank)
        for task in list(self.tasks[rank]):
            task.cancel()
        self.tasks[rank].clear()

    def leave(self, rank: int) -> None:
        """Announced departure: peers learn at once."""
        self._stop_worker(rank)
        self._log_membership(rank, "leave")
        self._tell_left(rank)

    def crash(self, rank: int) -> None:
        """Silent departure: peers learn after the peer timeout."""
        self._stop_worker(rank)
        self._log_membership(rank, "crash")
        incarnation = self.incarnation[rank]
        self.loop.call_later(self.cfg.engine.peer_timeout, self._detect, rank, incarnation)

    def _detect(self, rank: int, incarnation: int) -> None:
        # A worker that came back before anyone noticed its crash has already been re-admitted.
        if self.incarnation[rank] == incarnation and rank in self.believed:
            self._log_membership(rank, "crash_detected")
            self._tell_left(rank)

    def _tell_left(self, rank: int) -> None:
        self.believed.pop(rank, None)
        self.epoch += 1
        for ctx in self.live_contexts():
            ctx._peer_left(rank, self.epoch)

    def join(self, rank: int) -> None:
        """A new or returning worker is ready: a fresh process with its data shard, which
        fetches the current model from a live peer before it is admitted."""
        old = self.contexts[rank]
        self.retired_bytes += old.bytes_sent
        self.retired_rejected += old.rejected
        self.incarnation[rank] += 1
        ctx = SimContext(self, rank, make_replica(self.cfg, self.prep, rank))
        ctx._on_record = self._record
        ctx._on_iteration = self._iteration_done
        ctx._set_view({r: s for r, s in self.believed.items() if r != rank}, self.epoch)
        self.contexts[rank] = ctx
        self.running.add(rank)
        self._log_membership(rank, "join_started")
        self.start_worker(rank, joining=True)

    def _admit(self, ctx: SimContext, donor: int | None) -> None:
        """Admit a joiner from the first iteration no live worker has started, so every
        bulk-synchronous group agrees on when it is in."""
        others = [c for c in self.live_contexts() if c.rank != ctx.rank and c.rank in self.believed]
        since = max((c.iteration for c in others), default=ctx.iteration) + 1
        self.epoch += 1
        for c in others:
            c._peer_joined(ctx.rank, since, self.epoch)
        ctx._set_view({c.rank: self.believed[c.rank] for c in others}, self.epoch, since)
        ctx.iteration = since
        self.believed[ctx.rank] = since
        self._log_membership(ctx.rank, "join", donor=donor, since=since)

    def _evaluate_replica(self, replica: Replica) -> tuple[float, float]:
        state = replica.model_state()  # buffers too: BatchNorm statistics change results
        for known, result in self._eval_cache:
            if torch.equal(known, state):
                return result
        result = replica.evaluate(self.prep.test, batch_size=self.cfg.evaluation.batch_size)
        self._eval_cache.append((state, result))
        del self._eval_cache[: -len(self.contexts)]  # remember one round's worth
        return result

    def _record(self, rank: int, event: str, fields: dict[str, Any]) -> None:
        self.log.write(event, t=self.loop.time(), rank=rank, **fields)

    def _iteration_done(self, rank: int) -> None:
        cap = self.cfg.train.max_iterations
        if cap is not None and min(c.iteration for c in self.live_contexts()) >= cap:
            self.stop.set()

    def evaluate(self) -> EvalPoint:
        start = time.perf_counter()
        live = self.live_contexts()  # departed workers' replicas no longer count
        results = [self._evaluate_replica(c.replica) for c in live]
        self.eval_wall_s += time.perf_counter() - start
        accs = [a for a, _ in results]
        return EvalPoint(
            t=round(self.loop.time(), 9),  # the eval grid is k * every_s; drop float dust
            iteration=round(sum(c.iteration for c in live) / len(live)),
            mean_acc=sum(accs) / len(accs),
            min_acc=worst(accs, self.cfg.evaluation.higher_better),
            mean_loss=sum(loss for _, loss in results) / len(results),
            bytes_sent=self.retired_bytes + sum(c.bytes_sent for c in self.contexts),
        )


# Extra summary fields from a run's membership log (list of events) and end time (s).
SummaryFields = Callable[[list[dict[str, Any]], float], dict[str, Any]]


def run_sim(
    cfg: ExperimentConfig,
    *,
    out_dir: Path | None = None,
    label: str | None = None,
    progress: bool = True,
    description: str | None = None,
    summary_fields: SummaryFields | None = None,
    resume: bool = False,
    stop_at: float | None = None,
) -> RunResult:
    """Run one experiment in the simulator; write metrics.jsonl and summary.json to out_dir.
    `summary_fields(membership, end_s)` adds fields computed from the run's membership log
    and its end to the summary (transient servers price the instances with it).
    Checkpoints (config `checkpoint`) go to out_dir/checkpoints. `resume`: continue the run
    in out_dir from its latest checkpoint, by verified replay (engines/sim_checkpoint.py);
    CheckpointError, with out_dir untouched, if it cannot. `stop_at`: halt at the first
    evaluation point at or after this virtual time, after writing a checkpoint there (an
    interruption on purpose: no summary.json; the summary returned has `stopped_at`)."""
    torch.set_num_threads(cfg.engine.threads)
    spec = get_strategy(cfg.strategy.name)
    options = parse_options(spec, cfg.strategy.options)
    # Before anything is written: a resume verifies its checkpoint here.
    checkpointer = SimCheckpointer(cfg, out_dir, resume=resume, stop_at=stop_at)
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        engine = _SimEngine(cfg, loop)
        engine.checkpointer = checkpointer
        loop.set_task_factory(engine.task_factory)  # type: ignore[arg-type]
        if out_dir is not None and not resume:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, cfg)
            # A new run in an old directory starts clean: old checkpoints are not its own.
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)
        # A replay logs to memory until it has matched its checkpoint (then the file is
        # cut back to the checkpoint's history and appended to).
        logged = out_dir is not None and not resume
        engine.log = MetricsLog(out_dir / "metrics.jsonl" if logged else None)
        text = description or f"{cfg.name} {label or spec.name}"
        with engine.log, TrainProgress(text, cfg.train.max_time, enabled=progress) as bar:
            # Wall time of the training loop alone (data loading and setup excluded).
            wall_start = time.perf_counter()
            with _quiet_gc():
                engine.worker, engine.options = spec.worker, options
                points = loop.run_until_complete(_main(engine, bar))
            wall = time.perf_counter() - wall_start
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    last = points[-1]
    summary: dict[str, Any] = {
        **run_summary(
            points,
            scenario=cfg.name,
            strategy=label or cfg.strategy.name,
            seed=cfg.train.seed,
            engine="sim",
            target_acc=cfg.train.target_acc,
            metric=cfg.evaluation.metric,
            higher_is_better=cfg.evaluation.higher_better,
        ),
        "workers": engine.cluster.size,
        "rejected_messages": engine.retired_rejected + sum(c.rejected for c in engine.contexts),
        "membership": engine.membership,
        # Modelled seconds of vector work paid, summed over the workers (vector_cost.py).
        "vector_charged_s": sum(c.charged_s for c in engine.contexts),
        "wall_s": wall,
        "compute_wall_s": engine.compute_wall_s,
        "eval_wall_s": engine.eval_wall_s,
        # Peak resident memory of this process so far (KiB on Linux), for scale-out reports.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if summary_fields is not None:
        summary.update(summary_fields(engine.membership, last.t))
    if checkpointer.halted_at is not None:
        summary["stopped_at"] = checkpointer.halted_at
    elif out_dir is not None:
        live = engine.live_contexts()
        saved = save_trained_model(
            out_dir,
            cfg,
            engine.prep,
            [(c.rank, c.replica.model_state()) for c in live],
            [engine._evaluate_replica(c.replica) for c in live],
            counters_from=live[0].replica.model if live else None,
        )
        if saved is not None:
            summary["saved_model"] = saved.summary()
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


async def _main(engine: _SimEngine, bar: TrainProgress) -> list[EvalPoint]:
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
    for rank in sorted(engine.running):
        engine.start_worker(rank, joining=False)
    _schedule_dynamics(engine)
    points: list[EvalPoint] = []
    try:
        while True:
            point = engine.evaluate()
            points.append(point)
            engine.log.write("eval", **point.__dict__)
            bar.update(point.t, point.iteration, point.mean_acc)
            if engine.checkpointer is not None and engine.checkpointer.after_eval(engine, points):
                break  # stop_at: halted here, after a checkpoint
            higher = cfg.evaluation.higher_better
            reached = reached_target(point.mean_acc, cfg.train.target_acc, higher)
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
    if engine.failures:
        raise engine.failures[0]
    if engine.checkpointer is not None:
        engine.checkpointer.finished(points)
        if engine.checkpointer.halted_at is not None:
            return points  # interrupted on purpose: the run has not ended
    engine.log.write(
        "end",
        t=points[-1].t,
        tta_s=time_to_accuracy(points, cfg.train.target_acc, cfg.evaluation.higher_better),
    )
    return points


def _schedule_dynamics(engine: _SimEngine) -> None:
    """Put bandwidth changes and membership events on the virtual clock."""
    loop = engine.loop
    for t in engine.cluster.bandwidth_change_times():
        if t < engine.cfg.train.max_time:
            loop.call_at(t, engine.network.rerate)
    actions = {"leave": engine.leave, "crash": engine.crash, "join": engine.join}
    for ev in engine.schedule:
        if ev.ready_s < engine.cfg.train.max_time:
            loop.call_at(ev.ready_s, engine.guarded, actions[ev.event], ev.rank)
