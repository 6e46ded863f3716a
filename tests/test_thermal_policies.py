"""Thermal policies: fixed cap, reactive hysteresis, Sparta's prediction, filter and table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dlion.thermal.config import (
    FixedCapOptions,
    PolicyConfig,
    ReactiveOptions,
    SpartaOptions,
    load_thermal_config,
)
from dlion.thermal.device import load_profile
from dlion.thermal.errors import ThermalError
from dlion.thermal.policies import (
    FixedCap,
    Observation,
    Performance,
    PolicyContext,
    Reactive,
    Sparta,
    build_policy,
    snap_down,
)
from dlion.thermal.sim import simulate
from dlion.thermal.table import StartTable, ambient_bucket

RPI4 = load_profile("rpi4")
LEVELS = RPI4.frequencies_mhz  # 600 .. 1500 in 100 MHz steps


def _ctx(ambient: float = 35.0, table: StartTable | None = None, app: str = "app") -> PolicyContext:
    return PolicyContext(70.0, ambient, app, RPI4, table)


def _obs(t: float, temp: float, done: float = 0.0, total: float | None = None) -> Observation:
    return Observation(t, temp, done, total)


def test_snap_down() -> None:
    assert snap_down(LEVELS, 1250) == 1200
    assert snap_down(LEVELS, 1200) == 1200
    assert snap_down(LEVELS, 100) == 600
    assert snap_down(LEVELS, 9999) == 1500


def test_performance_and_fixed_cap() -> None:
    assert Performance(LEVELS, _ctx()).decide(_obs(0, 99.0)) == 1500
    assert FixedCap(LEVELS, _ctx(), FixedCapOptions()).decide(_obs(0, 20.0)) == 1100  # 0.75*1500
    assert FixedCap(LEVELS, _ctx(), FixedCapOptions(cap_mhz=1250)).cap_mhz == 1200
    assert FixedCap(LEVELS, _ctx(), FixedCapOptions(cap_mhz=100)).cap_mhz == 600


def test_reactive_steps_with_hysteresis() -> None:
    policy = Reactive(LEVELS, _ctx(), ReactiveOptions(hysteresis_c=2.0))
    temps = [60.0, 71.0, 70.5, 70.0, 69.0, 68.5, 68.0, 67.9, 67.9, 70.2, 69.9]
    expected = [1500, 1400, 1300, 1200, 1200, 1200, 1200, 1300, 1400, 1300, 1300]
    got = [policy.decide(_obs(i, t)) for i, t in enumerate(temps)]
    assert got == expected
    # Stays at the bottom level however hot it gets.
    for i in range(20):
        policy.decide(_obs(100 + i, 90.0))
    assert policy.decide(_obs(200, 90.0)) == 600


def _sparta(**opts: object) -> Sparta:
    return Sparta(LEVELS, _ctx(), SpartaOptions(**opts))


def test_sparta_prediction_is_the_rc_closed_form() -> None:
    s = _sparta()
    power = RPI4.power_w(1500)  # heat scale 1
    steady = 35.0 + 8.6 * power
    assert s.steady_state_c(1500) == pytest.approx(steady)
    tau = 8.6 * 14.0
    assert s.predict_c(60.0, 1500, 5.0) == pytest.approx(
        steady + (60 - steady) * math.exp(-5 / tau)
    )


def test_sparta_first_choice_without_history() -> None:
    # A cool device: even 1.5 GHz stays under 69.25 °C for the next second.
    assert _sparta().decide(_obs(0, 40.0)) == 1500
    # At the target (70 - 0.75): the highest level that does not heat past it in one second.
    # 700 MHz settles at 35 + 8.6 (2.7 + 3.7 (7/15) (0.8111/0.9)^2) = 70.28 °C, whose first
    # second from 69.25 ends at 69.2585 > 69.25; 600 MHz settles at 69.08 <= 69.25.
    assert _sparta().decide(_obs(0, 69.25)) == 600
    # At or above the threshold: the lowest level.
    assert _sparta().decide(_obs(0, 70.0)) == 600


def test_sparta_overshoot_cools_back_at_a_sustainable_level() -> None:
    # Between target and threshold it picks the highest level whose steady state is under
    # target rather than dropping to the bottom: with heat scale 0.2 that is 1500 MHz?
    s = _sparta(initial_heat_scale=0.2)
    assert s.steady_state_c(1500) <= s.target_c  # 35 + 8.6 (2.7 + 0.74) = 64.6
    assert s.decide(_obs(0, 69.6)) == 1500


def test_sparta_filter_learns_the_heat_scale_from_exact_readings() -> None:
    s = _sparta(noise_c=0.1)
    true_k = 0.5
    temp, mhz, done = 40.0, s.decide(_obs(0, 40.0, 0.0, 1e9)), 0.0
    for t in range(1, 200):
        power = RPI4.static_power_w + true_k * RPI4.dynamic_power_w(mhz)
        steady = 35.0 + 8.6 * power
        temp = steady + (temp - steady) * math.exp(-1.0 / RPI4.tau_s)
        done += 1.0
        mhz = s.decide(_obs(t, temp, done, 1e9))
    assert s.heat_scale == pytest.approx(true_k, abs=0.03)
    assert s.temp_c == pytest.approx(temp, abs=0.05)
    # It has learned the work is cooler than assumed and runs faster than 600 MHz.
    assert mhz > 600


def test_sparta_idle_periods_leave_the_heat_scale_alone() -> None:
    s = _sparta()
    s.decide(_obs(0, 60.0, 5.0, 100.0))
    for t in range(1, 30):  # no progress: idle, the device cools fast
        s.decide(_obs(t, 60.0 - 0.5 * t, 5.0, 100.0))
    assert s.heat_scale == 1.0


def test_sparta_remaining_work_shortens_the_horizon() -> None:
    # Progress 1 unit/s per MHz at 1000 MHz; 10 units left = 0.01 s at 1000 MHz.
    s = _sparta(horizon_s=50.0)
    s.decide(_obs(0, 69.0, 0.0, 10_000.0))
    s.rate_per_mhz = 1.0
    s._last = (0.0, 1000.0, 0.0)
    s.temp_c = 69.0
    # With 50 s of look-ahead 1.5 GHz would be refused; with the 0.0067 s left it is fine.
    assert s.predict_c(69.0, 1500, 50.0) > s.target_c
    assert s.choose(69.0, _obs(1, 69.0, 9_990.0, 10_000.0)) == 1500
    assert s.choose(69.0, _obs(1, 69.0, 0.0, None)) < 1500


# ----------------------------------------------------------------------------- start table


def test_ambient_buckets() -> None:
    assert ambient_bucket(33.0, 5.0) == 35.0
    assert ambient_bucket(32.4, 5.0) == 30.0
    assert ambient_bucket(25.0, 10.0) == 20.0  # round half to even: 2.5 -> 2


def test_table_round_trip_and_blend(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "table.json"
    table = StartTable(path)
    table.update("cam", 34.0, frequency_mhz=900.0, heat_scale=0.8, progress_rate=2.0)
    table.save()
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["entries"] == [
        {
            "app": "cam",
            "ambient_c": 35.0,
            "frequency_mhz": 900.0,
            "heat_scale": 0.8,
            "progress_rate": 2.0,
            "runs": 1,
        }
    ]
    again = StartTable(path)
    assert again.entries() == table.entries()
    entry = again.update(
        "cam", 36.0, frequency_mhz=1100.0, heat_scale=0.6, progress_rate=None, weight=0.25
    )
    assert entry.frequency_mhz == pytest.approx(0.75 * 900 + 0.25 * 1100)
    assert entry.heat_scale == pytest.approx(0.75 * 0.8 + 0.25 * 0.6)
    assert entry.progress_rate == 2.0
    assert entry.runs == 2
    assert again.lookup("cam", 25.0) is None
    assert again.lookup("other", 35.0) is None
    # No temp files are left next to the table.
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.json"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"version": 1, "entries": [{"app": "a"}]}', "entries.0"),
        ('{"version": 2, "entries": []}', "version 2"),
        ('{"version": 1, "entries": [], "extra": 1}', "extra"),
    ],
)
def test_bad_table_file_is_one_line_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ThermalError) as info:
        StartTable(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_sparta_second_run_starts_at_the_learned_frequency(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    overrides = ["ambient_c=35", "workload=compute", f"policy.sparta.table_path={path}"]
    first = simulate(load_thermal_config("rpi4", [*overrides, "sim.seed=1"]))
    assert first.summary["started_from_table"] is False
    assert first.summary["first_limit_mhz"] == 1500  # a cold device, nothing learned yet
    learned = first.summary["learned"]
    # It sustained well under f_max once hot (35 °C ambient needs about 700-900 MHz).
    assert 600 <= learned["frequency_mhz"] < 1100
    entry = StartTable(path).lookup("compute", 35.0)
    assert entry is not None
    assert entry.frequency_mhz == pytest.approx(learned["frequency_mhz"])
    assert entry.heat_scale == pytest.approx(learned["heat_scale"])

    second = simulate(load_thermal_config("rpi4", [*overrides, "sim.seed=2"]))
    assert second.summary["started_from_table"] is True
    assert second.summary["first_limit_mhz"] == snap_down(LEVELS, entry.frequency_mhz)
    assert StartTable(path).lookup("compute", 35.0).runs == 2
    # Another ambient bucket has learned nothing.
    third = simulate(load_thermal_config("rpi4", [*overrides[1:], "ambient_c=25", "sim.seed=3"]))
    assert third.summary["started_from_table"] is False


def test_sparta_without_learning_leaves_the_table_untouched(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    overrides = [f"policy.sparta.table_path={path}", "policy.sparta.learn=false"]
    simulate(load_thermal_config("rpi4", overrides))
    assert not path.exists()


def test_build_policy_by_name() -> None:
    for name, cls in [
        ("performance", Performance),
        ("fixed-cap", FixedCap),
        ("reactive", Reactive),
        ("sparta", Sparta),
    ]:
        assert isinstance(build_policy(PolicyConfig(name=name), LEVELS, _ctx()), cls)
    with pytest.raises(ThermalError):
        Performance([], _ctx())


def test_sparta_keeps_under_threshold_where_performance_does_not() -> None:
    base = ["ambient_c=35", "workload=compute", "sim.seed=1", "policy.sparta.learn=false"]
    perf = simulate(load_thermal_config("rpi4", [*base, "policy.name=performance"]))
    sparta = simulate(load_thermal_config("rpi4", [*base, "policy.name=sparta"]), StartTable(None))
    assert sparta.summary["feasible"]  # this unit's 600 MHz settles under 70 °C
    assert perf.summary["share_below"] < 0.5
    assert sparta.summary["share_below"] >= 0.94
    assert sparta.summary["peak_c"] < 70.5


def test_an_infeasible_unit_is_flagged() -> None:
    # Seed 11 draws a unit with +8% thermal resistance: even 600 MHz settles above 70 °C.
    cfg = load_thermal_config("rpi4", ["ambient_c=35", "workload=compute", "sim.seed=11"])
    summary = simulate(cfg, StartTable(None)).summary
    assert summary["floor_c"] > 70.0
    assert not summary["feasible"]
    assert summary["share_below"] < 0.5
