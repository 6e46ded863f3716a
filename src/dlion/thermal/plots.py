"""Temperature and frequency over time (PNG, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dlion.report.plots import png_figure

# (t_s, temp_c, limit_mhz) per point
Trace = Sequence[tuple[float, float, float]]


def plot_temperature_frequency(
    traces: Mapping[str, Trace], path: Path, *, title: str, threshold_c: float
) -> Path:
    """Two stacked panels sharing time: temperature with the threshold, and the frequency
    limit (a step line: a limit holds until the next decision). One line per label."""
    with png_figure(path, dpi=110, nrows=2, ncols=1, figsize=(8, 6), sharex=True) as (ax_t, ax_f):
        for label, trace in traces.items():
            ts = [p[0] for p in trace]
            (line,) = ax_t.plot(ts, [p[1] for p in trace], label=label, linewidth=1.2)
            ax_f.step(ts, [p[2] for p in trace], where="post", color=line.get_color(), linewidth=1)
        ax_t.axhline(threshold_c, color="red", linestyle="--", linewidth=1, label="threshold")
        ax_t.set_ylabel("temperature (°C)")
        ax_t.set_title(title)
        ax_t.grid(True, alpha=0.3)
        ax_t.legend(loc="lower right", fontsize="small")
        ax_f.set_ylabel("frequency limit (MHz)")
        ax_f.set_xlabel("time (s)")
        ax_f.grid(True, alpha=0.3)
    return path
