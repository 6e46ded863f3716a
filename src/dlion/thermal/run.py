"""Run a real command on this Linux machine under a policy (sysfs backend)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlion.report import write_json_atomic
from dlion.thermal.backends import SysfsBackend
from dlion.thermal.config import PolicyConfig
from dlion.thermal.control import Tick, control_loop
from dlion.thermal.device import DeviceProfile
from dlion.thermal.plots import plot_temperature_frequency
from dlion.thermal.policies import PolicyContext, build_policy
from dlion.thermal.table import StartTable


@dataclass(frozen=True)
class RunOutcome:
    returncode: int
    summary: dict[str, Any]


def run_command(
    argv: Sequence[str],
    *,
    policy: PolicyConfig,
    threshold_c: float,
    ambient_c: float,
    app: str,
    profile: DeviceProfile,
    root: Path = Path("/"),
    zone: str | None = None,
    interval_s: float = 1.0,
    table: StartTable | None = None,
    out_dir: Path | None = None,
) -> RunOutcome:
    """Check the sysfs tree (ThermalError if unusable), start `argv`, control it until it
    exits, put the original frequency limits back (also on Ctrl-C or an error)."""
    backend = SysfsBackend(root, zone=zone)
    ctx = PolicyContext(threshold_c, ambient_c, app, profile, table)
    chosen = build_policy(policy, backend.frequency_levels_mhz(), ctx)
    backend.start(argv)
    try:
        loop = control_loop(chosen, backend, interval_s)
    finally:
        backend.stop()
        backend.restore()
    code = backend.returncode if backend.returncode is not None else 1
    summary: dict[str, Any] = {
        "command": list(argv),
        "app": app,
        "policy": policy.name,
        "threshold_c": threshold_c,
        "ambient_c": ambient_c,
        "returncode": code,
        "time_s": loop.end_s,
        "share_below": _share_below(loop.ticks, loop.end_s, threshold_c),
        "peak_c": max(t.temp_c for t in loop.ticks),
        "limits_written": len(backend.writes),
        "levels_mhz": backend.frequency_levels_mhz(),
        **loop.learned,
    }
    if out_dir is not None:
        write_json_atomic(out_dir / "summary.json", summary)
        trace = [(t.t_s, t.temp_c, t.limit_mhz) for t in loop.ticks]
        plot_temperature_frequency(
            {policy.name: trace},
            out_dir / "temperature_frequency.png",
            title=f"{app} under {policy.name}",
            threshold_c=threshold_c,
        )
    return RunOutcome(code, summary)


def _share_below(ticks: Sequence[Tick], end_s: float, threshold_c: float) -> float:
    """Share of the time from the first reading to the end whose last reading was at or
    below the threshold (a reading holds until the next one)."""
    span = end_s - ticks[0].t_s
    if span <= 0:
        return 1.0 if ticks[0].temp_c <= threshold_c else 0.0
    above = 0.0
    for tick, nxt in zip(ticks, [*ticks[1:], None], strict=True):
        until = end_s if nxt is None else nxt.t_s
        if tick.temp_c > threshold_c:
            above += until - tick.t_s
    return 1.0 - above / span
