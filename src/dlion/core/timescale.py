"""Scenario time and an engine's time: one object for the conversions.

A scenario's times and rates (capacities, link speeds, traces, timeouts, max_time) are in
scenario seconds. The sim runs in them (UNIT). The dist engine stretches them by
`engine.time_scale` so unequal workers can be emulated on a small host: a scenario second
lasts `factor` wall seconds, a link of B bytes per scenario second carries B / factor
bytes per wall second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimeScale:
    factor: float = 1.0  # wall seconds per scenario second

    def wall(self, scenario_s: float) -> float:
        """A duration or time in scenario seconds, in wall seconds."""
        return scenario_s * self.factor

    def scenario(self, wall_s: float) -> float:
        """A duration or time in wall seconds, in scenario seconds."""
        return wall_s / self.factor

    def rate(self, per_scenario_s: float) -> float:
        """A rate (bytes, FLOPs...) per scenario second, per wall second."""
        return per_scenario_s / self.factor

    def scenario_rate(self, per_wall_s: float) -> float:
        """A rate per wall second (a measured link), per scenario second."""
        return per_wall_s * self.factor


UNIT = TimeScale(1.0)  # the sim: scenario time is the engine's time
