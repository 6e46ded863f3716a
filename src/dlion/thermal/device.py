"""Device model: frequency levels, static + dynamic power, and a lumped RC thermal model.

Power at frequency f (MHz) with workload activity a (dynamic power per cycle relative to a
compute-heavy loop, 1.0):

    V(f) = V_min + (V_max - V_min) * (f - f_min) / (f_max - f_min)
    P(f, a) = P_static + a * P_dyn_max * (f / f_max) * (V(f) / V_max)^2      (CMOS: a C V^2 f)

One thermal node with resistance R (°C/W) to ambient and heat capacity C (J/°C):

    C dT/dt = P - (T - T_ambient) / R,   steady state T_ss = T_ambient + R P,   tau = R C

The simulator integrates it with explicit Euler steps (`euler_step`).
"""

from __future__ import annotations

import math
from itertools import pairwise

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlion.core.config import shipped_names
from dlion.thermal.yamlio import PROFILE_FOLDER, parse_mapping, read_profile_text, validate


class DeviceProfile(BaseModel):
    """An edge-class device; the shipped YAML files note where each number comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short name used in tables and the start table.")
    description: str = Field("", description="What class of device this is.")
    cores: int = Field(ge=1, description="Cores that run the workload; work rate = cores x f.")
    frequencies_mhz: list[float] = Field(
        min_length=1, description="Available frequency levels (MHz), strictly ascending."
    )
    voltage_min_v: float = Field(gt=0, description="Core voltage at the lowest level.")
    voltage_max_v: float = Field(gt=0, description="Core voltage at the highest level.")
    static_power_w: float = Field(ge=0, description="Power that does not scale with f (W).")
    dynamic_power_max_w: float = Field(
        gt=0, description="Dynamic power at the highest level with activity 1.0 (W)."
    )
    thermal_resistance_c_per_w: float = Field(gt=0, description="R: °C above ambient per W.")
    thermal_capacitance_j_per_c: float = Field(gt=0, description="C: J per °C of the node.")

    @model_validator(mode="after")
    def _check(self) -> DeviceProfile:
        levels = self.frequencies_mhz
        if any(f <= 0 for f in levels):
            raise ValueError("frequencies_mhz: every level must be > 0")
        if any(b <= a for a, b in pairwise(levels)):
            raise ValueError("frequencies_mhz: levels must be strictly ascending")
        if self.voltage_max_v < self.voltage_min_v:
            raise ValueError("voltage_max_v must be >= voltage_min_v")
        return self

    @property
    def f_min(self) -> float:
        return self.frequencies_mhz[0]

    @property
    def f_max(self) -> float:
        return self.frequencies_mhz[-1]

    @property
    def tau_s(self) -> float:
        """Thermal time constant R C (s)."""
        return self.thermal_resistance_c_per_w * self.thermal_capacitance_j_per_c

    def voltage_v(self, mhz: float) -> float:
        """Core voltage at `mhz`: linear between the end levels, clamped outside them."""
        if self.f_max == self.f_min:
            return self.voltage_max_v
        x = min(max((mhz - self.f_min) / (self.f_max - self.f_min), 0.0), 1.0)
        return self.voltage_min_v + (self.voltage_max_v - self.voltage_min_v) * x

    def dynamic_power_w(self, mhz: float, activity: float = 1.0) -> float:
        """a * P_dyn_max * (f / f_max) * (V(f) / V_max)^2."""
        v = self.voltage_v(mhz) / self.voltage_max_v
        return activity * self.dynamic_power_max_w * (mhz / self.f_max) * v * v

    def power_w(self, mhz: float, activity: float = 1.0) -> float:
        """Total power (W) at `mhz` with workload activity `activity`."""
        return self.static_power_w + self.dynamic_power_w(mhz, activity)

    def steady_state_c(self, ambient_c: float, power_w: float) -> float:
        """Temperature the node settles at under constant power: T_amb + R P."""
        return ambient_c + self.thermal_resistance_c_per_w * power_w

    def scaled(self, resistance: float, capacitance: float) -> DeviceProfile:
        """A copy with R and C multiplied (unit-to-unit variation in the simulator)."""
        return self.model_copy(
            update={
                "thermal_resistance_c_per_w": self.thermal_resistance_c_per_w * resistance,
                "thermal_capacitance_j_per_c": self.thermal_capacitance_j_per_c * capacitance,
            }
        )


def euler_step(
    temp_c: float,
    power_w: float,
    ambient_c: float,
    resistance: float,
    capacitance: float,
    dt_s: float,
) -> float:
    """One explicit Euler step of C dT/dt = P - (T - T_amb) / R."""
    return temp_c + dt_s * (power_w - (temp_c - ambient_c) / resistance) / capacitance


def exact_step(temp_c: float, steady_c: float, tau_s: float, dt_s: float) -> float:
    """Exact solution after dt under constant power: T_ss + (T - T_ss) exp(-dt / tau)."""
    return steady_c + (temp_c - steady_c) * math.exp(-dt_s / tau_s)


def shipped_profiles() -> list[str]:
    """Names of the shipped device profiles."""
    return shipped_names(PROFILE_FOLDER)


def load_profile(source: str) -> DeviceProfile:
    """A profile from a YAML path or a shipped name; bad input is one ThermalError line."""
    raw = parse_mapping(read_profile_text(source), source)
    return validate(DeviceProfile, raw, source)
