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
(WorkerContext.peer_left); a joining worker fetches the current model from a live peer
(WorkerContext.join_from_live_peer) and is admitted from an iteration no live worker has
started (WorkerContext.peer_joined). Evaluation averages over the running workers.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlion.cluster.dynamics import membership_schedule
from dlion.cluster.topology import Cluster
from dlion.cluster.vector_cost import charger_for
from dlion.comm.messages import Message
from dlion.context import worker_setup
from dlion.core.config import ExperimentConfig, MembershipEvent, initially_absent, write_config
from dlion.core.registry import get_strategy, parse_options
from dlion.engines.network import all_to_all_rates
from dlion.engines.runtime import VirtualContext, VirtualRuntime, virtual_runtime
from dlion.engines.sim_checkpoint import SimCheckpointer, checkpoint_root
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
from dlion.training.experiment import Prepared, make_replica, prepare, save_trained_model
from dlion.training.replica import Replica


@dataclass
class RunResult:
    summary: dict[str, Any]
    points: list[EvalPoint]
    events: list[dict[str, Any]]
    wall_s: float
    compute_wall_s: float  # wall time spent inside gradient computations
    replicas: list[Replica] = field(repr=False, default_factory=list)


class SimContext(VirtualContext):
    def __init__(self, engine: _SimEngine, rank: int, replica: Replica) -> None:
        setup = worker_setup(engine.cfg, engine.cluster, rank, engine.expected_rates)
        super().__init__(engine.runtime, replica=replica, **setup)
        self._engine = engine
        self.vector = charger_for(engine.cfg, engine.cluster, rank, engine.prep.flops_per_sample)

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        engine = self._engine
        seconds = await engine.runtime.network.transfer(self.rank, dst, wire_bytes)
        latency = engine.cluster.link(self.rank, dst).latency
        engine.loop.call_later(latency, engine.deliver, dst, engine.incarnation[dst], msg)
        return seconds


class _SimEngine:
    """The strategy job on the virtual runtime: every worker runs the strategy."""

    def __init__(self, cfg: ExperimentConfig, runtime: VirtualRuntime, prep: Prepared) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.loop = runtime.loop
        self.cluster = runtime.cluster
        self.global_batch = cfg.train.batch_per_worker * self.cluster.size
        self.prep = prep
        # What each worker is told to expect per link (shared pipes split all-to-all).
        self.expected_rates = all_to_all_rates(self.cluster)
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
        self.retired_bytes = 0  # bytes sent by incarnations that have left
        self.retired_rejected = 0
        self.worker: Any = None
        self.options: Any = None
        for ctx in self.contexts:
            ctx.set_view({r: 0 for r in self.running if r != ctx.rank}, 0)
        # Parameters already evaluated (this round or earlier) and their (acc, loss): identical
        # replicas (all-reduce, or no update since the last round) are evaluated once.
        self._eval_cache: list[tuple[torch.Tensor, tuple[float, float]]] = []
        self.log: MetricsLog
        self.checkpointer: SimCheckpointer | None = None
        for ctx in self.contexts:
            ctx.set_hooks(runtime.record, self._iteration_done)

    # ------------------------------------------------------------------ membership
    def live_contexts(self) -> list[SimContext]:
        return [self.contexts[r] for r in sorted(self.running)]

    def deliver(self, dst: int, incarnation: int, msg: Message) -> None:
        """A message reaches `dst` only if the worker it was sent to still runs."""
        if dst in self.running and self.incarnation[dst] == incarnation:
            self.contexts[dst].mailbox.deliver(msg)

    def start_worker(self, rank: int, joining: bool) -> None:
        self.runtime.spawn(self._run_worker(self.contexts[rank], joining), owner=rank)

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
            self.runtime.fail(exc)

    def _stop_worker(self, rank: int) -> None:
        self.running.discard(rank)
        self.runtime.cancel_owned(rank)

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
            ctx.peer_left(rank, self.epoch)

    def join(self, rank: int) -> None:
        """A new or returning worker is ready: a fresh process with its data shard, which
        fetches the current model from a live peer before it is admitted."""
        old = self.contexts[rank]
        self.retired_bytes += old.bytes_sent
        self.retired_rejected += old.rejected
        self.incarnation[rank] += 1
        ctx = SimContext(self, rank, make_replica(self.cfg, self.prep, rank))
        ctx.set_hooks(self.runtime.record, self._iteration_done)
        ctx.set_view({r: s for r, s in self.believed.items() if r != rank}, self.epoch)
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
            c.peer_joined(ctx.rank, since, self.epoch)
        ctx.set_view({c.rank: self.believed[c.rank] for c in others}, self.epoch, since)
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

    def _iteration_done(self, rank: int) -> None:
        cap = self.cfg.train.max_iterations
        if cap is not None and min(c.iteration for c in self.live_contexts()) >= cap:
            self.runtime.stop.set()

    def evaluate(self) -> EvalPoint:
        start = time.perf_counter()
        live = self.live_contexts()  # departed workers' replicas no longer count
        results = [self._evaluate_replica(c.replica) for c in live]
        self.runtime.eval_wall_s += time.perf_counter() - start
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
    cluster = Cluster.from_config(cfg.cluster).with_dynamics(cfg.dynamics, cfg.train.max_time)
    prep = prepare(cfg, cluster.size)
    with virtual_runtime(cluster, flops_per_sample=prep.flops_per_sample) as runtime:
        engine = _SimEngine(cfg, runtime, prep)
        engine.checkpointer = checkpointer
        if out_dir is not None and not resume:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, cfg)
            # A new run in an old directory starts clean: old checkpoints are not its own.
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)
        # A replay logs to memory until it has matched its checkpoint (then the file is
        # cut back to the checkpoint's history and appended to).
        log_path = None if out_dir is None or resume else out_dir / "metrics.jsonl"
        runtime.log = engine.log = MetricsLog(log_path)
        engine.worker, engine.options = spec.worker, options
        points = runtime.run(
            lambda bar: _main(engine, bar),
            text=description or f"{cfg.name} {label or spec.name}",
            max_time=cfg.train.max_time,
            progress=progress,
        )
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
        **runtime.cost_fields(),
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
        runtime.wall_s,
        runtime.compute_wall_s,
        [c.replica for c in engine.contexts],
    )


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

    def step() -> bool:
        """One evaluation point; True when the run ends there."""
        point = engine.evaluate()
        points.append(point)
        engine.log.write("eval", **point.__dict__)
        bar.update(point.t, point.iteration, point.mean_acc)
        if engine.checkpointer is not None and engine.checkpointer.after_eval(engine, points):
            return True  # stop_at: halted here, after a checkpoint
        higher = cfg.evaluation.higher_better
        reached = reached_target(point.mean_acc, cfg.train.target_acc, higher)
        if engine.runtime.stop.is_set() or point.t >= cfg.train.max_time:
            return True
        return reached and cfg.train.stop_at_target

    # Evaluate at exact multiples of every_s, so all strategies share the time grid.
    await engine.runtime.evaluate_until(
        step, lambda: min(len(points) * cfg.evaluation.every_s, cfg.train.max_time)
    )
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
            loop.call_at(t, engine.runtime.network.rerate)
    actions = {"leave": engine.leave, "crash": engine.crash, "join": engine.join}
    for ev in engine.schedule:
        if ev.ready_s < engine.cfg.train.max_time:
            loop.call_at(ev.ready_s, engine.guarded, actions[ev.event], ev.rank)
