"""Accuracy-versus-time plots (PNG, headless Agg backend) and averaging of curves over seeds."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

# There is no display on the machines this runs on; Agg must be chosen before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt


@contextmanager
def png_figure(
    path: Path, dpi: int = 120, suptitle: str | None = None, **subplots: Any
) -> Iterator[Any]:
    """The axes of `plt.subplots(**subplots)` for the block to draw on; the figure is
    written to `path` as a PNG when the block ends without an error, and closed either way
    (long sweeps draw many figures; leaking them exhausts memory)."""
    fig, axes = plt.subplots(**subplots)
    try:
        yield axes
        if suptitle is not None:
            fig.suptitle(suptitle)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def plot_accuracy_vs_time(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    target: float | None = None,
    xlabel: str = "simulated time (s)",
) -> Path:
    """Plot one accuracy line per label and a dashed target line; save a PNG and return its path."""
    with png_figure(path, figsize=(7, 4.5)) as ax:
        for i, (label, curve) in enumerate(curves.items()):
            points = sorted(curve)
            ax.plot(
                [t for t, _ in points],
                [a for _, a in points],
                label=label,
                **_line_style(i, label),
            )
        if target is not None:
            ax.axhline(
                target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}"
            )
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    return path


def _line_style(index: int, label: str) -> dict[str, Any]:  # Any: matplotlib's **kwargs
    """A distinct look per line: the default 10-colour cycle repeats in a 12-strategy bench.
    The ideal bound is a dotted black reference; DLion itself is drawn thicker."""
    if label == "ideal":
        return {"color": "black", "linestyle": ":", "linewidth": 1.5}
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    # Dark shades first (even indices), then the light ones.
    color = colors[(2 * index) % 20 + (2 * index) // 20 % 2]
    width = 2.6 if label == "dlion" else 1.4
    return {"color": color, "linestyle": "-" if index < 10 else "--", "linewidth": width}


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Mean over seeds of step-interpolated curves, on the union of their time grids.

    Each curve carries its last value forward. The grid is restricted to times every curve
    covers: from the latest first time to the earliest last time, so no seed is extrapolated.
    """
    series = [sorted(c) for c in curves]
    if not series or any(not s for s in series):
        return []
    start = max(s[0][0] for s in series)
    end = min(s[-1][0] for s in series)
    grid = sorted({t for s in series for t, _ in s if start <= t <= end})
    times = [[t for t, _ in s] for s in series]
    result: list[tuple[float, float]] = []
    for t in grid:
        total = 0.0
        for s, ts in zip(series, times, strict=True):
            # Last point at or before t; bisect_right makes a repeated time take its last value.
            total += s[bisect.bisect_right(ts, t) - 1][1]
        result.append((t, total / len(series)))
    return result
