"""WDB under a fixed per-step cost: batch sizes that make every worker's step take as long.

DLion's weighted dynamic batching (Hong & Chandra, HPDC '21; PAPERS.md section 1) gives
each worker a batch proportional to its measured speed, which equalises step times when a
step costs b / s_i. Real steps also have a fixed part (kernel launches, optimizer, Python:
83% of a batch-32 digits-MLP step on one CPU thread, issue 15), so a step costs

    t_i(b) = a_i + b / s_i        (a_i: fixed seconds per step, s_i: samples per second).

Equal times T for every worker with sum b_i = G:

    b_i = s_i (T - a_i),   sum_i s_i (T - a_i) = G   =>   T = (G + sum_i s_i a_i) / sum_i s_i.

A worker whose overhead alone exceeds T would get a negative batch: every b_i is clamped
to [b_min, b_max], and T solves sum_i clamp(s_i (T - a_i)) = G instead. That sum is
continuous, non-decreasing and piecewise linear in T, with breakpoints where a worker
reaches a bound (T = a_i + b_min / s_i or a_i + b_max / s_i): find the segment where it
crosses G and interpolate. Real batches are then rounded by largest remainder (ties to the
lower index), which keeps the sum and the bounds. With every a_i = 0 this is the paper's
proportional split up to rounding.

What a_i holds (`StepCostMeter`): the worker's configured step overhead (inside its
compute) plus, with `wdb_vector_work` (dlion.py), the vector work of the step every
member of the all-reduce does, as its own loop paid it (`ctx.charged_here()` over the
weighting, its shard's sum, the optimizer step), an EMA with the speeds' weight. Why:
that work is the same elements on every worker, so its time follows the worker's
slowness (vector_cost.py's speed rule) and does not shrink with the batch: on
compute-hetero a split by speed alone leaves the 0.1 GFLOP/s worker 3.5 ms of it per
iteration against 0.5 ms on the 0.8 one, and everybody waits (RESULTS.md section 14g).
A site leader's own extra work (absorbing and feeding the inter-site pipes) is left out:
counted, it shrank the leaders' batches on sites of equal workers, and microcloud-dynamic
failed 2 of 6 seeds (section 14g).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def equal_time_batches(
    global_batch: int,
    speeds: Sequence[float],
    overheads: Sequence[float],
    b_min: int = 1,
    b_max: int | None = None,
) -> list[int]:
    """Integer batches summing to `global_batch` whose step times a_i + b_i / s_i are as
    equal as the bounds [b_min, b_max] allow. `speeds`: samples/s excluding the overhead."""
    n = len(speeds)
    cap = global_batch if b_max is None else b_max
    if len(overheads) != n:
        raise ValueError(f"{n} speeds but {len(overheads)} overheads")
    if n * b_min > global_batch or n * cap < global_batch:
        raise ValueError(
            f"cannot split global batch {global_batch} over {n} workers within "
            f"[b_min={b_min}, b_max={cap}]"
        )
    if any(not (s > 0 and math.isfinite(s)) for s in speeds):
        raise ValueError(f"speeds must be positive and finite, got {list(speeds)}")
    if any(not (a >= 0 and math.isfinite(a)) for a in overheads):
        raise ValueError(f"overheads must be >= 0 and finite, got {list(overheads)}")
    real = _equal_time_real(global_batch, speeds, overheads, b_min, cap)
    return _round_keeping_sum(real, global_batch)


class StepCostMeter:
    """One worker's fixed seconds per step a_i: `overhead` + an EMA (newest weight
    `weight`) of the vector seconds of one iteration's step work (`observe`, once per
    iteration)."""

    def __init__(self, overhead: float, weight: float) -> None:
        self.overhead = overhead
        self.weight = weight
        self.vector: float | None = None

    def observe(self, seconds: float) -> float:
        """Take this iteration's vector seconds; return a_i."""
        w = self.weight
        self.vector = seconds if self.vector is None else w * seconds + (1 - w) * self.vector
        return self.overhead + self.vector


def costs_drifted(
    costs: dict[int, float], alloc_costs: dict[int, float] | None, threshold: float
) -> bool:
    """Whether a fixed step cost moved by more than `threshold` (relative) from the one
    the batches were allocated for: a cost first known (from 0) always counts."""
    if alloc_costs is None or set(costs) != set(alloc_costs):
        return True
    return any(not math.isclose(costs[r], alloc_costs[r], rel_tol=threshold) for r in costs)


def step_time(batch: int, speed: float, overhead: float) -> float:
    """t(b) = a + b / s."""
    return overhead + batch / speed


def _equal_time_real(
    total: int, speeds: Sequence[float], overheads: Sequence[float], lo: int, hi: int
) -> list[float]:
    def sizes(t: float) -> list[float]:
        return [min(hi, max(lo, s * (t - a))) for s, a in zip(speeds, overheads, strict=True)]

    points = sorted(
        {a + lo / s for s, a in zip(speeds, overheads, strict=True)}
        | {a + hi / s for s, a in zip(speeds, overheads, strict=True)}
    )
    # f(points[0]) = n * lo <= total <= n * hi = f(points[-1]): some segment crosses it.
    prev_t, prev_f = points[0], sum(sizes(points[0]))
    for t in points[1:]:
        f = sum(sizes(t))
        if f >= total:
            if f == prev_f:
                return sizes(t)
            # Linear between breakpoints: interpolate to the T where the sum is the total.
            return sizes(prev_t + (total - prev_f) * (t - prev_t) / (f - prev_f))
        prev_t, prev_f = t, f
    return sizes(points[-1])


def _round_keeping_sum(real: list[float], total: int) -> list[int]:
    out = [math.floor(x + 1e-9) for x in real]
    short = total - sum(out)
    by_remainder = sorted(range(len(real)), key=lambda i: (-(real[i] - out[i]), i))
    for i in by_remainder[: max(0, short)]:
        out[i] += 1
    return out
