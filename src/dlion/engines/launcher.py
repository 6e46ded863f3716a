"""The dist engine, job side: launch worker processes, evaluate them, write the run's files.

`run_dist` hosts the job's store (a torch.distributed TCPStore), starts one process per
worker (what `python -m dlion.jobs.dist_worker` runs, with the same environment variables torchrun
sets; forked from a preloaded fork server, see forkserver.py), and runs the coordinator.
It is the workers' parent: a worker whose process ends before the job starts is named at
once (`Coordinator.wait_ready`), and the command shows the start-up as it goes. The
coordinator never trains: on the evaluation grid (every_s x time_scale wall seconds) it
reads each live worker's snapshot from the store, evaluates it, logs the point, drives
the progress bar, and sets the stop flag at the target or at max_time. It outlives any
worker, so it can record departures (with the time peers took to notice) and still
finish the run. Under torchrun the same coordinator runs in rank 0's process instead
(see dlion/jobs/dist_worker.py).

Faults for tests and benchmarks are injected here as real signals: SIGKILL (a crash,
no goodbye) or SIGTERM (a clean leave) to a worker process at a given time.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from dlion.cluster.dynamics import membership_schedule
from dlion.cluster.topology import Cluster
from dlion.comm.codec import BadFrame, decode
from dlion.comm.job import (
    Fault,
    Keys,
    decide,
    exit_text,
    host_store,
    job_store,
    last_line,
    reap,
    shared_secret,
    store_get_json,
    store_has,
    undecided,
)
from dlion.comm.messages import dense_values
from dlion.core.config import ExperimentConfig, initially_absent, write_config
from dlion.core.errors import SimulationError
from dlion.core.timescale import TimeScale
from dlion.engines import forkserver
from dlion.engines.dist import resolve_backend
from dlion.engines.dist_checkpoint import keep_previous_metrics, verify_resume
from dlion.engines.forkserver import ForkedWorker
from dlion.engines.sim import RunResult
from dlion.report import (
    EvalPoint,
    MetricsLog,
    StartupStatus,
    TrainProgress,
    reached_target,
    run_summary,
    time_to_accuracy,
    worst,
    write_json_atomic,
)
from dlion.training.experiment import Prepared, make_replica, prepare, save_trained_model

# A worker process: forked from the fork server, or a `python -m dlion.jobs.dist_worker` (netns).
WorkerProcess = subprocess.Popen[bytes] | ForkedWorker


def schedule_from_config(cfg: ExperimentConfig, size: int) -> tuple[list[Fault], set[int]]:
    """The scenario's membership events as real actions, and the ranks absent at the start
    (their first event is a join). A join happens when its startup time is over; the new
    process's own start-up time comes on top of that."""
    events = membership_schedule(cfg.dynamics, size, cfg.train.max_time)
    kinds: dict[str, Literal["KILL", "TERM", "JOIN"]] = {
        "crash": "KILL",
        "leave": "TERM",
        "join": "JOIN",
    }
    return [Fault(e.rank, e.ready_s, kinds[e.event]) for e in events], initially_absent(events)


class Coordinator:
    """Evaluates a running dist job from the store and writes metrics.jsonl and summary.json."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        store: dist.Store,
        *,
        out_dir: Path,
        run_id: str,
        label: str | None = None,
        processes: dict[int, WorkerProcess] | None = None,
        faults: list[Fault] | None = None,
        absent: set[int] | None = None,
        spawn: Callable[[int, int], WorkerProcess] | None = None,
        prep: Prepared | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.out_dir = out_dir
        self.label = label or cfg.strategy.name
        self.processes = processes
        self.faults = sorted(faults or [], key=lambda f: f.at)
        self.time_scale = TimeScale(cfg.engine.time_scale)
        self.size = Cluster.from_config(cfg.cluster).size
        self.prep = prep if prep is not None else prepare(cfg, self.size)
        self._eval_replica = make_replica(cfg, self.prep, 0)
        self.t0 = 0.0
        self.spawn = spawn
        self.absent = set(absent or ())
        self.out: set[int] = set(self.absent)  # ranks not taking part right now
        self.inc = dict.fromkeys(range(self.size), 0)  # each rank's current incarnation
        self.changes: list[dict[str, Any]] = []  # membership changes, for the summary
        self._signalled: dict[int, float] = {}  # rank -> when a fault was injected
        self._decided: set[tuple[int, int]] = set()  # (rank, incarnation) admitted or refused
        self._finals_seen: set[tuple[int, int]] = {(r, 0) for r in range(self.size)}
        self.run_id = run_id
        for r in self.absent:
            store.set(Keys.absent(r), "1")
        # Open now: admission and faults are logged before the first evaluation.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.log = MetricsLog(out_dir / "metrics.jsonl")
        self._last: dict[int, tuple[torch.Tensor, dict[str, float]]] = {}
        self._eval_cache: list[tuple[torch.Tensor, tuple[float, float]]] = []
        self.eval_wall_s = 0.0
        self.netns: str | None = None  # the `dlion netns` prefix the workers run in, if any
        self.startup_s: float | None = None  # wall seconds from launch to the common start

    # ---------------------------------------------------------------- start-up
    def admit(self) -> None:
        """Decide on every registered worker: admitted if it proves the shared secret (or
        none is set), refused otherwise. The coordinator is the only one that decides, so a
        process with a wrong secret cannot refuse the others."""
        secret = shared_secret(self.cfg.engine.secret)
        for r, inc, record in undecided(self.store, range(self.size), self._decided):
            if decide(self.store, secret, self.run_id, r, record):
                self.log.write("refused", t=max(0.0, self.now()), rank=r, pid=record.get("pid"))
                continue
            if inc > 0:
                # A joiner: tell it (and the members) who is in, with their incarnations.
                self.inc[r] = inc
                self._finals_seen.add((r, inc))
                live = [p for p in range(self.size) if p != r and p not in self.out]
                join = {"inc": inc, "live": live, "incarnations": {p: self.inc[p] for p in live}}
                self.store.set(Keys.join(r), json.dumps(join))
                self.log.write("join_admitted", t=self.now(), rank=r, inc=inc, live=live)

    def wait_ready(self, status: StartupStatus | None = None) -> None:
        """Wait until every started worker has connected to its peers. A worker whose
        process exits first is noticed at once (the launcher is its parent): if it never
        registered, nobody waits for it and the job starts without it (as after a
        departure); if it had registered, peers may be connecting to it, and the job fails
        at once naming it. `status` shows the start-up state as it changes."""
        status = status or StartupStatus(enabled=False)
        began = time.time()
        deadline = began + self.cfg.engine.startup_timeout
        pending = set(range(self.size)) - self.absent
        while pending:
            self.admit()
            pending = {r for r in pending if not store_has(self.store, Keys.ready(r))}
            for r in sorted(pending):
                code = self._exited(r)
                if store_has(self.store, Keys.refused(r, 0)):
                    pending.discard(r)
                    self.out.add(r)
                    self.changes.append({"t": 0.0, "rank": r, "event": "failed_to_start"})
                elif code is not None:
                    pending.discard(r)
                    self._died_starting(r, code, status)
            if not pending:
                break
            loading = [r for r in pending if not store_has(self.store, Keys.member(r))]
            status.update(
                f"starting {self.size - len(self.out)} workers: "
                f"{len(loading)} loading, {len(pending) - len(loading)} connecting, "
                f"{self.size - len(self.out) - len(pending)} ready"
            )
            if time.time() > deadline:
                raise SimulationError(
                    f"dist: workers {sorted(pending)} did not connect within "
                    f"{self.cfg.engine.startup_timeout:g} s (engine.startup_timeout); "
                    f"still loading: {sorted(loading)} (see workers/rank-N.log)"
                )
            time.sleep(0.05)
        if len(self.out) == self.size:
            raise SimulationError("dist: no worker started; see workers/rank-*.log")
        status.note(f"{self.size - len(self.out)} workers ready ({time.time() - began:.1f} s)")

    def _died_starting(self, rank: int, code: int, status: StartupStatus) -> None:
        """A worker's process ended before it was ready."""
        why = f"worker {rank} exited during start-up ({exit_text(code)})"
        log = self.out_dir / "workers" / f"rank-{rank}.log"
        last = last_line(log)
        detail = f": {last}" if last else ""
        if store_has(self.store, Keys.member(rank)):
            raise SimulationError(
                f"dist: {why} after registering, while its peers connected to it{detail} "
                f"(see {log})"
            )
        self.store.set(Keys.absent(rank), "1")  # peers stop waiting for it
        self.out.add(rank)
        self.changes.append({"t": 0.0, "rank": rank, "event": "failed_to_start", "exit_code": code})
        self.log.write("failed_to_start", t=0.0, rank=rank, exit_code=code, error=last)
        status.note(f"{why}; starting without it{detail}")

    def start(self) -> None:
        self.t0 = time.time() + 0.2  # a common start a moment ahead, so everyone sees it first
        self.store.set(Keys.T0, repr(self.t0))
        self.store.set(Keys.GO, "1")

    def now(self) -> float:
        return time.time() - self.t0

    # ---------------------------------------------------------------- membership
    def _exited(self, rank: int) -> int | None:
        if self.processes is None:
            return None
        return self.processes[rank].poll()

    def _update_membership(self) -> None:
        now = self.now()
        for r in range(self.size):
            inc = self.inc[r]
            if r in self.out:
                if inc > 0 and store_has(self.store, Keys.since(r, inc)):
                    joined = store_get_json(self.store, Keys.since(r, inc))
                    self.out.discard(r)
                    self.changes.append(
                        {
                            "t": float(joined["t"]),
                            "rank": r,
                            "event": "join",
                            "incarnation": inc,
                            "since": joined["since"],
                            "donor": joined["donor"],
                        }
                    )
                continue
            code = self._exited(r)
            change: dict[str, Any] | None = None
            if store_has(self.store, Keys.left(r, inc)):
                left = store_get_json(self.store, Keys.left(r, inc))
                change = {"t": float(left["t"]), "rank": r, "event": "leave"}
            elif code is not None and not store_has(self.store, Keys.final(r, inc)):
                # The moment of an injected fault is known exactly; otherwise this poll's.
                t = self._signalled.get(r, now)
                change = {"t": t, "rank": r, "event": "crash", "exit_code": code}
            elif code is None and self.processes is None and self._heartbeat_stale(r):
                change = {"t": now, "rank": r, "event": "crash"}
            if change is not None:
                change["incarnation"] = inc
                self.out.add(r)
                self._last.pop(r, None)  # a returning worker is evaluated on new snapshots
                self.changes.append(change)

    def _heartbeat_stale(self, rank: int) -> bool:
        if not store_has(self.store, Keys.heartbeat(rank)):
            return False
        seen = float(store_get_json(self.store, Keys.heartbeat(rank))["wall"])
        return time.time() - seen > self.cfg.engine.peer_timeout

    def _inject_faults(self) -> None:
        while self.faults and self.time_scale.wall(self.faults[0].at) <= self.now():
            fault = self.faults.pop(0)
            if fault.signal == "JOIN":
                self._start_joiner(fault)
                continue
            if self.processes is None or self._exited(fault.rank) is not None:
                continue
            self.processes[fault.rank].send_signal(fault.signum)
            self._signalled[fault.rank] = self.now()
            self.log.write("fault", t=self.now(), rank=fault.rank, signal=fault.signal)

    def _start_joiner(self, fault: Fault) -> None:
        rank = fault.rank
        if self.spawn is None or self.processes is None:
            return  # under torchrun the launcher is torchrun's: it starts no extra process
        self._update_membership()
        if rank not in self.out:
            # Its departure may not be visible yet (a crash is seen when the process is
            # reaped): try again shortly, for up to the peer timeout.
            if self.now() < self.time_scale.wall(fault.at) + self.cfg.engine.peer_timeout:
                later = Fault(rank, fault.at + self.time_scale.scenario(0.05), "JOIN")
                self.faults = sorted([*self.faults, later], key=lambda f: f.at)
            else:
                self.log.write("join_skipped", t=self.now(), rank=rank, why="still a member")
            return
        inc = 1 + max((i for r, i in self._decided if r == rank), default=0)
        self.processes[rank] = self.spawn(rank, inc)
        self.log.write("join_started", t=self.now(), rank=rank, inc=inc)

    # ---------------------------------------------------------------- evaluation
    def _collect(self, k: int) -> None:
        for r in range(self.size):
            if r in self.out:
                continue
            key = Keys.snapshot(k, r)
            if not store_has(self.store, key):
                continue
            try:
                msg = decode(self.store.get(key), 1 << 31)
            except BadFrame:
                continue
            self._last[r] = (dense_values(msg), msg.meta)
            self.store.delete_key(key)

    def _evaluate(self, params: torch.Tensor) -> tuple[float, float]:
        for cached, result in self._eval_cache:
            if torch.equal(cached, params):
                return result
        self._eval_replica.set_model_state(params)  # parameters and buffers
        result = self._eval_replica.evaluate(
            self.prep.test, batch_size=self.cfg.evaluation.batch_size
        )
        self._eval_cache = [*self._eval_cache[-self.size :], (params, result)]
        return result

    def evaluate(self, k: int) -> EvalPoint | None:
        start = time.perf_counter()
        self._collect(k)
        live = [r for r in range(self.size) if r not in self.out and r in self._last]
        if not live:
            return None
        results = [self._evaluate(self._last[r][0]) for r in live]
        self.eval_wall_s += time.perf_counter() - start
        accs = [a for a, _ in results]
        metas = [meta for _, meta in self._last.values()]
        return EvalPoint(
            t=round(self.time_scale.wall(k * self.cfg.evaluation.every_s), 9),
            iteration=round(sum(self._last[r][1]["iteration"] for r in live) / len(live)),
            mean_acc=sum(accs) / len(accs),
            min_acc=worst(accs, self.cfg.evaluation.higher_better),
            mean_loss=sum(loss for _, loss in results) / len(results),
            bytes_sent=int(sum(m["bytes_sent"] for m in metas)),
        )

    # ---------------------------------------------------------------- the run
    def run(self, *, progress: bool = True, description: str | None = None) -> RunResult:
        cfg = self.cfg
        every = self.time_scale.wall(cfg.evaluation.every_s)
        horizon = self.time_scale.wall(cfg.train.max_time)
        # Snapshots are published on the grid; read each a little after it is due.
        grace = min(0.5 * every, 0.25 + 2 * cfg.engine.heartbeat_s)
        points: list[EvalPoint] = []
        text = description or f"{cfg.name} {self.label} [dist]"
        with self.log, TrainProgress(text, horizon, enabled=progress) as bar:
            self.log.write(
                "start",
                scenario=cfg.name,
                strategy=cfg.strategy.name,
                seed=cfg.train.seed,
                workers=self.size,
                engine="dist",
                time_scale=self.time_scale.factor,
                backend=resolve_backend(cfg.engine.backend),
                shaping=cfg.engine.shaping,
                netns=self.netns,
                t0_wall=self.t0,  # time.time() of the common start (the first iteration)
            )
            k = 0
            reason = "max_time"
            while True:
                due = self.t0 + k * every + grace
                while time.time() < due:
                    self._inject_faults()
                    self.admit()  # joiners register while the job runs
                    self._update_membership()
                    time.sleep(min(0.05, max(0.0, due - time.time())))
                self._update_membership()
                point = self.evaluate(k)
                if point is None and len(self.out) == self.size and not self.faults:
                    reason = "all workers gone"
                    break
                if point is not None:
                    points.append(point)
                    self.log.write("eval", **point.__dict__)
                    bar.update(point.t, point.iteration, point.mean_acc)
                    higher = cfg.evaluation.higher_better
                    reached = reached_target(point.mean_acc, cfg.train.target_acc, higher)
                    if reached and cfg.train.stop_at_target:
                        reason = "target"
                        break
                if k * every >= horizon:
                    break
                k += 1
            self.store.set(Keys.STOP, reason)
            finals = self._wait_finals()
            for record in self.changes:
                if record["event"] in ("leave", "crash"):
                    record["detected_after_s"] = self._detection_delay(record)
                fields = {k: v for k, v in record.items() if k != "event"}
                self.log.write("membership", change=record["event"], **fields)
            tta = time_to_accuracy(points, cfg.train.target_acc, cfg.evaluation.higher_better)
            self.log.write("end", t=points[-1].t if points else 0.0, tta_s=tta, reason=reason)
        return self._result(points, finals, reason)

    def _wait_finals(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Each incarnation's final counters, once every running worker has reported."""
        deadline = time.time() + 5 * self.cfg.engine.heartbeat_s + 10
        finals: dict[tuple[int, int], dict[str, Any]] = {}
        while time.time() < deadline:
            for r, inc in self._finals_seen:
                if (r, inc) not in finals and store_has(self.store, Keys.final(r, inc)):
                    finals[(r, inc)] = store_get_json(self.store, Keys.final(r, inc))
            waiting = [
                r
                for r in range(self.size)
                if (r, self.inc[r]) not in finals and r not in self.out and self._exited(r) is None
            ]
            if not waiting:
                break
            time.sleep(0.05)
        return finals

    def _detection_delay(self, record: dict[str, Any]) -> float | None:
        """How long the slowest live peer took to drop this worker (None if nobody did)."""
        seen = []
        for by in range(self.size):
            key = Keys.detected(record["rank"], record["incarnation"], by)
            if by != record["rank"] and store_has(self.store, key):
                seen.append(float(store_get_json(self.store, key)["t"]))
        return round(max(seen) - record["t"], 6) if seen else None

    def _result(
        self,
        points: list[EvalPoint],
        finals: dict[tuple[int, int], dict[str, Any]],
        reason: str,
    ) -> RunResult:
        cfg = self.cfg
        # A job whose workers all died before the first evaluation still gets a summary.
        shown = points or [EvalPoint(0.0, 0, 0.0, 0.0, float("nan"), 0)]
        failed = {r: f for (r, _), f in finals.items() if f.get("status") == "failed"}
        tta = time_to_accuracy(points, cfg.train.target_acc, cfg.evaluation.higher_better)
        summary: dict[str, Any] = {
            **run_summary(
                shown,
                scenario=cfg.name,
                strategy=self.label,
                seed=cfg.train.seed,
                engine="dist",
                target_acc=cfg.train.target_acc,
                metric=cfg.evaluation.metric,
                higher_is_better=cfg.evaluation.higher_better,
            ),
            # Every incarnation's final count (the last snapshot misses the final moments).
            "bytes_sent": int(sum(f.get("bytes_sent", 0) for f in finals.values()))
            or shown[-1].bytes_sent,
            "workers": self.size,
            "rejected_messages": int(sum(f.get("rejected", 0) for f in finals.values())),
            "time_scale": self.time_scale.factor,
            # Scenario seconds (wall / time_scale): what to compare with the sim's prediction.
            "tta_scenario_s": None if tta is None else self.time_scale.scenario(tta),
            "backend": resolve_backend(cfg.engine.backend),
            "shaping": cfg.engine.shaping,
            "netns": self.netns,
            "compute_overruns": int(sum(f.get("overruns", 0) for f in finals.values())),
            # Vector work (vector_cost.py), in scenario seconds as the sim reports it.
            "vector_charged_s": self.time_scale.scenario(
                sum(f.get("charged_s", 0.0) for f in finals.values())
            ),
            "charge_overruns": int(sum(f.get("charge_overruns", 0) for f in finals.values())),
            "membership": sorted(self.changes, key=lambda d: (d["t"], d["rank"])),
            "stop_reason": reason,
            "wall_s": self.now(),
            "startup_s": self.startup_s,
            "eval_wall_s": self.eval_wall_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        live = [r for r in range(self.size) if r not in self.out and r in self._last]
        saved = save_trained_model(
            self.out_dir,
            cfg,
            self.prep,
            [(r, self._last[r][0]) for r in live],
            [self._evaluate(self._last[r][0]) for r in live],
        )
        if saved is not None:
            summary["saved_model"] = saved.summary()
        write_json_atomic(self.out_dir / "summary.json", summary)
        if failed:
            first = next(iter(failed.items()))
            raise SimulationError(
                f"dist: worker {first[0]} failed: {first[1].get('error')} "
                f"(see {self.out_dir}/workers/rank-{first[0]}.log)"
            )
        return RunResult(summary, points, self.log.events, summary["wall_s"], 0.0)


def run_dist(
    cfg: ExperimentConfig,
    *,
    out_dir: Path,
    label: str | None = None,
    progress: bool = True,
    description: str | None = None,
    faults: list[Fault] | None = None,
    rank_env: dict[int, dict[str, str]] | None = None,
    resume: bool = False,
    netns: str | None = None,
) -> RunResult:
    """Run one experiment as real processes on this host; write the same files as the sim.

    `faults` are signals sent to workers at scenario times; `rank_env` adds environment
    variables for single ranks (a GPU per rank, a different secret in a test). `resume`:
    an elastic restart of every worker from its latest checkpoint (engines/dist_checkpoint.py).
    `netns` names a prefix set up by `dlion netns up` (engines/netns.py): each rank then
    runs in its own namespace (`ip netns exec PREFIX-RANK`), its traffic to peers shaped by
    tc, and the store listens on the bridge's address instead of `engine.host`."""
    began = time.time()
    status = StartupStatus(enabled=progress)
    resolve_backend(cfg.engine.backend)  # fail before launching anything
    attachment = None
    if netns is not None:
        from dlion.engines.netns import attach

        attachment = attach(cfg, netns)
    elif forkserver.enabled():
        forkserver.warm_up()  # its imports run while this process prepares the data
    size = Cluster.from_config(cfg.cluster).size
    status.update(f"{cfg.name}: loading data and model")
    # The data, model, loss and optimizer (the user's code included) are checked here,
    # before anything is written or any worker starts: a bad builder is one line, exit 2.
    prep = prepare(cfg, size)
    make_replica(cfg, prep, 0)
    if resume:
        verify_resume(cfg, out_dir, size)  # CheckpointError before anything is written
        keep_previous_metrics(out_dir)
    else:  # a new run in an old directory starts clean: old checkpoints are not its own
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(out_dir, cfg)
    store_host = cfg.engine.host if attachment is None else attachment.store_host
    server = host_store(store_host, cfg.engine.port, cfg.engine.startup_timeout)
    run_id = secrets.token_hex(6)
    store = job_store(server, run_id)
    logs = out_dir / "workers"
    logs.mkdir(exist_ok=True)
    extra = ["--resume"] if resume else []
    processes: dict[int, WorkerProcess] = {}
    scheduled, absent = schedule_from_config(cfg, size)

    def spawn(rank: int, incarnation: int) -> WorkerProcess:
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
            "DLION_STORE": f"{store_host}:{server.port}",
            "DLION_RUN_ID": run_id,
            "DLION_INCARNATION": str(incarnation),
            "OMP_NUM_THREADS": str(cfg.engine.threads),
            **({} if attachment is None else attachment.env(rank)),
            **(rank_env or {}).get(rank, {}),
        }
        # A resumed job's first incarnations restore their checkpoints; joiners always
        # start from a live peer.
        args = [str(config_path), "--out", str(out_dir)]
        args += extra if incarnation == 0 else []
        name = f"rank-{rank}.log" if incarnation == 0 else f"rank-{rank}.{incarnation}.log"
        if attachment is None and forkserver.enabled():
            return forkserver.fork_worker(args, env, logs / name)
        argv = [sys.executable, "-m", "dlion.jobs.dist_worker", *args]
        if attachment is not None:
            argv = attachment.command(rank, argv)  # `ip netns exec` execs: same pid
        with (logs / name).open("wb") as log_file:
            return subprocess.Popen(
                argv,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    try:
        status.update(f"{cfg.name}: starting {size - len(absent)} worker processes")
        for rank in range(size):
            if rank not in absent:
                processes[rank] = spawn(rank, 0)
        coordinator = Coordinator(
            cfg,
            store,
            out_dir=out_dir,
            run_id=run_id,
            label=label,
            processes=processes,
            faults=[*scheduled, *(faults or [])],
            absent=absent,
            spawn=spawn,
            prep=prep,
        )
        coordinator.netns = netns
        with status:
            coordinator.wait_ready(status)
        coordinator.startup_s = time.time() - began
        coordinator.start()
        return coordinator.run(progress=progress, description=description)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed: every live worker gets SIGTERM, which it
        # takes as an announced leave, then reap waits for it (and kills a straggler).
        status.close()
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
        raise
    finally:
        reap(processes.values())
