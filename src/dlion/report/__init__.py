"""Reporting: metrics logs, time-to-accuracy, benchmark tables, plots and progress bars.

The plots (matplotlib, about a second to import) load on first use: every dist worker
imports this package and never draws.
"""

from typing import Any

from dlion.report.metrics import (
    EvalPoint,
    MetricsLog,
    reached_target,
    read_metrics,
    run_summary,
    time_to_accuracy,
    worst,
    write_json_atomic,
)
from dlion.report.progress import StartupStatus, TrainProgress
from dlion.report.tables import (
    AggregateRow,
    aggregate,
    bench_table,
    markdown_table,
    write_report,
)

__all__ = [
    "AggregateRow",
    "EvalPoint",
    "MetricsLog",
    "StartupStatus",
    "TrainProgress",
    "aggregate",
    "bench_table",
    "markdown_table",
    "mean_curve",
    "plot_accuracy_vs_time",
    "reached_target",
    "read_metrics",
    "run_summary",
    "time_to_accuracy",
    "worst",
    "write_json_atomic",
    "write_report",
]


_LAZY = {"mean_curve": "dlion.report.plots", "plot_accuracy_vs_time": "dlion.report.plots"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlion.report' has no attribute {name!r}")
