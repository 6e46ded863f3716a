"""Thermal device model, workloads and simulator: hand-computed values and determinism."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlion.thermal.config import SimSettings, load_thermal_config
from dlion.thermal.device import DeviceProfile, euler_step, exact_step, load_profile
from dlion.thermal.errors import ThermalError
from dlion.thermal.sim import SimulatedDevice, simulate
from dlion.thermal.table import StartTable
from dlion.thermal.workload import SHIPPED_WORKLOADS, Phase, Workload, jittered

PROFILES_DIR = Path(__file__).resolve().parents[1] / "src" / "dlion" / "thermal_profiles"
RPI4_YAML = PROFILES_DIR / "rpi4.yaml"


def _profile(**changes: object) -> DeviceProfile:
    raw = {
        "name": "toy",
        "cores": 2,
        "frequencies_mhz": [500, 1000],
        "voltage_min_v": 0.8,
        "voltage_max_v": 1.0,
        "static_power_w": 1.0,
        "dynamic_power_max_w": 4.0,
        "thermal_resistance_c_per_w": 10.0,
        "thermal_capacitance_j_per_c": 5.0,
        **changes,
    }
    return DeviceProfile.model_validate(raw)


# ----------------------------------------------------------------------------- power model


def test_power_model_hand_computed() -> None:
    p = _profile()
    # f_max, activity 1: static + dynamic max.
    assert p.power_w(1000) == pytest.approx(5.0)
    # f_min: 1 + 4 * (500/1000) * (0.8/1.0)^2 = 1 + 4 * 0.5 * 0.64 = 2.28
    assert p.power_w(500) == pytest.approx(2.28)
    # 750 MHz, activity 0.5: V = 0.9; 1 + 0.5 * 4 * 0.75 * 0.81 = 2.215
    assert p.voltage_v(750) == pytest.approx(0.9)
    assert p.power_w(750, 0.5) == pytest.approx(2.215)
    # Outside the table the voltage is clamped to the end values.
    assert p.voltage_v(100) == pytest.approx(0.8)
    assert p.voltage_v(2000) == pytest.approx(1.0)


def test_shipped_rpi4_power_matches_its_sources() -> None:
    p = load_profile("rpi4")
    # The YAML's derivation: 2.7 W idle, 6.4 W under full load at 1.5 GHz.
    assert p.power_w(1500, 1.0) == pytest.approx(6.4)
    assert p.power_w(1500, 0.0) == pytest.approx(2.7)
    # 600 MHz: 2.7 + 3.7 * 0.4 * (0.8 / 0.9)^2
    assert p.power_w(600) == pytest.approx(2.7 + 3.7 * 0.4 * (0.8 / 0.9) ** 2)
    # Full load in 25 °C air settles near 80 °C, tau = 120.4 s.
    assert p.steady_state_c(25.0, p.power_w(1500)) == pytest.approx(25 + 8.6 * 6.4)
    assert p.tau_s == pytest.approx(8.6 * 14.0)


# ----------------------------------------------------------------------------- RC model


def test_euler_steps_hand_computed() -> None:
    # C dT/dt = P - (T - Ta)/R with T=25, Ta=25, P=6.4, R=8.6, C=14, dt=0.1.
    t1 = euler_step(25.0, 6.4, 25.0, 8.6, 14.0, 0.1)
    assert t1 == pytest.approx(25.0 + 0.1 * 6.4 / 14.0, abs=1e-12)  # 25.045714285714...
    t2 = euler_step(t1, 6.4, 25.0, 8.6, 14.0, 0.1)
    expected = t1 + 0.1 * (6.4 - (t1 - 25.0) / 8.6) / 14.0
    assert t2 == pytest.approx(expected, abs=1e-12)
    assert t2 == pytest.approx(25.0913906, abs=1e-7)
    # Cooling: above ambient with no power, the step goes down by dt (T - Ta) / (R C).
    assert euler_step(60.0, 0.0, 20.0, 10.0, 5.0, 0.5) == pytest.approx(60.0 - 0.5 * 4.0 / 5.0)


def test_exact_step_is_the_closed_form() -> None:
    assert exact_step(30.0, 80.0, 100.0, 100.0) == pytest.approx(80.0 - 50.0 * math.exp(-1.0))
    assert exact_step(30.0, 80.0, 100.0, 0.0) == pytest.approx(30.0)


@given(
    temp=st.floats(-20, 120),
    power=st.floats(0, 50),
    ambient=st.floats(-20, 50),
    r=st.floats(0.5, 20),
    c=st.floats(1, 100),
    frac=st.floats(0.0, 0.99),
)
def test_euler_step_moves_toward_steady_state_without_overshoot(
    temp: float, power: float, ambient: float, r: float, c: float, frac: float
) -> None:
    dt = frac * r * c  # stable: dt < tau
    steady = ambient + r * power
    new = euler_step(temp, power, ambient, r, c, dt)
    assert abs(new - steady) <= abs(temp - steady) + 1e-9
    assert (new - steady) * (temp - steady) >= -1e-9


def _settings(**changes: object) -> SimSettings:
    raw = {"sensor_noise_c": 0.0, "jitter": 0.0, "device_spread": 0.0, "dt_s": 0.1, **changes}
    return SimSettings.model_validate(raw)


def test_simulated_device_steps_match_hand_computed_euler() -> None:
    p = _profile()
    phases = [Phase(gcycles=10.0, activity=1.0)]
    dev = SimulatedDevice(
        p,
        phases,
        ambient_c=20.0,
        threshold_c=21.0,
        settings=_settings(),
        sensor_rng=np.random.default_rng(0),
    )
    dev.set_frequency_limit_mhz(1000)
    assert dev.wait(0.2)
    # P = 5 W: T1 = 20 + 0.1 * 5 / 5 = 20.1; T2 = 20.1 + 0.1 * (5 - 0.01) / 5 = 20.1998
    assert dev.temp_c == pytest.approx(20.1998, abs=1e-12)
    assert dev.read_temperature_c() == dev.temp_c  # no sensor noise configured
    assert dev.energy_j == pytest.approx(5.0 * 0.2)
    # 2 cores x 1000 MHz = 2 Gcycles/s
    assert dev.progress() == (pytest.approx(0.4), 10.0)
    assert dev.above_s == pytest.approx(0.0)


def test_simulated_run_ends_exactly_when_the_work_does() -> None:
    p = _profile()
    dev = SimulatedDevice(
        p,
        [Phase(gcycles=3.05), Phase(kind="idle", idle_s=0.33, activity=0.0)],
        ambient_c=20.0,
        threshold_c=90.0,
        settings=_settings(),
        sensor_rng=np.random.default_rng(0),
    )
    dev.set_frequency_limit_mhz(500)  # 1 Gcycle/s: 3.05 s of work, then 0.33 s idle
    while dev.wait(1.0):
        pass
    assert dev.finished
    assert dev.t_s == pytest.approx(3.38, abs=1e-9)
    # Energy: 3.05 s at 2.28 W plus 0.33 s at the static 1 W.
    assert dev.energy_j == pytest.approx(3.05 * 2.28 + 0.33 * 1.0)


def test_memory_bound_rate_formula() -> None:
    phase = Phase(gcycles=1.0, memory_bound=0.4)
    # 4 cores * 0.75 GHz / (0.6 + 0.4 * 750/1500) = 3.0 / 0.8 = 3.75
    assert phase.rate_gcycles_per_s(750, 4, 1500) == pytest.approx(3.75)
    assert phase.rate_gcycles_per_s(1500, 4, 1500) == pytest.approx(6.0)
    assert Phase(kind="idle", idle_s=1.0).rate_gcycles_per_s(1500, 4, 1500) == 0.0


def test_steady_state_reached_in_a_long_simulation() -> None:
    cfg = load_thermal_config(
        "rpi4",
        [
            "policy.name=performance",
            "sim.sensor_noise_c=0",
            "sim.jitter=0",
            "sim.device_spread=0",
            "threshold_c=100",
        ],
    )
    result = simulate(cfg)
    # compute workload at 1.5 GHz for 500 s = 4.2 tau: within e^-4.2 of 25 + 8.6 * 6.4
    final = result.samples[-1].temp_c
    steady = 25 + 8.6 * 6.4
    assert final == pytest.approx(steady - (steady - 25) * math.exp(-500 / (8.6 * 14)), abs=0.1)
    assert result.summary["completion_s"] == pytest.approx(3000 / 6.0, abs=1e-6)


# ----------------------------------------------------------------------------- workloads


def test_jitter_is_deterministic_per_seed_and_bounded() -> None:
    w = SHIPPED_WORKLOADS["bursty"]
    a = jittered(w, np.random.default_rng(3), 0.1)
    b = jittered(w, np.random.default_rng(3), 0.1)
    c = jittered(w, np.random.default_rng(4), 0.1)
    assert a == b
    assert a != c
    assert len(a) == 24
    for base, j in zip(w.expanded(), a, strict=True):
        assert 0.9 * (base.gcycles + base.idle_s) <= j.gcycles + j.idle_s
        assert j.gcycles + j.idle_s <= 1.1 * (base.gcycles + base.idle_s)


@pytest.mark.parametrize(
    "raw",
    [
        {"gcycles": 0.0},
        {"kind": "idle", "gcycles": 3.0, "idle_s": 1.0},
        {"gcycles": 1.0, "memory_bound": 1.0},
        {"gcycles": 1.0, "speed": 2},
    ],
)
def test_bad_phase_is_rejected(raw: dict) -> None:
    with pytest.raises(ValueError):
        Phase.model_validate(raw)


def test_total_work() -> None:
    w = Workload(name="w", phases=[Phase(gcycles=2.0), Phase(kind="idle", idle_s=1.0)], repeat=3)
    assert w.total_gcycles() == pytest.approx(6.0)


# ----------------------------------------------------------------------------- simulate


def _cfg(*overrides: str):
    return load_thermal_config("rpi4", ["ambient_c=35", "workload=bursty", *overrides])


@pytest.mark.parametrize("policy", ["sparta", "reactive"])
def test_simulation_is_deterministic_per_seed(policy: str) -> None:
    a = simulate(_cfg(f"policy.name={policy}", "sim.seed=7"), StartTable(None))
    b = simulate(_cfg(f"policy.name={policy}", "sim.seed=7"), StartTable(None))
    c = simulate(_cfg(f"policy.name={policy}", "sim.seed=8"), StartTable(None))
    assert a.summary == b.summary
    assert a.samples == b.samples
    assert a.summary["time_s"] != c.summary["time_s"]


def test_every_policy_meets_the_same_workload_and_device_for_a_seed() -> None:
    # Fixed frequency: completion time depends only on the (jittered) work, not on noise.
    fast = simulate(_cfg("policy.name=performance", "sim.seed=5"))
    noisy = simulate(_cfg("policy.name=performance", "sim.seed=5", "sim.sensor_noise_c=3"))
    assert fast.summary["time_s"] == noisy.summary["time_s"]


# ----------------------------------------------------------------------------- profile files

BAD_PROFILES = [
    ("name: x\ncores: 4\n", "frequencies_mhz"),
    (RPI4_YAML.read_text() + "fan_rpm: 3000\n", "fan_rpm"),
    ("name: [unclosed\n", "line"),
    ("- a\n- b\n", "mapping"),
    (
        RPI4_YAML.read_text().replace("[600, 700,", "[700, 600,"),
        "ascending",
    ),
    (
        RPI4_YAML.read_text().replace(
            "thermal_resistance_c_per_w: 8.6", "thermal_resistance_c_per_w: -1"
        ),
        "thermal_resistance_c_per_w",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_PROFILES)
def test_bad_profile_is_one_line_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ThermalError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message


def test_unknown_profile_name_lists_shipped() -> None:
    with pytest.raises(ThermalError, match="rpi4"):
        load_profile("raspberry-pi-9")


def test_shipped_profiles_load_and_note_sources() -> None:
    for name in ("rpi4", "jetson-nano", "nuc"):
        p = load_profile(name)
        text = (PROFILES_DIR / f"{name}.yaml").read_text()
        # every numeric field is preceded by a comment saying where it comes from
        lines = text.splitlines()
        for field in (
            "frequencies_mhz",
            "voltage_min_v",
            "static_power_w",
            "dynamic_power_max_w",
            "thermal_resistance_c_per_w",
            "thermal_capacitance_j_per_c",
        ):
            i = next(k for k, line in enumerate(lines) if line.startswith(field))
            assert lines[i - 1].startswith("#") or lines[i - 2].startswith("#"), (name, field)
        assert p.tau_s > 10 * 0.1  # the default Euler step is small against tau
