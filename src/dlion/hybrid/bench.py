"""Benchmark of selective query (Kag et al., ICLR '23): datasets x seeds, router vs entropy and
max-softmax thresholding vs the oracle at each coverage, and the latency saved at no excess
loss; writes summary.json, report.md and one accuracy-vs-latency PNG per dataset."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dlion.errors import BadInput
from dlion.hybrid.calibrate import check_coverage
from dlion.hybrid.config import config_hash, load_hybrid_config
from dlion.hybrid.evaluate import CLOUD_ONLY, EDGE_ONLY, ORACLE, Evaluation, evaluate
from dlion.hybrid.inference import METHODS
from dlion.hybrid.report import LABELS, markdown, plot_accuracy_vs_latency, rich_table
from dlion.hybrid.store import RUN_FILE, HybridRun, load_run, save_run
from dlion.hybrid.train import load_splits, train_hybrid
from dlion.report import write_json_atomic

COVERAGE_COLUMNS = (
    "dataset",
    "coverage",
    "router acc (%)",
    "entropy acc (%)",
    "max-softmax acc (%)",
    "oracle acc (%)",
    "router − entropy (pts)",
    "same, exact coverage (pts)",
    "gap closed",
    "router coverage",
    "router latency (ms)",
    "entropy latency (ms)",
)
BASELINE_COLUMNS = ("dataset", "method", "accuracy (%)", "latency (ms)")
NO_LOSS_COLUMNS = (
    "dataset",
    "method",
    "coverage",
    "accuracy (%)",
    "latency (ms)",
    "latency reduction vs cloud-only",
)


@dataclass(frozen=True)
class BenchRun:
    dataset: str
    seed: int
    run: HybridRun
    evaluation: Evaluation
    reused: bool


def _mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _train_or_reuse(
    cfg: Any,
    run_dir: Path,
    progress: bool,
    console: Console | None,
) -> tuple[HybridRun, bool]:
    """A finished run of the same config in run_dir is reused, so a killed bench resumes."""
    if (run_dir / RUN_FILE).is_file():
        try:
            run = load_run(run_dir)
        except BadInput:
            run = None  # a damaged scratch run of the bench: train it again
        if run is not None and config_hash(run.cfg) == config_hash(cfg):
            return run, True
    run = train_hybrid(cfg, progress=progress, console=console)
    save_run(run, run_dir)
    return run, False


def run_bench(
    out_dir: Path,
    *,
    datasets: Sequence[str],
    seeds: int,
    coverages: Sequence[float],
    overrides: Sequence[str] = (),
    progress: bool = True,
    console: Console | None = None,
) -> list[BenchRun]:
    """Train (or reuse) and evaluate every dataset x seed; runs go to out_dir/runs/."""
    if seeds < 1:
        raise BadInput(f"--seeds: must be at least 1, got {seeds}")
    targets = [check_coverage(c, "--coverage") for c in coverages]
    results = []
    for dataset in datasets:
        for seed in range(seeds):
            cfg = load_hybrid_config(dataset, [f"seed={seed}", *overrides])
            run, reused = _train_or_reuse(
                cfg, out_dir / "runs" / f"{dataset}-seed{seed}", progress, console
            )
            x_test, y_test = load_splits(cfg).test
            evaluation = evaluate(run, x_test, y_test, targets)
            results.append(BenchRun(dataset, seed, run, evaluation, reused))
    return results


# ----------------------------------------------------------------------------- aggregation


def _by_dataset(results: Sequence[BenchRun]) -> dict[str, list[BenchRun]]:
    groups: dict[str, list[BenchRun]] = {}
    for r in results:
        groups.setdefault(r.dataset, []).append(r)
    return groups


def _acc(group: Sequence[BenchRun], method: str, target: float | None) -> list[float]:
    return [r.evaluation.point(method, target).accuracy for r in group]


def _sweep_acc(group: Sequence[BenchRun], method: str, target: float) -> list[float]:
    """Accuracy at exactly `target` coverage on the threshold sweep (no calibration noise)."""
    out = []
    for r in group:
        curve = r.evaluation.curves[method]
        out.append(min(curve, key=lambda p: abs(p.coverage - target)).accuracy)
    return out


def coverage_rows(results: Sequence[BenchRun], targets: Sequence[float]) -> list[list[str]]:
    rows = []
    for dataset, group in _by_dataset(results).items():
        for t in targets:
            router, entropy, oracle = (_acc(group, m, t) for m in ("router", "entropy", ORACLE))
            r_mean, e_mean, o_mean = (statistics.fmean(v) for v in (router, entropy, oracle))
            gap = "—" if o_mean - e_mean <= 0 else f"{(r_mean - e_mean) / (o_mean - e_mean):.2f}"
            diff = [a - b for a, b in zip(router, entropy, strict=True)]
            sweep = [
                a - b
                for a, b in zip(
                    _sweep_acc(group, "router", t), _sweep_acc(group, "entropy", t), strict=True
                )
            ]
            cov = [r.evaluation.point("router", t).coverage for r in group]
            lat = [r.evaluation.point("router", t).latency_s for r in group]
            lat_e = [r.evaluation.point("entropy", t).latency_s for r in group]
            rows.append(
                [
                    dataset,
                    f"{t:.2f}",
                    _mean_std(router),
                    _mean_std(entropy),
                    _mean_std(_acc(group, "max_softmax", t)),
                    _mean_std(oracle),
                    f"{100 * statistics.fmean(diff):+.2f}",
                    f"{100 * statistics.fmean(sweep):+.2f}",
                    gap,
                    _mean_std(cov, 1.0, 3),
                    _mean_std(lat, 1e3, 2),
                    _mean_std(lat_e, 1e3, 2),
                ]
            )
    return rows


def baseline_rows(results: Sequence[BenchRun]) -> list[list[str]]:
    rows = []
    for dataset, group in _by_dataset(results).items():
        for method in (EDGE_ONLY, CLOUD_ONLY):
            lat = [r.evaluation.point(method, None).latency_s for r in group]
            rows.append(
                [
                    dataset,
                    LABELS[method],
                    _mean_std(_acc(group, method, None)),
                    _mean_std(lat, 1e3, 2),
                ]
            )
    return rows


def no_loss_rows(results: Sequence[BenchRun]) -> list[list[str]]:
    """Per method, mean over seeds of each seed's lowest-latency point within 0.5 accuracy
    points of that seed's cloud-only accuracy (read off the threshold sweep on test)."""
    rows = []
    for dataset, group in _by_dataset(results).items():
        for method in (*METHODS, ORACLE):
            pts = [next(p for p in r.evaluation.no_loss if p.method == method) for r in group]
            rows.append(
                [
                    dataset,
                    LABELS[method],
                    _mean_std([p.coverage for p in pts], 1.0, 2),
                    _mean_std([p.accuracy for p in pts]),
                    _mean_std([p.latency_s for p in pts], 1e3, 2),
                    _mean_std([p.latency_reduction for p in pts], 100.0, 1) + " %",
                ]
            )
    return rows


def _mean_curves(group: Sequence[BenchRun]) -> dict[str, list[tuple[float, float]]]:
    """Per method, the sweep averaged over seeds step by step (every seed has the same grid)."""
    curves = {}
    for method in (*METHODS, ORACLE):
        per_seed = [r.evaluation.curves[method] for r in group]
        curves[method] = [
            (
                statistics.fmean(c[i].latency_s for c in per_seed),
                statistics.fmean(c[i].accuracy for c in per_seed),
            )
            for i in range(len(per_seed[0]))
        ]
    return curves


def write_outputs(
    results: Sequence[BenchRun], targets: Sequence[float], out_dir: Path, command: str
) -> tuple[list[Table], list[Path]]:
    """summary.json, report.md and the PNGs; returns the rich tables and the plot paths."""
    cov_rows, base_rows, loss_rows = (
        coverage_rows(results, targets),
        baseline_rows(results),
        no_loss_rows(results),
    )
    plots = []
    for dataset, group in _by_dataset(results).items():
        marks = {
            m: (
                statistics.fmean(r.evaluation.point(m, None).latency_s for r in group),
                statistics.fmean(_acc(group, m, None)),
            )
            for m in (EDGE_ONLY, CLOUD_ONLY)
        }
        plots.append(
            plot_accuracy_vs_latency(
                _mean_curves(group),
                out_dir / f"accuracy_vs_latency_{dataset}.png",
                title=f"{dataset}: accuracy vs latency (mean of {len(group)} seeds)",
                marks=marks,
            )
        )
    write_json_atomic(
        out_dir / "summary.json",
        {
            "command": command,
            "coverages": list(targets),
            "runs": [
                {
                    "dataset": r.dataset,
                    "seed": r.seed,
                    "config_hash": config_hash(r.run.cfg),
                    "latency": r.run.latency.to_dict(),
                    "info": r.run.info,
                    "evaluation": r.evaluation.to_json(),
                }
                for r in results
            ],
        },
    )
    seeds = len({r.seed for r in results})
    parts = [
        "# dlion hybrid bench: selective query (ICLR '23)",
        f"Command: `{command}` ({seeds} seed(s); mean ± std over seeds). Coverage = share "
        'answered on the edge; thresholds calibrated on a validation split; "exact '
        'coverage" compares the rankings at exactly the target share on the test sweep; gap '
        "closed = (router − entropy) / (oracle − entropy).",
        markdown(COVERAGE_COLUMNS, cov_rows),
        "Baselines:",
        markdown(BASELINE_COLUMNS, base_rows),
        "Lowest latency within 0.5 accuracy points of cloud-only (threshold sweep on test):",
        markdown(NO_LOSS_COLUMNS, loss_rows),
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    (out_dir / "report.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tables = [
        rich_table(
            "hybrid bench: accuracy and latency per target coverage",
            COVERAGE_COLUMNS,
            cov_rows,
            section_every=len(targets),
        ),
        rich_table("baselines", BASELINE_COLUMNS, base_rows),
        rich_table("lowest latency within 0.5 points of cloud-only", NO_LOSS_COLUMNS, loss_rows),
    ]
    return tables, plots
