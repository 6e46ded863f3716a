"""Frequency policies: performance, fixed cap, reactive throttling, and Sparta.

Sparta is the heat-budget-aware DVFS scheduler of "Sparta" (EDGE '21; shared/PAPERS.md,
section 6): start from a frequency learned from previous runs of the same application at the
same ambient temperature (`table.py`), then adjust online from the measured temperature and
progress. Here the online part is a small model-predictive rule on the device's RC model:

* a two-state Kalman filter tracks the temperature and the workload's heat scale (its
  dynamic-power activity) from noisy readings, so sensor noise does not cause throttling and
  a cooler (memory-bound, idle) workload earns a higher frequency;
* each period it picks the highest level whose predicted temperature after `horizon_s`
  (shortened to the remaining run time, from the measured progress rate) stays under
  threshold - margin, or whose steady state does (so an overshoot cools back gently).

Every policy sees the same `Observation` each control period and returns a frequency limit.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dlion.thermal.config import (
    FixedCapOptions,
    PolicyConfig,
    ReactiveOptions,
    SpartaOptions,
)
from dlion.thermal.device import DeviceProfile, exact_step
from dlion.thermal.errors import ThermalError
from dlion.thermal.table import StartTable


@dataclass(frozen=True)
class Observation:
    """What a policy sees at the start of each control period."""

    t_s: float  # seconds since the run started
    temp_c: float  # measured (noisy) temperature
    progress_done: float  # work done so far (1e9 cycles in the simulator, seconds for a command)
    progress_total: float | None  # total work, None when unknown (an arbitrary command)


@dataclass(frozen=True)
class PolicyContext:
    """The run a policy controls."""

    threshold_c: float
    ambient_c: float
    app: str  # application name: Sparta's table key
    profile: DeviceProfile  # the device's nominal model (Sparta predicts with it)
    table: StartTable | None = None  # Sparta's start table; None = nothing learned or kept


def snap_down(levels: Sequence[float], mhz: float) -> float:
    """The highest level <= mhz, or the lowest level when mhz is below all of them."""
    below = [f for f in levels if f <= mhz + 1e-9]
    return below[-1] if below else levels[0]


class Policy(ABC):
    """Decides a frequency limit (one of `levels`) every control period."""

    name: str = ""

    def __init__(self, levels: Sequence[float], ctx: PolicyContext) -> None:
        if not levels:
            raise ThermalError("no frequency levels to choose from")
        self.levels = sorted(levels)
        self.ctx = ctx

    @abstractmethod
    def decide(self, obs: Observation) -> float:
        """The frequency limit (MHz) for the next period."""

    def finish(self, t_s: float, progress_done: float) -> dict[str, Any]:
        """Called once when the run ends; returns anything learned (for the summary)."""
        return {}


class Performance(Policy):
    """Always the highest frequency (Linux's performance governor)."""

    name = "performance"

    def decide(self, obs: Observation) -> float:
        return self.levels[-1]


class FixedCap(Policy):
    """A static cap: the highest level under cap_mhz, or under cap_fraction x f_max."""

    name = "fixed-cap"

    def __init__(self, levels: Sequence[float], ctx: PolicyContext, opts: FixedCapOptions) -> None:
        super().__init__(levels, ctx)
        wanted = opts.cap_mhz if opts.cap_mhz is not None else opts.cap_fraction * self.levels[-1]
        self.cap_mhz = snap_down(self.levels, wanted)

    def decide(self, obs: Observation) -> float:
        return self.cap_mhz


class Reactive(Policy):
    """Step-wise throttling at the trip point, as Linux's step_wise governor on a passive
    trip: one level down per period while T >= threshold, one level up per period while
    T < threshold - hysteresis, hold in between. Starts at the highest level."""

    name = "reactive"

    def __init__(self, levels: Sequence[float], ctx: PolicyContext, opts: ReactiveOptions) -> None:
        super().__init__(levels, ctx)
        self.hysteresis_c = opts.hysteresis_c
        self.index = len(self.levels) - 1

    def decide(self, obs: Observation) -> float:
        if obs.temp_c >= self.ctx.threshold_c:
            self.index = max(self.index - 1, 0)
        elif obs.temp_c < self.ctx.threshold_c - self.hysteresis_c:
            self.index = min(self.index + 1, len(self.levels) - 1)
        return self.levels[self.index]


@dataclass
class _Tick:
    dt_s: float  # length of the period this decision governed (known one tick later)
    mhz: float
    temp_c: float  # filtered temperature when deciding
    heat_scale: float


class Sparta(Policy):
    """Learned start frequency + online model-predictive adjustment (see module docstring)."""

    name = "sparta"

    def __init__(self, levels: Sequence[float], ctx: PolicyContext, opts: SpartaOptions) -> None:
        super().__init__(levels, ctx)
        self.opts = opts
        self.model = ctx.profile
        self.target_c = ctx.threshold_c - opts.margin_c
        entry = ctx.table.lookup(ctx.app, ctx.ambient_c) if ctx.table is not None else None
        self.from_table = entry is not None
        self.start_mhz = snap_down(self.levels, entry.frequency_mhz) if entry else None
        self.heat_scale = entry.heat_scale if entry else opts.initial_heat_scale
        heat_std = opts.learned_heat_std if entry else opts.prior_heat_std
        # Kalman state: x = (temperature, heat scale), covariance p = [[p00, p01], [p01, p11]].
        self.temp_c: float | None = None
        self.p00 = opts.noise_c**2
        self.p01 = 0.0
        self.p11 = heat_std**2
        self.rate_per_mhz: float | None = None
        self._last: tuple[float, float, float] | None = None  # (t_s, mhz, progress_done)
        self.ticks: list[_Tick] = []

    # ------------------------------------------------------------------ model

    def predict_c(self, temp_c: float, mhz: float, horizon_s: float) -> float:
        """Temperature after `horizon_s` at `mhz` from `temp_c`, with the current heat scale."""
        return exact_step(temp_c, self.steady_state_c(mhz), self.model.tau_s, horizon_s)

    def steady_state_c(self, mhz: float, heat_scale: float | None = None) -> float:
        k = self.heat_scale if heat_scale is None else heat_scale
        power = self.model.static_power_w + k * self.model.dynamic_power_w(mhz)
        return self.model.steady_state_c(self.ctx.ambient_c, power)

    def _filter(
        self, temp_c: float, dt_s: float, mhz: float, measured_c: float, busy: bool
    ) -> float:
        """Kalman predict over the last period at `mhz`, then correct with the reading;
        returns the filtered temperature and updates the heat scale.

        T' = a T + (1 - a) (T_amb + R (P_s + k P_d(f))),  k' = k,  a = exp(-dt / tau):
        linear in (T, k), so the filter is exact for the model; process noise lets the
        temperature and the heat scale drift (model error, phase changes). A period without
        progress (`busy` False: the workload waited) is predicted with no dynamic power and
        leaves the heat scale alone, so idle gaps do not teach Sparta that the work is cool.
        """
        m, o = self.model, self.opts
        a = math.exp(-dt_s / m.tau_s)
        r = o.noise_c**2
        if not busy:
            temp = exact_step(temp_c, self.steady_state_c(mhz, 0.0), m.tau_s, dt_s)
            p00 = a * a * self.p00 + o.temp_drift_c**2 * dt_s
            gain_t = p00 / (p00 + r)
            self.p00, self.p01 = (1 - gain_t) * p00, (1 - gain_t) * a * self.p01
            return temp + gain_t * (measured_c - temp)
        b = (1.0 - a) * m.thermal_resistance_c_per_w * m.dynamic_power_w(mhz)  # dT'/dk
        temp = self.predict_c(temp_c, mhz, dt_s)
        p00 = a * a * self.p00 + 2 * a * b * self.p01 + b * b * self.p11 + o.temp_drift_c**2 * dt_s
        p01 = a * self.p01 + b * self.p11
        p11 = self.p11 + o.heat_drift**2 * dt_s
        gain_t = p00 / (p00 + r)
        gain_k = p01 / (p00 + r)
        innovation = measured_c - temp
        k = self.heat_scale + gain_k * innovation
        self.heat_scale = min(max(k, o.min_heat_scale), o.max_heat_scale)
        self.p00, self.p01, self.p11 = (1 - gain_t) * p00, (1 - gain_t) * p01, p11 - gain_k * p01
        return temp + gain_t * innovation

    def _measure_rate(self, dt_s: float, mhz: float, done: float, last_done: float) -> None:
        rate = max(done - last_done, 0.0) / dt_s / mhz
        w = self.opts.rate_ema
        self.rate_per_mhz = (
            rate if self.rate_per_mhz is None else (1 - w) * self.rate_per_mhz + w * rate
        )

    def _remaining_s(self, obs: Observation, mhz: float) -> float | None:
        if obs.progress_total is None or not self.rate_per_mhz:
            return None
        return max(obs.progress_total - obs.progress_done, 0.0) / (self.rate_per_mhz * mhz)

    def choose(self, temp_c: float, obs: Observation) -> float:
        """The highest level that keeps the prediction under target over the horizon, or
        whose steady state is under target; the lowest level at or above the threshold."""
        if temp_c >= self.ctx.threshold_c:
            return self.levels[0]
        for mhz in reversed(self.levels):
            horizon = self.opts.horizon_s
            remaining = self._remaining_s(obs, mhz)
            if remaining is not None:
                horizon = max(min(horizon, remaining), 1e-6)
            if self.predict_c(temp_c, mhz, horizon) <= self.target_c:
                return mhz
            if self.steady_state_c(mhz) <= self.target_c:
                return mhz
        return self.levels[0]

    # ------------------------------------------------------------------ policy

    def decide(self, obs: Observation) -> float:
        if self.temp_c is None or self._last is None:
            temp = obs.temp_c
            mhz = self.start_mhz if self.start_mhz is not None else self.choose(temp, obs)
        else:
            temp = self.temp_c
            last_t, last_mhz, last_done = self._last
            dt = obs.t_s - last_t
            if dt > 0:
                busy = obs.progress_done > last_done
                temp = self._filter(temp, dt, last_mhz, obs.temp_c, busy)
                self._measure_rate(dt, last_mhz, obs.progress_done, last_done)
                self.ticks[-1].dt_s = dt
            mhz = self.choose(temp, obs)
        self.temp_c = temp
        self.ticks.append(_Tick(0.0, mhz, temp, self.heat_scale))
        self._last = (obs.t_s, mhz, obs.progress_done)
        return mhz

    def finish(self, t_s: float, progress_done: float) -> dict[str, Any]:
        """Learn from this run: the frequency it sustained once hot (the time-weighted mean
        over periods within learn_band_c of the target; all periods if it never got hot),
        the mean heat scale over the same periods, and the mean progress rate."""
        if self._last is not None and self.ticks:
            self.ticks[-1].dt_s = max(t_s - self._last[0], 0.0)
        ticks = [t for t in self.ticks if t.dt_s > 0]
        hot = [t for t in ticks if t.temp_c >= self.target_c - self.opts.learn_band_c]
        chosen = hot or ticks
        if not chosen:
            return {}
        total = sum(t.dt_s for t in chosen)
        frequency_mhz = sum(t.mhz * t.dt_s for t in chosen) / total
        heat_scale = sum(t.heat_scale * t.dt_s for t in chosen) / total
        progress_rate = progress_done / t_s if t_s > 0 else None
        learned = {
            "frequency_mhz": frequency_mhz,
            "heat_scale": heat_scale,
            "progress_rate": progress_rate,
        }
        table = self.ctx.table
        if self.opts.learn and table is not None:
            table.update(
                self.ctx.app,
                self.ctx.ambient_c,
                weight=self.opts.table_weight,
                frequency_mhz=frequency_mhz,
                heat_scale=heat_scale,
                progress_rate=progress_rate,
            )
            table.save()
        return {"learned": learned, "started_from_table": self.from_table}


POLICIES: dict[
    str, tuple[str, Callable[[Sequence[float], PolicyContext, PolicyConfig], Policy]]
] = {
    "sparta": (
        "learned start frequency + model-predictive online adjustment (EDGE '21)",
        lambda levels, ctx, cfg: Sparta(levels, ctx, cfg.sparta),
    ),
    "performance": (
        "always the highest frequency",
        lambda levels, ctx, cfg: Performance(levels, ctx),
    ),
    "fixed-cap": (
        "a static frequency cap",
        lambda levels, ctx, cfg: FixedCap(levels, ctx, cfg.fixed_cap),
    ),
    "reactive": (
        "step-wise throttling at the threshold with hysteresis",
        lambda levels, ctx, cfg: Reactive(levels, ctx, cfg.reactive),
    ),
}


def build_policy(cfg: PolicyConfig, levels: Sequence[float], ctx: PolicyContext) -> Policy:
    """The policy `cfg.name` with its options from `cfg`."""
    if cfg.name not in POLICIES:
        raise ThermalError(f"policy: unknown policy {cfg.name!r} (known: {', '.join(POLICIES)})")
    return POLICIES[cfg.name][1](levels, ctx, cfg)
