"""Where a sim run's time goes, per worker: compute, vector work by kind, iteration time.

RESULTS.md section 14g. A driver outside the package: it wraps `WorkerContext.charged`
(modelled vector seconds by kind, all tasks), `VirtualContext.compute` (compute seconds)
and `WorkerContext.iteration_done` (iteration end times) for one `dlion.run`, then prints
per rank the iterations, the mean iteration time, the mean compute time and the vector
milliseconds per iteration by kind.

Usage: python benchmarks/tools17/trace_step_costs.py SCENARIO STRATEGY [a.b=v ...]
e.g.   python benchmarks/tools17/trace_step_costs.py compute-hetero dlion train.lr=0.2 train.seed=0
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dlion
from dlion.context import ComputeResult, WorkerContext
from dlion.engines.runtime import VirtualContext

vector_s: dict[tuple[int, str], float] = defaultdict(float)
compute_s: dict[int, list[float]] = defaultdict(list)
ends: dict[int, list[float]] = defaultdict(list)
_charged = WorkerContext.charged
_done = WorkerContext.iteration_done
_compute = VirtualContext.compute


@asynccontextmanager
async def charged(self: WorkerContext, kind: str, numel: int, ops: int = 1) -> AsyncIterator[None]:
    before = self.charged_s
    async with _charged(self, kind, numel, ops):
        yield
    vector_s[(self.rank, kind)] += self.charged_s - before


def iteration_done(self: WorkerContext, loss: Any) -> None:
    ends[self.rank].append(self.now())
    _done(self, loss)


async def compute(self: VirtualContext, batch_size: int) -> ComputeResult:
    result = await _compute(self, batch_size)
    compute_s[self.rank].append(result.seconds)
    return result


def main(scenario: str, strategy: str, overrides: list[str]) -> None:
    WorkerContext.charged = charged  # type: ignore[method-assign]
    WorkerContext.iteration_done = iteration_done  # type: ignore[method-assign]
    VirtualContext.compute = compute  # type: ignore[method-assign]
    out = dlion.run(scenario, [f"strategy.name={strategy}", *overrides])
    print(f"tta {out.summary.get('tta_s')} s")
    for rank in sorted(ends):
        n = len(ends[rank])
        per_it = (ends[rank][-1] - ends[rank][0]) / (n - 1) if n > 1 else 0.0
        comp = compute_s[rank]
        kinds = {k: round(v / n * 1e3, 3) for (r, k), v in sorted(vector_s.items()) if r == rank}
        print(
            f"rank {rank}: {n} iterations, {per_it * 1e3:.2f} ms each, compute "
            f"{sum(comp) / len(comp) * 1e3:.2f} ms, vector ms per iteration {kinds} "
            f"(sum {sum(kinds.values()):.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
