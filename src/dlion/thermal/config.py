"""Typed config of a thermal simulation: device, workload, ambient, threshold, policy options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlion.core.config import apply_overrides
from dlion.thermal.device import DeviceProfile, load_profile, shipped_profiles
from dlion.thermal.errors import ThermalError
from dlion.thermal.workload import SHIPPED_WORKLOADS, Workload
from dlion.thermal.yamlio import parse_mapping, read_file, validate

PolicyName = Literal["sparta", "performance", "fixed-cap", "reactive"]
POLICY_NAMES: tuple[str, ...] = ("sparta", "performance", "fixed-cap", "reactive")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SimSettings(_Strict):
    seed: int = Field(0, description="Seeds workload jitter, device variation, sensor noise.")
    dt_s: float = Field(
        0.1, gt=0, le=10, description="Euler step; 0.1 s is < 0.2% of the shortest shipped tau."
    )
    interval_s: float = Field(
        1.0, gt=0, description="Control period of every policy (a thermal-zone polling delay)."
    )
    sensor_noise_c: float = Field(
        0.5, ge=0, description="Std of Gaussian noise on each temperature reading (°C)."
    )
    jitter: float = Field(
        0.1, ge=0, lt=1, description="Phase amounts vary by ±jitter, activities by ±jitter/2."
    )
    device_spread: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Unit-to-unit variation: true R and C are the profile's x U(1±spread); "
        "Sparta's model keeps the nominal values.",
    )
    initial_temp_c: float | None = Field(
        None, description="Temperature at t=0; None starts at ambient (a cold device)."
    )
    max_time_s: float = Field(
        7200.0, gt=0, description="Stop a run that has not finished by then (it counts as DNF)."
    )


class FixedCapOptions(_Strict):
    cap_mhz: float | None = Field(
        None, gt=0, description="Cap (MHz), snapped down to a level; None uses cap_fraction."
    )
    cap_fraction: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Cap = highest level <= this share of f_max (a vendor-style static derating).",
    )


class ReactiveOptions(_Strict):
    hysteresis_c: float = Field(
        2.0,
        ge=0,
        description="Step up only below threshold - hysteresis; 2 °C is a common device-tree "
        "trip hysteresis (e.g. rk3399 passive trips).",
    )


class SpartaOptions(_Strict):
    margin_c: float = Field(
        0.75,
        ge=0,
        description="Keep the predicted temperature under threshold - margin; 0.75 °C is "
        "about 4 std of the filtered temperature at the default sensor noise.",
    )
    horizon_s: float = Field(
        1.0,
        gt=0,
        description="Look-ahead of the prediction (s): one control period, as long as a "
        "choice holds.",
    )
    noise_c: float = Field(
        0.5, gt=0, description="Filter: assumed std of a temperature reading (°C)."
    )
    temp_drift_c: float = Field(
        0.05, ge=0, description="Filter: temperature model error per sqrt(second) (°C)."
    )
    heat_drift: float = Field(
        0.03, ge=0, description="Filter: how fast the heat scale may change, per sqrt(second)."
    )
    initial_heat_scale: float = Field(
        1.0, gt=0, description="Activity assumed before anything is learned (1 = cautious)."
    )
    prior_heat_std: float = Field(
        0.5, gt=0, description="Filter: uncertainty of initial_heat_scale."
    )
    learned_heat_std: float = Field(
        0.15, gt=0, description="Filter: uncertainty of a heat scale from the start table."
    )
    min_heat_scale: float = Field(0.02, gt=0, description="Lower clamp of the heat scale.")
    max_heat_scale: float = Field(3.0, gt=0, description="Upper clamp of the heat scale.")
    rate_ema: float = Field(
        0.3, gt=0, le=1, description="Weight of the newest progress-rate measurement."
    )
    learn: bool = Field(True, description="Update the start table when a run ends.")
    table_path: str | None = Field(
        None, description="Start table JSON; None = $DLION_CACHE_DIR/thermal/sparta_table.json."
    )
    ambient_bucket_c: float = Field(
        5.0, gt=0, description="Ambient temperatures within one bucket share a table entry."
    )
    learn_band_c: float = Field(
        3.0,
        gt=0,
        description="The learned frequency averages the ticks within this of the target "
        "temperature (the sustained part of a run).",
    )
    table_weight: float = Field(
        0.5, gt=0, le=1, description="Weight of the newest run when updating an entry."
    )

    @model_validator(mode="after")
    def _bounds(self) -> SpartaOptions:
        if self.min_heat_scale > self.max_heat_scale:
            raise ValueError("min_heat_scale must be <= max_heat_scale")
        return self


class PolicyConfig(_Strict):
    name: PolicyName = Field("sparta", description="Which policy runs.")
    fixed_cap: FixedCapOptions = Field(default_factory=FixedCapOptions)
    reactive: ReactiveOptions = Field(default_factory=ReactiveOptions)
    sparta: SpartaOptions = Field(default_factory=SpartaOptions)


class ThermalConfig(_Strict):
    name: str = "thermal"
    description: str = ""
    device: str = Field("rpi4", description="Shipped profile name or profile YAML path.")
    workload: str | Workload = Field(
        "compute", description="Shipped workload name (compute, bursty, memory) or phases."
    )
    ambient_c: float = Field(25.0, ge=-40, le=85, description="Ambient air temperature (°C).")
    threshold_c: float = Field(70.0, le=150, description="Keep the device below this (°C).")
    sim: SimSettings = Field(default_factory=SimSettings)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @model_validator(mode="after")
    def _check(self) -> ThermalConfig:
        if self.threshold_c <= self.ambient_c:
            raise ValueError("threshold_c must be above ambient_c")
        if isinstance(self.workload, str) and self.workload not in SHIPPED_WORKLOADS:
            known = ", ".join(SHIPPED_WORKLOADS)
            raise ValueError(f"workload: unknown workload {self.workload!r} (shipped: {known})")
        return self

    def resolved_workload(self) -> Workload:
        if isinstance(self.workload, Workload):
            return self.workload
        return SHIPPED_WORKLOADS[self.workload]

    def profile(self) -> DeviceProfile:
        return load_profile(self.device)


def load_thermal_config(source: str, overrides: list[str] | None = None) -> ThermalConfig:
    """A config from a YAML path, or a shipped profile name (all other fields default).

    A relative `device:` path in a file is looked up next to that file first.
    """
    if source in shipped_profiles() and not Path(source).exists():
        raw: dict = {"name": source, "device": source}
    else:
        path = Path(source)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            known = ", ".join(shipped_profiles())
            raise ThermalError(f"{source}: not a config YAML file or a shipped profile ({known})")
        raw = parse_mapping(read_file(path, "config"), source)
        device = raw.get("device")
        if isinstance(device, str) and not Path(device).is_absolute():
            beside = path.parent / device
            if beside.suffix in (".yaml", ".yml") and beside.is_file():
                raw["device"] = str(beside)
    return config_from_raw(raw, overrides, source)


def config_from_raw(
    raw: dict, overrides: list[str] | None = None, origin: str = "config"
) -> ThermalConfig:
    """Validate a raw config dict after `a.b=v` overrides; the profile is loaded to check it."""
    cfg = validate(ThermalConfig, apply_overrides(raw, overrides or []), origin)
    cfg.profile()  # a bad or missing profile is reported now, as bad input
    return cfg
