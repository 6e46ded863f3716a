"""`dlion compare DIR...`: several finished runs on one accuracy-vs-time plot (the mean
over replicas as a line, the worst replica as a band below it) and their summaries side
by side. Reads only what every run writes: metrics.jsonl and summary.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from dlion.core.errors import DataError
from dlion.report.metrics import read_metrics


@dataclass(frozen=True)
class RunCurve:
    """One run: its label, summary.json, and (t, mean, worst) per evaluation."""

    label: str
    summary: dict[str, Any]
    t: list[float]
    mean: list[float]
    worst: list[float]


# The summary fields shown side by side, with how to print each.
FIELDS: tuple[tuple[str, str], ...] = (
    ("scenario", "{}"),
    ("strategy", "{}"),
    ("seed", "{}"),
    ("engine", "{}"),
    ("workers", "{}"),
    ("target_acc", "{:.4g}"),
    ("tta_s", "{:.2f}"),
    ("final_acc", "{:.4f}"),
    ("final_min_acc", "{:.4f}"),
    ("final_loss", "{:.4f}"),
    ("time_s", "{:.2f}"),
    ("iterations", "{}"),
    ("bytes_sent", "{:.4g}"),
)


def load_run(run_dir: Path) -> RunCurve:
    """A run directory's curve and summary; DataError naming the file if it is not one."""
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    for needed in (summary_file, metrics_file):
        if not needed.is_file():
            raise DataError(f"{run_dir}: no {needed.name} (not a finished dlion run)")
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{summary_file}: not readable JSON: {e}") from e
    if not isinstance(summary, dict) or "runs" in summary:
        raise DataError(f"{summary_file}: not the summary of one training run")
    evals = [e for e in read_metrics(metrics_file) if e.get("event") == "eval"]
    if not evals:
        raise DataError(f"{metrics_file}: no evaluation points")
    try:
        points = sorted((float(e["t"]), e["mean_acc"], e["min_acc"]) for e in evals)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{metrics_file}: malformed eval event ({e})") from e
    nan = float("nan")
    return RunCurve(
        label=str(run_dir),
        summary=summary,
        t=[t for t, _, _ in points],
        mean=[nan if m is None else float(m) for _, m, _ in points],
        worst=[nan if w is None else float(w) for _, _, w in points],
    )


def short_labels(dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two names are the same."""
    names = [d.name or str(d) for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs, strict=True)]


def plot_runs(runs: Sequence[RunCurve], path: Path, *, target: float | None) -> Path:
    """Mean metric against time per run, the worst replica as a shaded band; a PNG."""
    from dlion.report.plots import plt, png_figure  # pyplot with the headless backend chosen

    metric = runs[0].summary.get("metric", "accuracy")
    with png_figure(path, figsize=(8, 4.8)) as ax:
        for i, run in enumerate(runs):
            color = plt.get_cmap("tab10")(i % 10)
            engine = run.summary.get("engine", "?")
            ax.plot(run.t, run.mean, color=color, linewidth=1.8, label=f"{run.label} ({engine})")
            ax.fill_between(run.t, run.worst, run.mean, color=color, alpha=0.18, linewidth=0)
        if target is not None:
            ax.axhline(
                target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}"
            )
        if metric == "accuracy":
            ax.set_ylim(0.0, 1.0)
        engines = {r.summary.get("engine") for r in runs}
        clock = "simulated" if engines == {"sim"} else "wall" if engines == {"dist"} else "run"
        ax.set_xlabel(f"{clock} time (s)")
        ax.set_ylabel(f"{metric} (line: mean over replicas, band: down to the worst)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return path


def summary_table(runs: Sequence[RunCurve]) -> Table:
    """One column per run, one row per summary field."""
    table = Table(title="runs side by side")
    table.add_column("field")
    for run in runs:
        table.add_column(run.label, justify="right")
    for name, fmt in FIELDS:
        if all(name not in r.summary for r in runs):
            continue
        cells = []
        for run in runs:
            value = run.summary.get(name)
            if value is None:
                cells.append("never" if name == "tta_s" and name in run.summary else "—")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(fmt.format(value))
            else:
                cells.append(str(value))
        table.add_row(name, *cells)
    return table
