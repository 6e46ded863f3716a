"""The virtual-time runtime: runs a job, a population of ranks whose coroutines use the
context API, on one virtual-time loop with the max-min fair network model.

Both kinds of job run on it: a decentralized strategy (engines/sim.py: every worker runs
the strategy's coroutine) and a federated one (jobs/fl_sim.py: one server and its
clients). The job brings its population, its rule for which messages arrive (membership,
connections) and its evaluation; the runtime brings the rest: the clock and network,
compute time, which rank owns which task, failures, the evaluation loop and the run's
scaffold (metrics log, progress bar, quiet GC, wall time).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import resource
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from dlion.cluster.topology import Cluster
from dlion.context import ComputeResult, WorkerContext
from dlion.engines.network import Network
from dlion.engines.virtual_loop import VirtualTimeLoop
from dlion.report import MetricsLog, TrainProgress

T = TypeVar("T")

# The rank whose coroutine created a task: every task a rank starts (background sends,
# server roles) inherits it, so a departure cancels exactly that rank's tasks.
_OWNER: contextvars.ContextVar[int | None] = contextvars.ContextVar("dlion_owner", default=None)


class VirtualRuntime:
    """One virtual-time run: the loop, the network over `cluster`, the tasks of each rank,
    the first failure, the metrics log and the wall-time counters. `t0`: the virtual time
    at which the run starts (a resumed FL job starts at its checkpoint's time)."""

    def __init__(self, cluster: Cluster, *, flops_per_sample: float, t0: float = 0.0) -> None:
        self.loop = VirtualTimeLoop()
        self.cluster = cluster
        self.network = Network(self.loop, cluster)
        self.flops_per_sample = flops_per_sample
        self.t0 = t0
        self.compute_wall_s = 0.0  # wall time spent inside gradient computations
        self.eval_wall_s = 0.0  # wall time spent evaluating
        self.wall_s = 0.0  # wall time of the training loop alone (setup excluded)
        self.stop = asyncio.Event()
        self.failures: list[BaseException] = []
        self.tasks: dict[int, set[asyncio.Task[Any]]] = {}
        self.log = MetricsLog(None)
        self.loop.set_task_factory(self._task_factory)

    def now(self) -> float:
        return self.t0 + self.loop.time()

    # ---------------------------------------------------------------- tasks
    def _task_factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        """Create a task and file it under the rank that started it."""
        owner = context.get(_OWNER, None) if context is not None else _OWNER.get()
        task = asyncio.Task(coro, loop=loop, context=context)
        if owner is not None:
            owned = self.tasks.setdefault(owner, set())
            owned.add(task)
            task.add_done_callback(owned.discard)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any], owner: int | None = None) -> asyncio.Task[Any]:
        """Start a job coroutine (of rank `owner`, if given); its failure stops the run."""
        context = contextvars.copy_context()
        if owner is not None:
            context.run(_OWNER.set, owner)
        task = self.loop.create_task(coro, context=context)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        """Stop the run; `exc` is raised once the loop has stopped."""
        self.failures.append(exc)
        self.stop.set()

    def cancel_owned(self, rank: int) -> None:
        """Cancel every task rank `rank` started (it has left the job)."""
        for task in list(self.tasks.get(rank, ())):
            task.cancel()
        self.tasks.pop(rank, None)

    def record(self, rank: int, event: str, fields: dict[str, Any]) -> None:
        """A context's event into the run's metrics, stamped with the virtual time."""
        self.log.write(event, t=self.now(), rank=rank, **fields)

    # ---------------------------------------------------------------- the run
    def run(
        self,
        main: Callable[[TrainProgress], Coroutine[Any, Any, T]],
        *,
        text: str,
        max_time: float,
        progress: bool,
    ) -> T:
        """Run `main(bar)` to completion on the virtual clock, with the log open and a
        progress bar; `wall_s` is set to the wall time it took."""
        with self.log, TrainProgress(text, max_time, enabled=progress) as bar:
            start = time.perf_counter()
            with quiet_gc():
                result = self.loop.run_until_complete(main(bar))
            self.wall_s = time.perf_counter() - start
        return result

    async def evaluate_until(
        self, step: Callable[[], bool], next_eval: Callable[[], float]
    ) -> None:
        """Call `step` now and again at each virtual time `next_eval()` names (sooner if the
        run is stopped) until it returns True; then cancel every task of the job and raise
        its first failure, if any."""
        try:
            while not step():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), next_eval() - self.now())
        finally:
            # The job's coroutines and anything they started (background sends) stop here.
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        if self.failures:
            raise self.failures[0]

    def cost_fields(self) -> dict[str, float]:
        """The run's wall-time and memory counters, for its summary."""
        return {
            "wall_s": self.wall_s,
            "compute_wall_s": self.compute_wall_s,
            "eval_wall_s": self.eval_wall_s,
            # Peak resident memory of this process so far (KiB on Linux), for scale-out reports.
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


@contextlib.contextmanager
def virtual_runtime(
    cluster: Cluster, *, flops_per_sample: float, t0: float = 0.0
) -> Iterator[VirtualRuntime]:
    """A runtime whose loop is the current event loop until the block ends, then closed."""
    runtime = VirtualRuntime(cluster, flops_per_sample=flops_per_sample, t0=t0)
    try:
        asyncio.set_event_loop(runtime.loop)
        yield runtime
    finally:
        asyncio.set_event_loop(None)
        runtime.loop.close()


class VirtualContext(WorkerContext):
    """A context on the virtual runtime: its clock is the runtime's; a compute step takes
    the cluster's time for the batch's FLOPs. A job adds `_transmit` (its rule for which
    messages arrive) on `network` and the loop."""

    def __init__(self, runtime: VirtualRuntime, **setup: Any) -> None:
        super().__init__(**setup)
        self._runtime = runtime

    def now(self) -> float:
        return self._runtime.now()

    async def compute(self, batch_size: int) -> ComputeResult:
        rt = self._runtime
        start = time.perf_counter()
        grad, loss = self.replica.gradient(batch_size)
        rt.compute_wall_s += time.perf_counter() - start
        flops = rt.flops_per_sample * batch_size
        seconds = rt.cluster.compute_time(self.rank, flops, self.now())
        await asyncio.sleep(seconds)
        return ComputeResult(grad, loss, batch_size, seconds)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
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
