"""The Linux sysfs backend against a fake sysfs tree, and `dlion thermal run` end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from dlion.cli.commands import main
from dlion.thermal.backends import SysfsBackend
from dlion.thermal.errors import ThermalError

LEVELS_KHZ = [600_000 + 100_000 * i for i in range(10)]  # 600 .. 1500 MHz


def make_sysfs(
    root: Path,
    *,
    temps_mc: dict[str, int] | None = None,
    available: bool = True,
    policies: int = 1,
) -> Path:
    """A fake /sys under `root`: thermal zones with `temp` in millidegrees, cpufreq policies."""
    for i, (kind, temp) in enumerate((temps_mc or {"cpu-thermal": 65_000}).items()):
        zone = root / "sys/class/thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{temp}\n")
    for i in range(policies):
        policy = root / "sys/devices/system/cpu/cpufreq" / f"policy{i}"
        policy.mkdir(parents=True)
        if available:
            (policy / "scaling_available_frequencies").write_text(
                " ".join(str(k) for k in LEVELS_KHZ) + " \n"
            )
        (policy / "scaling_max_freq").write_text("1500000\n")
        (policy / "cpuinfo_min_freq").write_text("600000\n")
        (policy / "cpuinfo_max_freq").write_text("1500000\n")
    return root


def _max_freq(root: Path, policy: int = 0) -> int:
    path = root / "sys/devices/system/cpu/cpufreq" / f"policy{policy}" / "scaling_max_freq"
    return int(path.read_text())


def test_reads_the_hottest_zone_or_the_named_one(tmp_path: Path) -> None:
    make_sysfs(tmp_path, temps_mc={"cpu-thermal": 65_500, "gpu-thermal": 71_250})
    assert SysfsBackend(tmp_path).read_temperature_c() == pytest.approx(71.25)
    assert SysfsBackend(tmp_path, zone="cpu-thermal").read_temperature_c() == pytest.approx(65.5)
    assert SysfsBackend(tmp_path, zone="thermal_zone1").read_temperature_c() == pytest.approx(71.25)
    with pytest.raises(ThermalError, match="--zone soc"):
        SysfsBackend(tmp_path, zone="soc")


def test_levels_from_the_table_or_the_cpuinfo_range(tmp_path: Path) -> None:
    a = make_sysfs(tmp_path / "a")
    assert SysfsBackend(a).frequency_levels_mhz() == [k / 1000 for k in LEVELS_KHZ]
    b = make_sysfs(tmp_path / "b", available=False)  # intel_pstate style: no table
    assert SysfsBackend(b, step_mhz=250).frequency_levels_mhz() == [600, 850, 1100, 1350, 1500]


def test_sets_limits_in_khz_on_every_policy_and_restores(tmp_path: Path) -> None:
    make_sysfs(tmp_path, policies=2)
    backend = SysfsBackend(tmp_path)
    backend.set_frequency_limit_mhz(1100)
    assert _max_freq(tmp_path, 0) == 1_100_000
    assert _max_freq(tmp_path, 1) == 1_100_000
    assert [mhz for _, mhz in backend.writes] == [1100]
    backend.restore()
    assert _max_freq(tmp_path, 0) == 1_500_000
    assert _max_freq(tmp_path, 1) == 1_500_000


@pytest.mark.parametrize(
    ("breakage", "fragment"),
    [
        ("no-thermal", "sys/class/thermal: no thermal_zone"),
        ("no-cpufreq", "no cpufreq policy with scaling_max_freq"),
        ("bad-temp", "expected an integer"),
        ("bad-max", "expected an integer"),
    ],
)
def test_missing_or_broken_files_are_one_line_errors(
    tmp_path: Path, breakage: str, fragment: str
) -> None:
    make_sysfs(tmp_path)
    if breakage == "no-thermal":
        (tmp_path / "sys/class/thermal/thermal_zone0/temp").unlink()
    elif breakage == "no-cpufreq":
        (tmp_path / "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq").unlink()
    elif breakage == "bad-temp":
        (tmp_path / "sys/class/thermal/thermal_zone0/temp").write_text("hot\n")
    else:
        (tmp_path / "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq").write_text("x")
    with pytest.raises(ThermalError) as info:
        backend = SysfsBackend(tmp_path)
        backend.read_temperature_c()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write read-only files")
def test_read_only_scaling_max_freq_is_refused(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    path = tmp_path / "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq"
    path.chmod(0o444)
    with pytest.raises(ThermalError, match="scaling_max_freq: not writable"):
        SysfsBackend(tmp_path)


# ----------------------------------------------------------------------------- dlion thermal run

# Reads scaling_max_freq every 20 ms for ~0.8 s into a log, then exits with status 3.
WATCHER = (
    "import sys, time\n"
    "src, log = sys.argv[1], sys.argv[2]\n"
    "seen = []\n"
    "end = time.monotonic() + 0.8\n"
    "while time.monotonic() < end:\n"
    "    seen.append(open(src).read().strip())\n"
    "    time.sleep(0.02)\n"
    "open(log, 'w').write(' '.join(seen))\n"
    "sys.exit(3)\n"
)


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_run_reactive_writes_limits_and_propagates_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_sysfs(tmp_path / "root", temps_mc={"cpu-thermal": 75_000})  # above 70 °C
    src = root / "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq"
    log = tmp_path / "seen.txt"
    out = tmp_path / "out"
    rc = main(
        [
            "thermal", "run", "--policy", "reactive", "--threshold", "70", "--interval", "0.1",
            "--root", str(root), "--out", str(out), "--",
            sys.executable, "-c", WATCHER, str(src), str(log),
        ]
    )  # fmt: skip
    assert rc == 3
    seen = [int(v) for v in log.read_text().split()]
    # The command saw the limit step down from 1.4 GHz, one level per period.
    assert seen[0] == 1_400_000
    assert min(seen) < 1_200_000
    assert seen == sorted(seen, reverse=True)
    assert set(seen) <= set(LEVELS_KHZ)
    assert _max_freq(root) == 1_500_000  # restored afterwards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["returncode"] == 3
    assert summary["limits_written"] >= 5
    assert summary["share_below"] == 0.0
    assert (out / "temperature_frequency.png").read_bytes()[:4] == b"\x89PNG"
    assert "exit 3" in capsys.readouterr().out


def test_run_sparta_short_command_learns_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_sysfs(tmp_path / "root", temps_mc={"cpu-thermal": 45_000})
    table = tmp_path / "table.json"
    argv = [
        "thermal", "run", "--policy", "sparta", "--threshold", "70", "--ambient", "25",
        "--interval", "0.05", "--root", str(root), "--table", str(table), "--app", "summer",
        "--", sys.executable, "-c", "import time; sum(range(10**6)); time.sleep(0.3)",
    ]  # fmt: skip
    assert main(argv) == 0
    entry = json.loads(table.read_text())["entries"][0]
    assert entry["app"] == "summer"
    assert entry["ambient_c"] == 25.0
    # 45 °C is far below the threshold: it ran at the top level throughout.
    assert entry["frequency_mhz"] == pytest.approx(1500.0)
    assert _max_freq(root) == 1_500_000
    capsys.readouterr()
    # The second run starts from the table.
    assert main(argv) == 0
    assert json.loads(table.read_text())["entries"][0]["runs"] == 2


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--", "no-such-command-xyz"], "no-such-command-xyz: command not found"),
        (["--policy", "turbo", "--", "true"], "--policy: unknown policy 'turbo'"),
        (["--interval", "0", "--", "true"], "--interval"),
        (["--threshold", "20", "--", "true"], "--threshold"),
        (["--set", "sparta.margin=1", "--", "true"], "sparta.margin"),
        (["--set", "sparta.margin_c=-1", "--", "true"], "sparta.margin_c"),
        (["--profile", "nope", "--", "true"], "nope"),
        (["--zone", "soc", "--", "true"], "--zone soc"),
        ([], "Missing argument"),
    ],
)
def test_run_bad_input_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    root = make_sysfs(tmp_path)
    rc = main(["thermal", "run", "--root", str(root), "--table", str(tmp_path / "t.json"), *extra])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert fragment in line
    assert _max_freq(root) == 1_500_000


def _real_sysfs_usable() -> bool:
    try:
        SysfsBackend(Path("/"))
    except ThermalError:
        return False
    return True


@pytest.mark.skipif(_real_sysfs_usable(), reason="this machine exposes writable cpufreq")
def test_run_on_this_machine_says_why_it_cannot(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["thermal", "run", "--policy", "sparta", "--threshold", "70", "--", "true"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "sys/" in line
    assert "thermal simulate" in line


def test_unwritable_limit_is_refused_even_for_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a container even root cannot write cpufreq; stand in for that kernel refusal.
    make_sysfs(tmp_path)
    monkeypatch.setattr("dlion.thermal.backends.os.access", lambda path, mode: False)
    with pytest.raises(ThermalError, match=r"scaling_max_freq: not writable \(run as root"):
        SysfsBackend(tmp_path)
