"""Transfer results over seeds: aggregation, rich and markdown tables, accuracy-vs-labels PNG."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from dlion.report.plots import png_figure
from dlion.report.tables import markdown_grid, rich_grid
from dlion.transfer.pipeline import labels_to_match
from dlion.transfer.select import FEW_LABEL

_MISSING = "—"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (std 0.0 for one seed)."""

    mean: float
    std: float

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Stat(statistics.fmean(values), std)

    def pct(self) -> str:
        if self.std == 0.0:
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"


@dataclass(frozen=True)
class DirectionResult:
    """All seeds of one ordered modality pair."""

    source: str
    target: str
    seeds: int
    chance: float  # majority-class share of the test set
    source_acc: Stat  # source model on the source modality
    zero_label: Stat  # target encoder + source head, no target labels
    ks: list[int]
    few_label: list[Stat]  # frozen transferred encoder + the kept head, per k
    candidate: list[Stat]  # the fine-tuned head on all k labels, kept or not, per k
    kept_few: list[int | None]  # per k: seeds that kept the few-label head (None: no rule)
    scratch: list[Stat]  # same architecture from scratch on the same k labels, per k
    wins: list[int]  # per k: seeds in which transfer beat scratch (paired: same labels)
    match_k: int
    # Labels scratch needs to reach transfer's accuracy at match_k, from the mean curves;
    # None when scratch never gets there within the largest k.
    labels_to_match: float | None
    labels_to_match_per_seed: list[float | None]
    catches_up_at: int | None  # smallest k where mean scratch >= mean few-label

    @property
    def name(self) -> str:
        return f"{self.source} → {self.target}"


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> list[DirectionResult]:
    """Group run summaries by (source, target), in first-seen order, and summarize each."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["source"], s["target"]), []).append(s)
    out: list[DirectionResult] = []
    for (source, target), runs in groups.items():
        ks = list(runs[0]["ks"])
        few = [Stat.of([r["few_label_acc"][i] for r in runs]) for i in range(len(ks))]
        # Summaries written before the keep-the-better rule have neither field.
        candidate = [
            Stat.of([r.get("few_label_candidate_acc", r["few_label_acc"])[i] for r in runs])
            for i in range(len(ks))
        ]
        kept: list[int | None] = [None] * len(ks)
        if all(r.get("few_label_kept") for r in runs):
            kept = [
                sum(r["few_label_kept"][i]["kept"] == FEW_LABEL for r in runs)
                for i in range(len(ks))
            ]
        scratch = [Stat.of([r["scratch_acc"][i] for r in runs]) for i in range(len(ks))]
        wins = [
            sum(r["few_label_acc"][i] > r["scratch_acc"][i] for r in runs) for i in range(len(ks))
        ]
        match_k = int(runs[0]["match_k"])
        target_acc = few[ks.index(match_k)].mean
        crossing = labels_to_match(ks, [s.mean for s in scratch], target_acc)
        catches_up = next(
            (k for k, f, s in zip(ks, few, scratch, strict=True) if s.mean >= f.mean), None
        )
        out.append(
            DirectionResult(
                source=source,
                target=target,
                seeds=len(runs),
                chance=statistics.fmean(r["chance_acc"] for r in runs),
                source_acc=Stat.of([r["source_acc"] for r in runs]),
                zero_label=Stat.of([r["zero_label_acc"] for r in runs]),
                ks=ks,
                few_label=few,
                candidate=candidate,
                kept_few=kept,
                scratch=scratch,
                wins=wins,
                match_k=match_k,
                labels_to_match=crossing,
                labels_to_match_per_seed=[r["scratch_labels_to_match"] for r in runs],
                catches_up_at=catches_up,
            )
        )
    return out


def _labels(value: float | None, largest: int) -> str:
    return f"> {largest}" if value is None else f"{value:.0f}"


ACC_COLUMNS = (
    "direction",
    "labels k",
    "transfer (%)",
    "fine-tuned head (%)",
    "kept fine-tuned in",
    "scratch (%)",
    "transfer − scratch",
    "transfer better in",
)
SUMMARY_COLUMNS = (
    "direction",
    "seeds",
    "source model (%)",
    "zero-label (%)",
    "chance (%)",
    "scratch labels to match transfer",
    "scratch catches up at k",
)


def accuracy_rows(results: Sequence[DirectionResult]) -> list[list[str]]:
    """Zero-label first (k = 0), then one row per k."""
    rows: list[list[str]] = []
    for r in results:
        rows.append([r.name, "0 (zero-label)", r.zero_label.pct(), *[_MISSING] * 5])
        for i, k in enumerate(r.ks):
            few, scratch = r.few_label[i], r.scratch[i]
            gap = f"{100 * (few.mean - scratch.mean):+.1f} pts"
            kept = r.kept_few[i]
            rows.append(
                [
                    r.name,
                    str(k),
                    few.pct(),
                    r.candidate[i].pct(),
                    _MISSING if kept is None else f"{kept}/{r.seeds} seeds",
                    scratch.pct(),
                    gap,
                    f"{r.wins[i]}/{r.seeds} seeds",
                ]
            )
    return rows


def summary_rows(results: Sequence[DirectionResult]) -> list[list[str]]:
    rows: list[list[str]] = []
    for r in results:
        per_seed = ", ".join(_labels(v, r.ks[-1]) for v in r.labels_to_match_per_seed)
        match = f"{_labels(r.labels_to_match, r.ks[-1])} (k={r.match_k}; per seed {per_seed})"
        catch = f"not by {r.ks[-1]}" if r.catches_up_at is None else str(r.catches_up_at)
        rows.append(
            [
                r.name,
                str(r.seeds),
                r.source_acc.pct(),
                r.zero_label.pct(),
                f"{100 * r.chance:.1f}",
                match,
                catch,
            ]
        )
    return rows


def rich_tables(results: Sequence[DirectionResult]) -> tuple[Table, Table]:
    """The accuracy table (per k) and the summary table, for printing with rich."""
    acc_title = "Target-modality test accuracy: transfer vs scratch on the same k labels"
    return (
        rich_grid(acc_title, ACC_COLUMNS, accuracy_rows(results)),
        rich_grid("Transfer summary", SUMMARY_COLUMNS, summary_rows(results), left=range(1)),
    )


def markdown_tables(results: Sequence[DirectionResult]) -> str:
    """Both tables as GitHub markdown, separated by a blank line."""
    return (
        markdown_grid(ACC_COLUMNS, accuracy_rows(results))
        + "\n\n"
        + markdown_grid(SUMMARY_COLUMNS, summary_rows(results), left=range(1))
    )


def plot_accuracy_vs_labels(results: Sequence[DirectionResult], path: Path, title: str) -> Path:
    """One panel per direction: transfer and scratch accuracy against k (log scale), with
    bands of one std over seeds, and the zero-label and chance levels as dashed lines."""
    with png_figure(
        path,
        suptitle=title,
        nrows=1,
        ncols=len(results),
        figsize=(5.5 * len(results), 4.2),
        squeeze=False,
        sharey=True,
    ) as axes:
        for ax, r in zip(axes[0], results, strict=True):
            for label, stats, color in (
                ("few-label transfer (kept model)", r.few_label, "tab:blue"),
                ("scratch", r.scratch, "tab:orange"),
            ):
                means = [s.mean for s in stats]
                lo = [s.mean - s.std for s in stats]
                hi = [s.mean + s.std for s in stats]
                ax.plot(r.ks, means, marker="o", color=color, label=label)
                ax.fill_between(r.ks, lo, hi, color=color, alpha=0.15, linewidth=0)
            ax.axhline(
                r.zero_label.mean, color="tab:green", linestyle="--", label="zero-label transfer"
            )
            ax.axhline(r.chance, color="gray", linestyle=":", label="chance")
            ax.set_xscale("log")
            ax.set_ylim(0.0, 1.0)
            ax.set_xlabel("labeled target samples k")
            ax.set_title(f"{r.name} ({r.seeds} seed{'s' if r.seeds > 1 else ''})")
            ax.grid(True, alpha=0.3, which="both")
        axes[0][0].set_ylabel("target test accuracy")
        axes[0][-1].legend(loc="lower right", fontsize=8)
    return path
