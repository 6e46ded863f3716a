"""Table rows and accuracy-vs-latency plots for selective query (Kag et al., ICLR '23)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dlion.hybrid.evaluate import CLOUD_ONLY, EDGE_ONLY, ORACLE, Evaluation
from dlion.hybrid.inference import METHODS
from dlion.report.plots import png_figure

LABELS = {
    "router": "router",
    "knn": "kNN router",
    "entropy": "entropy threshold",
    "max_softmax": "max-softmax threshold",
    ORACLE: "oracle router",
    EDGE_ONLY: "edge-only",
    CLOUD_ONLY: "cloud-only",
}
EVAL_COLUMNS = (
    "target coverage",
    "method",
    "coverage",
    "accuracy (%)",
    "to cloud (%)",
    "latency (ms)",
)


def eval_rows(ev: Evaluation, targets: Sequence[float]) -> list[list[str]]:
    """One row per (target, method), then edge-only and cloud-only; cells as text."""
    rows = []
    for target in targets:
        for method in (*METHODS, ORACLE):
            p = ev.point(method, target)
            rows.append(
                [
                    f"{target:.2f}",
                    LABELS[method],
                    f"{p.coverage:.3f}",
                    f"{100 * p.accuracy:.2f}",
                    f"{100 * p.cloud_fraction:.1f}",
                    f"{1e3 * p.latency_s:.2f}",
                ]
            )
    for method in (EDGE_ONLY, CLOUD_ONLY):
        p = ev.point(method, None)
        rows.append(
            [
                "—",
                LABELS[method],
                f"{p.coverage:.3f}",
                f"{100 * p.accuracy:.2f}",
                f"{100 * p.cloud_fraction:.1f}",
                f"{1e3 * p.latency_s:.2f}",
            ]
        )
    return rows


def plot_accuracy_vs_latency(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    marks: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """One line per method of (latency s, accuracy) points, plus labelled single points (e.g.
    edge-only and cloud-only); latency in ms on the x axis. Saves a PNG and returns its path."""
    with png_figure(path, figsize=(7, 4.5)) as ax:
        for method, curve in curves.items():
            points = sorted(curve)
            style = "--" if method == ORACLE else "-"
            ax.plot(
                [1e3 * t for t, _ in points],
                [100 * a for _, a in points],
                style,
                label=LABELS.get(method, method),
                linewidth=1.5,
            )
        for name, (t, a) in (marks or {}).items():
            ax.plot([1e3 * t], [100 * a], "o", label=LABELS.get(name, name))
        ax.set_xlabel("expected latency per input (ms)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    return path


def plot_evaluation(ev: Evaluation, path: Path, title: str) -> Path:
    """The threshold-sweep curves of one evaluation, with edge-only and cloud-only marked."""
    curves = {m: [(p.latency_s, p.accuracy) for p in ps] for m, ps in ev.curves.items()}
    marks = {
        m: (ev.point(m, None).latency_s, ev.point(m, None).accuracy)
        for m in (EDGE_ONLY, CLOUD_ONLY)
    }
    return plot_accuracy_vs_latency(curves, path, title=title, marks=marks)
