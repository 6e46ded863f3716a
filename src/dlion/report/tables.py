"""Aggregation of run records over seeds, and the benchmark table as rich, markdown and report.

`rich_grid` and `markdown_grid` lay out any table of text cells; every report uses them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from dlion.core.errors import DataError

COLUMNS: tuple[str, ...] = (
    "scenario",
    "strategy",
    "TTA (s) mean",
    "reached",
    "speedup vs baseline",
    "final acc (%)",
    "MB sent",
)

_MISSING = "—"


@dataclass(frozen=True)
class AggregateRow:
    """One (scenario, strategy) cell of a benchmark, summarized over its seeds."""

    scenario: str
    strategy: str
    seeds: int
    tta_mean: float | None  # mean over seeds that reached; None if none reached
    reached: int  # how many seeds reached the target
    speedup_vs_baseline: float | None  # baseline tta_mean / this tta_mean, per scenario
    final_acc_mean: float
    final_acc_std: float
    bytes_mean: float


def _field(run: Mapping[str, object], key: str) -> object:
    try:
        return run[key]
    except KeyError:
        raise DataError(f"run record is missing {key!r}: {dict(run)!r}") from None


def _number(run: Mapping[str, object], key: str) -> float:
    value = _field(run, key)
    # bool is an int subclass but never a meaningful metric here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"run record field {key!r} must be a number, got {value!r}")
    return float(value)


def _optional_number(run: Mapping[str, object], key: str) -> float | None:
    if _field(run, key) is None:
        return None
    return _number(run, key)


def aggregate(
    runs: Sequence[Mapping[str, object]], baseline: str = "allreduce"
) -> list[AggregateRow]:
    """Group runs by (scenario, strategy) in first-seen order and summarize each group.

    final_acc_std is the sample standard deviation (0.0 for a single seed).
    """
    groups: dict[tuple[str, str], list[Mapping[str, object]]] = {}
    for run in runs:
        key = (str(_field(run, "scenario")), str(_field(run, "strategy")))
        # dicts keep insertion order, which gives first-seen order for scenarios and strategies.
        groups.setdefault(key, []).append(run)

    partial: list[tuple[str, str, int, float | None, int, float, float, float]] = []
    for (scenario, strategy), group in groups.items():
        ttas = [t for t in (_optional_number(r, "tta_s") for r in group) if t is not None]
        accs = [_number(r, "final_acc") for r in group]
        sent = [_number(r, "bytes_sent") for r in group]
        tta_mean = statistics.fmean(ttas) if ttas else None
        acc_std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        partial.append(
            (
                scenario,
                strategy,
                len(group),
                tta_mean,
                len(ttas),
                statistics.fmean(accs),
                acc_std,
                statistics.fmean(sent),
            )
        )

    baseline_tta = {p[0]: p[3] for p in partial if p[1] == baseline}
    rows: list[AggregateRow] = []
    for scenario, strategy, seeds, tta_mean, reached, acc_mean, acc_std, bytes_mean in partial:
        base = baseline_tta.get(scenario)
        speedup = None
        if base is not None and tta_mean is not None and tta_mean > 0:
            speedup = base / tta_mean
        rows.append(
            AggregateRow(
                scenario=scenario,
                strategy=strategy,
                seeds=seeds,
                tta_mean=tta_mean,
                reached=reached,
                speedup_vs_baseline=speedup,
                final_acc_mean=acc_mean,
                final_acc_std=acc_std,
                bytes_mean=bytes_mean,
            )
        )
    return rows


def _format_row(row: AggregateRow) -> list[str]:
    """The row's cells as text, shared by the rich and markdown tables so they always agree."""
    tta = _MISSING if row.tta_mean is None else f"{row.tta_mean:.1f}"
    speedup = _MISSING if row.speedup_vs_baseline is None else f"{row.speedup_vs_baseline:.2f}x"
    if math.isfinite(row.final_acc_mean):
        acc = f"{100 * row.final_acc_mean:.1f} ± {100 * row.final_acc_std:.1f}"
    else:
        acc = _MISSING
    return [
        row.scenario,
        row.strategy,
        tta,
        f"{row.reached}/{row.seeds}",
        speedup,
        acc,
        f"{row.bytes_mean / 1e6:.2f}",
    ]


def rich_grid(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    left: Container[int] = range(2),
    section_every: int = 0,
) -> Table:
    """A rich table of text cells: the columns whose index is in `left` (text) left-aligned,
    the others (numbers) right-aligned; a rule after every `section_every` rows (0: none)."""
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i in left else "right")
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=bool(section_every) and (i + 1) % section_every == 0)
    return table


def markdown_grid(
    columns: Sequence[str], rows: Iterable[Sequence[str]], *, left: Container[int] = range(2)
) -> str:
    """A table of text cells as GitHub markdown, aligned as `rich_grid` (no trailing newline)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(":---" if i in left else "---:" for i in range(len(columns))) + "|",
    ]
    # A bare pipe would split the cell in GitHub markdown.
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_table(rows: Sequence[AggregateRow], title: str) -> Table:
    """The benchmark table for printing with rich."""
    return rich_grid(title, COLUMNS, map(_format_row, rows))


def markdown_table(rows: Sequence[AggregateRow]) -> str:
    """The benchmark table as a GitHub markdown table (no trailing newline)."""
    return markdown_grid(COLUMNS, map(_format_row, rows))


def write_report(
    path: Path,
    rows: Sequence[AggregateRow],
    *,
    title: str,
    plots: Sequence[str] = (),
    notes: str = "",
) -> None:
    """Write report.md: title, table, notes, then each plot as an image link (relative names)."""
    parts = [f"# {title}", markdown_table(rows)]
    if notes.strip():
        parts.append(notes.strip())
    for name in plots:
        parts.append(f"![{Path(name).stem}]({name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
