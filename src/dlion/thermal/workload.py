"""Synthetic workloads: phases of work measured in cycles, or idle waits, with their activity.

A work phase holds `gcycles` (1e9 cycles at the top frequency, summed over cores). A fraction
`memory_bound` of its time at the top frequency is spent waiting on memory, which does not
speed up with the clock, so at frequency f its rate is

    rate(f) = cores * f / ((1 - b) + b * f / f_max)      (cycles per second; b = memory_bound)

`activity` scales dynamic power per cycle (1.0 = a compute-heavy loop; memory-bound code
switches fewer transistors). An idle phase waits `idle_s` seconds whatever the frequency
(e.g. for the next camera frame) at its low activity.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Phase(_Strict):
    """One phase: either work (`gcycles`) or an idle wait (`idle_s`)."""

    kind: Literal["work", "idle"] = Field("work", description="Work to do, or time to wait.")
    gcycles: float = Field(0.0, ge=0, description="work: 1e9 cycles at f_max, all cores.")
    idle_s: float = Field(0.0, ge=0, description="idle: seconds to wait.")
    activity: float = Field(
        1.0, ge=0, le=2, description="Dynamic power per cycle relative to a compute loop."
    )
    memory_bound: float = Field(
        0.0, ge=0, lt=1, description="work: share of time at f_max stalled on memory."
    )

    @model_validator(mode="after")
    def _amount(self) -> Phase:
        if self.kind == "work" and (self.gcycles <= 0 or self.idle_s > 0):
            raise ValueError("a work phase needs gcycles > 0 and no idle_s")
        if self.kind == "idle" and (self.idle_s <= 0 or self.gcycles > 0):
            raise ValueError("an idle phase needs idle_s > 0 and no gcycles")
        return self

    def rate_gcycles_per_s(self, mhz: float, cores: int, f_max_mhz: float) -> float:
        """Work rate at `mhz` (1e9 cycles per second); 0 for an idle phase."""
        if self.kind == "idle":
            return 0.0
        b = self.memory_bound
        return cores * mhz / 1000.0 / ((1.0 - b) + b * mhz / f_max_mhz)


class Workload(_Strict):
    """A named sequence of phases, repeated `repeat` times."""

    name: str = Field(description="Application name: the key of Sparta's start table.")
    description: str = ""
    phases: list[Phase] = Field(min_length=1)
    repeat: int = Field(1, ge=1, description="Run the phase list this many times.")

    def expanded(self) -> list[Phase]:
        """The phases in execution order, repeats unrolled."""
        return [p for _ in range(self.repeat) for p in self.phases]

    def total_gcycles(self) -> float:
        return sum(p.gcycles for p in self.expanded())


def jittered(workload: Workload, rng: np.random.Generator, jitter: float) -> list[Phase]:
    """The unrolled phases with each amount scaled by U(1 - j, 1 + j) and each activity by
    U(1 - j/2, 1 + j/2): runs of the same application never repeat exactly."""
    phases = []
    for p in workload.expanded():
        amount = 1.0 + jitter * rng.uniform(-1.0, 1.0)
        act = min(2.0, p.activity * (1.0 + 0.5 * jitter * rng.uniform(-1.0, 1.0)))
        phases.append(
            p.model_copy(
                update={"gcycles": p.gcycles * amount, "idle_s": p.idle_s * amount, "activity": act}
            )
        )
    return phases


SHIPPED_WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="compute",
            description="compute-heavy: one long phase at full activity",
            phases=[Phase(gcycles=3000.0, activity=1.0)],
        ),
        Workload(
            name="bursty",
            description="bursts of compute separated by idle waits (e.g. frames to process)",
            phases=[
                Phase(gcycles=150.0, activity=1.0),
                Phase(kind="idle", idle_s=20.0, activity=0.05),
            ],
            repeat=12,
        ),
        Workload(
            name="memory",
            description="memory-bound: 40% of time at f_max on memory stalls, 55% power per cycle",
            phases=[Phase(gcycles=2000.0, activity=0.55, memory_bound=0.4)],
        ),
    )
}
