"""Piecewise-constant traces of a resource over time (capacity, bandwidth), and their sources.

A trace is a list of change points (t_k, v_k): the value is v_k on [t_k, t_{k+1}) and the
first value holds from time 0. Sources: points from YAML, a CSV file of `time,value` rows,
or a seeded generator (random walk, periodic interference, step change). Values are
factors of the configured resource unless the trace says `absolute`.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from dlion.core.config import TraceSpec
from dlion.core.errors import DataError


@dataclass(frozen=True)
class Trace:
    """Value v[k] from times[k] until times[k + 1]; times start at 0 and increase."""

    times: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.values):
            raise ValueError("a trace needs as many values as change times, at least one")
        if self.times[0] != 0.0:
            raise ValueError(f"a trace starts at time 0, got {self.times[0]}")
        if any(b <= a for a, b in zip(self.times, self.times[1:], strict=False)):
            raise ValueError("trace times must increase strictly")
        if any(not (v > 0 and math.isfinite(v)) for v in self.values):
            raise ValueError("trace values must be positive and finite")

    def at(self, t: float) -> float:
        return self.values[bisect.bisect_right(self.times, t) - 1]

    def scaled(self, factor: float) -> Trace:
        return Trace(self.times, tuple(v * factor for v in self.values))

    def duration_for(self, work: float, start: float) -> float:
        """Time from `start` until the integral of the value reaches `work` (exact: the
        value is constant between change points). With a capacity trace in FLOP/s this is
        the compute time of `work` FLOPs started at `start`."""
        if work <= 0:
            return 0.0
        k = bisect.bisect_right(self.times, start) - 1
        t = start
        left = work
        while k + 1 < len(self.times):
            span = self.times[k + 1] - t
            if self.values[k] * span >= left:
                break
            left -= self.values[k] * span
            t = self.times[k + 1]
            k += 1
        return t + left / self.values[k] - start


def _from_points(points: list[tuple[float, float]]) -> Trace:
    """Points sorted by time; a value before the first point is the first point's value."""
    pts = sorted(points, key=lambda p: p[0])
    times: list[float] = []
    values: list[float] = []
    for t, v in pts:
        t = 0.0 if not times and t <= 0 else float(t)
        if times and t == times[-1]:
            values[-1] = float(v)  # a later row for the same instant wins
        elif not times or v != values[-1]:
            times.append(t)
            values.append(float(v))
    if times[0] != 0.0:
        times[0] = 0.0
    return Trace(tuple(times), tuple(values))


def read_csv_points(path: Path) -> list[tuple[float, float]]:
    """`time,value` rows (a header row is allowed); errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: trace CSV file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read trace CSV ({exc})") from None
    points: list[tuple[float, float]] = []
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(f"{path}: line {line_no}: expected 2 columns time,value, got {row}")
        try:
            t, v = float(row[0]), float(row[1])
        except ValueError:
            if line_no == 1 and not points:
                continue  # header
            raise DataError(f"{path}: line {line_no}: not numbers: {row}") from None
        if not (math.isfinite(t) and t >= 0):
            raise DataError(f"{path}: line {line_no}: time must be finite and >= 0, got {t}")
        if not (math.isfinite(v) and v > 0):
            raise DataError(f"{path}: line {line_no}: value must be finite and > 0, got {v}")
        points.append((t, v))
    if not points:
        raise DataError(f"{path}: trace CSV has no time,value rows")
    return points


def build_trace(spec: TraceSpec, horizon: float, origin: str) -> Trace:
    """The trace a spec describes, generated up to `horizon` seconds where it is random.

    Values stay relative (factors) or absolute as the spec says; the caller scales."""
    if spec.points is not None:
        return _from_points(list(spec.points))
    if spec.csv is not None:
        return _from_points(read_csv_points(Path(spec.csv)))
    if spec.step is not None:
        s = spec.step
        return _from_points([(0.0, s.before), (s.at_s, s.to)])
    if spec.periodic is not None:
        p = spec.periodic
        points = [(0.0, p.high)]
        # Interference during [phase + k * period, phase + k * period + duty * period).
        k = 0
        while (start := p.phase_s + k * p.period_s) < horizon:
            points += [(start, p.low), (start + p.duty * p.period_s, p.high)]
            k += 1
        return _from_points(points)
    if spec.random_walk is not None:
        w = spec.random_walk
        rng = random.Random(w.seed)
        value = w.start
        points = [(0.0, value)]
        t = w.every_s
        while t < horizon:
            # Multiplicative steps: a walk on a factor is symmetric in log space.
            value = min(w.high, max(w.low, value * (1.0 + rng.uniform(-w.step, w.step))))
            points.append((t, value))
            t += w.every_s
        return _from_points(points)
    raise ValueError(f"{origin}: empty trace")  # unreachable: the config model checks it
