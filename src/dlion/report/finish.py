"""What every finished training run leaves behind, whichever engine or launcher ran it:
the accuracy-vs-time plot, the per-run scalars (CSV, TensorBoard when installed) and the
lines printed at the end (`dlion train`, torchrun's rank 0)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dlion.report.metrics import EvalPoint
from dlion.report.scalars import write_scalars


def metric_text(metric: str) -> Callable[[float], str]:
    """How a metric value is printed: accuracy as a percentage, anything else as a number."""
    if metric == "accuracy":
        return lambda v: f"{v:.2%}"
    return lambda v: f"{v:.4g}"


def finish_run(
    summary: dict[str, Any],
    points: Sequence[EvalPoint],
    out_dir: Path,
    *,
    name: str,
    target: float,
) -> list[str]:
    """Write the plot and the scalars of a finished run into `out_dir`; return the files
    written (names relative to out_dir)."""
    from dlion.report.plots import plot_accuracy_vs_time

    wall = summary.get("engine") == "dist"
    plot_accuracy_vs_time(
        {summary["strategy"]: [(p.t, p.mean_acc) for p in points]},
        out_dir / "accuracy_vs_time.png",
        title=f"{name}: {summary['strategy']}",
        target=target,
        xlabel="wall time (s)" if wall else "simulated time (s)",
    )
    return ["accuracy_vs_time.png", *write_scalars(points, out_dir)]


def summary_lines(summary: dict[str, Any], out_dir: Path, written: Sequence[str]) -> list[str]:
    """The lines (rich markup) that end a training run: time to target, final metric,
    membership changes, the saved model and the files written."""
    s = summary
    tta = "not reached" if s["tta_s"] is None else f"{s['tta_s']:.2f} s"
    metric = s.get("metric", "accuracy")
    shown = metric_text(metric)
    lines = [
        f"[bold]{s['scenario']}[/] {s['strategy']} seed {s['seed']}: "
        f"time to {shown(s['target_acc'])} = {tta}, final {metric} {shown(s['final_acc'])} "
        f"(worst replica {shown(s['final_min_acc'])}), {s['bytes_sent'] / 1e6:.1f} MB sent, "
        f"{s['iterations']} iterations in {s['time_s']:.2f} "
        + ("wall s" if s["engine"] == "dist" else "simulated s")
    ]
    lines += [f"membership: {change}" for change in s.get("membership", [])]
    saved = s.get("saved_model")
    if saved is not None:
        lines.append(
            f"model: {out_dir}/{saved['file']} ({saved['replica']}, {metric} "
            f"{shown(saved['metric'])}); reload with dlion.load_model({str(out_dir)!r})"
        )
    files = ", ".join(["metrics.jsonl", "config.yaml", *written])
    lines.append(f"wrote {out_dir}/summary.json, {files}")
    return lines
