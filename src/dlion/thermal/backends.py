"""Backends behind one interface: read temperature, list/set the frequency limit, time and
progress. `SimulatedDevice` (sim.py) implements it for the simulator, `SysfsBackend` below
for a Linux machine (thermal zones and cpufreq under a configurable root, default `/`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from dlion.thermal.errors import ThermalError

THERMAL_DIR = "sys/class/thermal"
CPUFREQ_DIR = "sys/devices/system/cpu/cpufreq"


class Backend(ABC):
    """A device a policy controls while a workload runs on it."""

    @abstractmethod
    def frequency_levels_mhz(self) -> list[float]:
        """Frequency levels the limit can take, ascending."""

    @abstractmethod
    def read_temperature_c(self) -> float:
        """The current temperature reading (°C)."""

    @abstractmethod
    def set_frequency_limit_mhz(self, mhz: float) -> None:
        """Cap the CPU frequency at `mhz` until the next call."""

    @abstractmethod
    def now_s(self) -> float:
        """Seconds since the run started."""

    @abstractmethod
    def progress(self) -> tuple[float, float | None]:
        """(work done, total work or None when unknown)."""

    @abstractmethod
    def wait(self, seconds: float) -> bool:
        """Let the workload run for `seconds`; False once it has finished."""


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ThermalError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_int(path: Path) -> int:
    text = _read(path)
    try:
        return int(text)
    except ValueError:
        raise ThermalError(f"{path}: expected an integer, got {text[:40]!r}") from None


class SysfsBackend(Backend):
    """Linux: temperatures from thermal_zone*/temp (millidegrees C), frequency limits through
    cpufreq's scaling_max_freq (kHz) of every policy. Checks at construction that the files
    exist and are writable; `restore()` puts back the limits it found."""

    def __init__(
        self, root: Path = Path("/"), *, zone: str | None = None, step_mhz: float = 100.0
    ) -> None:
        self.root = root
        self.zones = self._find_zones(zone)
        self.policies = self._find_policies()
        self.original_khz = {p: _read_int(p / "scaling_max_freq") for p in self.policies}
        self.levels = self._find_levels(step_mhz)
        for policy in self.policies:
            self._check_writable(policy / "scaling_max_freq")
        self.writes: list[tuple[float, float]] = []  # (t_s, mhz) of every limit written
        self._start = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ discovery

    def _find_zones(self, zone: str | None) -> list[Path]:
        base = self.root / THERMAL_DIR
        zones = sorted(p for p in base.glob("thermal_zone*") if (p / "temp").is_file())
        if not zones:
            raise ThermalError(
                f"{base}: no thermal_zone*/temp files; this machine does not expose its "
                "temperature sensors (a container or VM?); try `dlion thermal simulate`"
            )
        if zone is None:
            return zones
        chosen = [
            p
            for p in zones
            if zone in (p.name, _read(p / "type") if (p / "type").is_file() else "")
        ]
        if not chosen:
            names = ", ".join(p.name for p in zones)
            raise ThermalError(f"--zone {zone}: no such thermal zone name or type ({names})")
        return chosen

    def _find_policies(self) -> list[Path]:
        base = self.root / CPUFREQ_DIR
        policies = sorted(p for p in base.glob("policy*") if (p / "scaling_max_freq").is_file())
        if not policies:  # older kernels: per-CPU cpufreq directories only
            cpus = self.root / "sys/devices/system/cpu"
            policies = sorted(
                p.parent for p in cpus.glob("cpu[0-9]*/cpufreq/scaling_max_freq") if p.is_file()
            )
        if not policies:
            raise ThermalError(
                f"{base}: no cpufreq policy with scaling_max_freq; CPU frequency scaling is "
                "not available here (a container or VM?); try `dlion thermal simulate`"
            )
        return policies

    def _find_levels(self, step_mhz: float) -> list[float]:
        """Levels of the fastest policy: scaling_available_frequencies, else step_mhz steps
        between cpuinfo_min_freq and cpuinfo_max_freq (intel_pstate lists no table)."""
        fastest = max(self.policies, key=self._max_khz)
        table = fastest / "scaling_available_frequencies"
        if table.is_file():
            try:
                khz = sorted({int(v) for v in _read(table).split()})
            except ValueError:
                raise ThermalError(f"{table}: expected frequencies in kHz") from None
            if khz:
                return [k / 1000.0 for k in khz]
        lo = _read_int(fastest / "cpuinfo_min_freq") / 1000.0
        hi = _read_int(fastest / "cpuinfo_max_freq") / 1000.0
        if hi <= 0 or lo > hi:
            raise ThermalError(f"{fastest}: cpuinfo_min_freq/cpuinfo_max_freq are not a range")
        levels, f = [], lo
        while f < hi - 1e-9:
            levels.append(f)
            f += step_mhz
        return [*levels, hi]

    def _max_khz(self, policy: Path) -> int:
        path = policy / "cpuinfo_max_freq"
        return _read_int(path) if path.is_file() else self.original_khz[policy]

    def _check_writable(self, path: Path) -> None:
        hint = "run as root, or try `dlion thermal simulate`"
        if not os.access(path, os.W_OK):
            raise ThermalError(f"{path}: not writable ({hint})")
        try:  # writing the current value back proves the write works and changes nothing
            path.write_text(str(self.original_khz[path.parent]))
        except OSError as exc:
            raise ThermalError(f"{path}: cannot write ({exc.strerror or exc}; {hint})") from None

    # ------------------------------------------------------------------ Backend

    def frequency_levels_mhz(self) -> list[float]:
        return list(self.levels)

    def read_temperature_c(self) -> float:
        """The hottest zone (or the chosen one), in °C."""
        return max(_read_int(z / "temp") for z in self.zones) / 1000.0

    def set_frequency_limit_mhz(self, mhz: float) -> None:
        for policy in self.policies:
            self._write_khz(policy, round(mhz * 1000))
        self.writes.append((self.now_s(), mhz))

    def _write_khz(self, policy: Path, khz: int) -> None:
        path = policy / "scaling_max_freq"
        lo_path = policy / "cpuinfo_min_freq"
        lo = _read_int(lo_path) if lo_path.is_file() else 0
        # A slower cluster (big.LITTLE) cannot go above its own maximum or below its minimum.
        value = min(max(khz, lo), self._max_khz(policy))
        try:
            path.write_text(str(value))
        except OSError as exc:
            raise ThermalError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def restore(self) -> None:
        """Put back the limits found at start."""
        for policy, khz in self.original_khz.items():
            self._write_khz(policy, khz)

    def now_s(self) -> float:
        return time.monotonic() - self._start

    def start(self, argv: Sequence[str]) -> None:
        """Start the command the policy runs under."""
        if not argv:
            raise ThermalError("COMMAND: give a command to run after --")
        if shutil.which(argv[0]) is None:
            raise ThermalError(f"{argv[0]}: command not found")
        self._start = time.monotonic()
        try:
            self._proc = subprocess.Popen(list(argv))
        except OSError as exc:
            raise ThermalError(f"{argv[0]}: cannot start ({exc.strerror or exc})") from None

    def progress(self) -> tuple[float, float | None]:
        """A command's progress is unknown; report elapsed seconds."""
        return self.now_s(), None

    def wait(self, seconds: float) -> bool:
        if self._proc is None:
            raise ThermalError("no command started")
        try:
            self._proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def stop(self) -> None:
        """Terminate the command if it still runs (e.g. on Ctrl-C); never waits forever."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
