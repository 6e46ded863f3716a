"""What a strategy's vector work costs: a per-kind line fitted on one host, scaled to a worker.

Gradients cost time from FLOPs and the worker's capacity (cluster.py). Everything else a
strategy does with vectors (optimizer steps, sums, top-k selections, significance scans,
quantization, averaging) costs time from this model, so no strategy's extra work is free:

    host seconds  = ops * fixed_s(kind) + numel * per_element_s(kind)
    worker seconds = host seconds * k(t)

- `kind` is one of KINDS (below); `numel` the elements the work touches in all, `ops`
  how many separate calls it makes (each pays the fixed cost once).
- (fixed_s, per_element_s) per kind were fitted on one host by `benchmarks/vector_cost.py`
  (torch CPU, 1 thread); the constants ship in `dlion.cluster.vector_cost_host` with the command,
  machine and date, so runs are deterministic and nothing is timed at run time.
- k(t), the **speed rule**: how many times slower than the calibration host the worker is,
  measured on the quantity the cluster configures, one training step of this run's model
  at the run's `train.batch_per_worker` b (`engine.vector_cost_batch` when set: the
  ideal bound's one worker takes the whole global batch, and is rated at its cluster's
  per-worker batch, as a worker of its capacity in that cluster):

      k(t) = (o + b F / c(t)) / (o_h + b F / c_h)

  with o, c(t) the worker's step overhead and capacity (FLOP/s, traces included, taken at
  the start of the work), F the model's training FLOPs per sample, and (o_h, c_h) the
  calibration host's own step line (overhead, FLOP/s) for the digits MLP, fitted by the
  same benchmark as `dlion probe` fits workers. A worker that takes k times longer than
  the host for a step takes k times longer for its vector work. A config written by
  `dlion probe` on the calibration host has k = 1 at its reference batch.

The dist engine pays the same modelled seconds for real: after the work it sleeps to
`time_scale * modelled` and counts an overrun when the real work took longer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlion.core.timescale import UNIT, TimeScale

if TYPE_CHECKING:
    from dlion.cluster.topology import Cluster
    from dlion.core.config import ExperimentConfig

# Kinds of vector work, each timed by benchmarks/vector_cost.py with one representative op.
KINDS: dict[str, str] = {
    "axpy": "elementwise update of one vector (add, scale, copy, lerp, subtract)",
    "sum": "sum of k vectors (numel = k x length): a server's or a site's aggregate",
    "topk": "top-k by magnitude over a vector (abs + topk, k = 1%)",
    "scan": "abs / threshold scan with a nonzero gather (Gaia's significance filter)",
    "quant": "quantize to a few bits with a scale, then dequantize",
    "sgd": "one SGD-with-momentum optimizer step (FlatSGD)",
    "adamw": "one AdamW optimizer step over one tensor (torch.optim.AdamW, foreach off)",
    "adamw_tensor": "each tensor beyond the first in one AdamW step (a fixed cost per call)",
}


class VectorCostError(ValueError):
    """An unknown kind or an impossible size."""


@dataclass(frozen=True)
class OpCost:
    fixed_s: float  # seconds per call on the calibration host
    per_element_s: float  # seconds per element on the calibration host


@dataclass(frozen=True)
class HostLine:
    """The calibration host's training step: overhead + batch * FLOPs / flops_per_s."""

    overhead_s: float
    flops_per_s: float


@dataclass(frozen=True)
class VectorCostModel:
    ops: dict[str, OpCost]
    host: HostLine

    def host_seconds(self, kind: str, numel: int, ops: int = 1) -> float:
        """Seconds the calibration host takes for `ops` calls of `kind` over `numel`
        elements in all."""
        cost = self.ops.get(kind)
        if cost is None:
            raise VectorCostError(f"vector cost: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if numel < 0 or ops < 0:
            raise VectorCostError(f"vector cost: numel and ops must be >= 0, got {numel}, {ops}")
        return ops * cost.fixed_s + numel * cost.per_element_s

    def speed_ratio(
        self, overhead_s: float, capacity_flops: float, flops_per_sample: float, batch: int
    ) -> float:
        """k: a worker's step time over the calibration host's, for `batch` samples of a
        model of `flops_per_sample` (the speed rule of the module docstring)."""
        work = batch * flops_per_sample
        host = self.host.overhead_s + work / self.host.flops_per_s
        return (overhead_s + work / capacity_flops) / host


@dataclass(frozen=True)
class Fit:
    cost: OpCost
    max_rel_error: float  # largest |model - measured| / measured over the fitted sizes


def fit_op(sizes: list[int], seconds: list[float]) -> Fit:
    """Least squares of t = a + b n in relative error (each point weighted 1 / t^2, so a
    10 us call counts as much as a 10 ms one); a and b clamped at >= 0 (a negative fixed
    cost is noise: the line is then refitted through the origin)."""
    if len(sizes) != len(seconds) or len(set(sizes)) < 2:
        raise VectorCostError("vector cost: a fit needs at least two different sizes")
    if any(not (t > 0 and math.isfinite(t)) for t in seconds):
        raise VectorCostError(f"vector cost: timings must be positive and finite, got {seconds}")
    w = [1.0 / (t * t) for t in seconds]
    sw = sum(w)
    swn = sum(wi * n for wi, n in zip(w, sizes, strict=True))
    swnn = sum(wi * n * n for wi, n in zip(w, sizes, strict=True))
    swt = sum(wi * t for wi, t in zip(w, seconds, strict=True))
    swnt = sum(wi * n * t for wi, n, t in zip(w, sizes, seconds, strict=True))
    det = sw * swnn - swn * swn
    a = (swnn * swt - swn * swnt) / det
    b = (sw * swnt - swn * swt) / det
    if a < 0:
        a, b = 0.0, swnt / swnn
    elif b < 0:
        a, b = swt / sw, 0.0
    err = max(abs(a + b * n - t) / t for n, t in zip(sizes, seconds, strict=True))
    return Fit(OpCost(a, b), err)


def shipped_model() -> VectorCostModel:
    """The model fitted on the calibration host (`dlion.cluster.vector_cost_host`)."""
    from dlion.cluster.vector_cost_host import HOST_STEP, OPS

    return VectorCostModel(
        {k: OpCost(*OPS[k]) for k in KINDS}, HostLine(HOST_STEP[0], HOST_STEP[1])
    )


class VectorCharger:
    """One worker's charge: modelled seconds of vector work in its context's units.

    `time_scale` converts scenario seconds to the context's (1 in the sim; the dist
    engine's wall seconds per scenario second). How the seconds are spent is the context's
    (`WorkerContext.pay_vector_work`): a virtual clock sleeps them all, a real one only
    what the real work left."""

    def __init__(
        self,
        model: VectorCostModel,
        *,
        overhead_s: float,
        capacity_at: Callable[[float], float],
        flops_per_sample: float,
        batch: int,
        time_scale: TimeScale = UNIT,
    ) -> None:
        self.model = model
        self._overhead = overhead_s
        self._capacity_at = capacity_at  # scenario time -> FLOP/s
        self._flops = flops_per_sample
        self._batch = batch
        self.time_scale = time_scale

    def seconds(self, kind: str, numel: int, ops: int, now: float) -> float:
        """Context seconds for this work started at context time `now`."""
        capacity = self._capacity_at(self.time_scale.scenario(now))
        k = self.model.speed_ratio(self._overhead, capacity, self._flops, self._batch)
        return self.time_scale.wall(k * self.model.host_seconds(kind, numel, ops))


def charger_for(
    cfg: ExperimentConfig,
    cluster: Cluster,
    rank: int,
    flops_per_sample: float,
    *,
    time_scale: TimeScale = UNIT,
) -> VectorCharger | None:
    """Worker `rank`'s charger for this run, None when `engine.charge_vector_work` is off."""
    if not cfg.engine.charge_vector_work:
        return None
    return VectorCharger(
        shipped_model(),
        overhead_s=cluster.workers[rank].step_overhead_s,
        capacity_at=lambda t: cluster.capacity(rank, t),
        flops_per_sample=flops_per_sample,
        batch=cfg.engine.vector_cost_batch or cfg.train.batch_per_worker,
        time_scale=time_scale,
    )
