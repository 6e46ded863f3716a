"""Reporting: metrics logs, time-to-accuracy, benchmark tables, plots and progress bars."""

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
from dlion.report.plots import mean_curve, plot_accuracy_vs_time
from dlion.report.progress import TrainProgress
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
