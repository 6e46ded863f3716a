"""The control loop shared by the simulator and real runs: observe, decide, set, wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlion.thermal.backends import Backend
from dlion.thermal.errors import ThermalError
from dlion.thermal.policies import Observation, Policy


@dataclass(frozen=True)
class Tick:
    """One control period as the policy saw it."""

    t_s: float
    temp_c: float  # the reading (noisy in the simulator)
    limit_mhz: float  # the limit the policy set for the next period
    progress_done: float


@dataclass(frozen=True)
class LoopResult:
    ticks: list[Tick]
    end_s: float
    learned: dict[str, Any]


def control_loop(policy: Policy, backend: Backend, interval_s: float) -> LoopResult:
    """Every `interval_s`: read temperature and progress, ask the policy, set the limit;
    until the workload finishes. The policy's `finish` is called once at the end."""
    if interval_s <= 0:
        raise ThermalError(f"interval must be > 0 seconds, got {interval_s}")
    levels = set(backend.frequency_levels_mhz())
    ticks: list[Tick] = []
    while True:
        done, total = backend.progress()
        obs = Observation(backend.now_s(), backend.read_temperature_c(), done, total)
        limit = policy.decide(obs)
        if limit not in levels:
            raise ThermalError(f"policy {policy.name} chose {limit} MHz, not a level")
        backend.set_frequency_limit_mhz(limit)
        ticks.append(Tick(obs.t_s, obs.temp_c, limit, done))
        if not backend.wait(interval_s):
            break
    end_s = backend.now_s()
    learned = policy.finish(end_s, backend.progress()[0])
    return LoopResult(ticks, end_s, learned)
