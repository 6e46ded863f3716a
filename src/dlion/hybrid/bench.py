"""Benchmark of selective query (Kag et al., ICLR '23): datasets x seeds, router vs entropy and
max-softmax thresholding vs the oracle at each coverage, and the latency saved at no excess
loss; writes summary.json, report.md and one accuracy-vs-latency PNG per dataset."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dlion.core.errors import BadInput
from dlion.hybrid.calibrate import check_coverage
from dlion.hybrid.config import config_hash, load_hybrid_config
from dlion.hybrid.evaluate import (
    CLOUD_ONLY,
    EDGE_ONLY,
    ORACLE,
    Evaluation,
    evaluate,
    gap_closed,
    random_accuracy,
)
from dlion.hybrid.inference import METHODS
from dlion.hybrid.report import LABELS, plot_accuracy_vs_latency
from dlion.hybrid.store import RUN_FILE, HybridRun, load_run, save_run
from dlion.hybrid.timing import (
    EndToEnd,
    MeasuredComponents,
    measure_components,
    measure_end_to_end,
)
from dlion.hybrid.train import load_splits, torch_threads, train_hybrid
from dlion.report import write_json_atomic
from dlion.report.tables import markdown_grid, rich_grid

COVERAGE_COLUMNS = (
    "dataset",
    "coverage",
    "router acc (%)",
    "kNN acc (%)",
    "entropy acc (%)",
    "oracle acc (%)",
    "router − entropy (pts)",
    "same, exact coverage (pts)",
    "gap closed: router / kNN / entropy",
    "router coverage",
    "router latency (ms)",
)
GAP_COLUMNS = ("dataset", "method", "mean gap closed (0.5-0.9)", "per coverage")
MEASURED_COLUMNS = (
    "dataset",
    "part",
    "measured, this CPU (ms)",
    "modelled (ms)",
)
END_TO_END_COLUMNS = (
    "dataset",
    "method",
    "coverage",
    "accuracy (%)",
    "measured hybrid (ms)",
    "measured cloud-only (ms)",
    "reduction, compute only",
    "reduction with modelled uplink",
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
    measured: MeasuredComponents
    end_to_end: list[EndToEnd]  # per method of MEASURED_METHODS, at its no-loss coverage


MEASURED_METHODS = ("router", "knn", "entropy")


def measure(
    run: HybridRun, evaluation: Evaluation, x: torch.Tensor, y: torch.Tensor
) -> list[EndToEnd]:
    """Each method's routed pipeline timed on the test inputs at its no-excess-loss coverage
    (the threshold calibrated on validation for that coverage)."""
    out = []
    for method in MEASURED_METHODS:
        point = next(p for p in evaluation.no_loss if p.method == method)
        coverage = max(point.coverage, 1e-6)  # coverage 0: send everything
        threshold = run.calibration.threshold(method, min(coverage, 1.0))
        out.append(measure_end_to_end(run.models, x, y, method, threshold))
    return out


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
            with torch_threads(1):
                measured = measure_components(run.models, x_test)
                end_to_end = measure(run, evaluation, x_test, y_test)
            results.append(BenchRun(dataset, seed, run, evaluation, reused, measured, end_to_end))
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


def _gap(group: Sequence[BenchRun], method: str, target: float) -> float | None:
    """Gap closed at exactly `target` coverage (test sweep), from the means over seeds."""
    acc = statistics.fmean(_sweep_acc(group, method, target))
    oracle = statistics.fmean(_sweep_acc(group, ORACLE, target))
    rand = statistics.fmean(
        random_accuracy(
            r.evaluation.point(EDGE_ONLY, None).accuracy,
            r.evaluation.point(CLOUD_ONLY, None).accuracy,
            target,
        )
        for r in group
    )
    return gap_closed(acc, rand, oracle)


def _fmt_gap(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def gap_rows(results: Sequence[BenchRun], targets: Sequence[float]) -> list[list[str]]:
    """Per method, the gap closed at each target coverage and its mean (APGR-like)."""
    rows = []
    for dataset, group in _by_dataset(results).items():
        for method in ("router", "knn", "entropy", "max_softmax"):
            gaps = [_gap(group, method, t) for t in targets]
            known = [g for g in gaps if g is not None]
            mean = f"{statistics.fmean(known):.2f}" if known else "—"
            rows.append([dataset, LABELS[method], mean, " / ".join(_fmt_gap(g) for g in gaps)])
    return rows


def coverage_rows(results: Sequence[BenchRun], targets: Sequence[float]) -> list[list[str]]:
    rows = []
    for dataset, group in _by_dataset(results).items():
        for t in targets:
            router, entropy, oracle = (_acc(group, m, t) for m in ("router", "entropy", ORACLE))
            gap = " / ".join(_fmt_gap(_gap(group, m, t)) for m in ("router", "knn", "entropy"))
            diff = [a - b for a, b in zip(router, entropy, strict=True)]
            sweep = [
                a - b
                for a, b in zip(
                    _sweep_acc(group, "router", t), _sweep_acc(group, "entropy", t), strict=True
                )
            ]
            cov = [r.evaluation.point("router", t).coverage for r in group]
            lat = [r.evaluation.point("router", t).latency_s for r in group]
            rows.append(
                [
                    dataset,
                    f"{t:.2f}",
                    _mean_std(router),
                    _mean_std(_acc(group, "knn", t)),
                    _mean_std(entropy),
                    _mean_std(oracle),
                    f"{100 * statistics.fmean(diff):+.2f}",
                    f"{100 * statistics.fmean(sweep):+.2f}",
                    gap,
                    _mean_std(cov, 1.0, 3),
                    _mean_std(lat, 1e3, 2),
                ]
            )
    return rows


def measured_rows(results: Sequence[BenchRun]) -> list[list[str]]:
    """Per part, the median time of one input on this CPU beside the FLOP-based model."""
    rows = []
    for dataset, group in _by_dataset(results).items():
        model = {
            "edge model": [r.run.latency.edge_model_s for r in group],
            "router": [r.run.latency.edge_s - r.run.latency.edge_model_s for r in group],
            "kNN router": [r.run.latency.knn_s for r in group],
            "entropy": [0.0 for _ in group],
            "cloud model (+ serving overhead, modelled)": [r.run.latency.cloud_s for r in group],
            "uplink (modelled only)": [r.run.latency.uplink_s for r in group],
        }
        measured = {
            "edge model": [r.measured.edge_s for r in group],
            "router": [r.measured.router_s for r in group],
            "kNN router": [r.measured.knn_s for r in group],
            "entropy": [r.measured.entropy_s for r in group],
            "cloud model (+ serving overhead, modelled)": [r.measured.cloud_s for r in group],
        }
        for part, modelled in model.items():
            got = measured.get(part)
            rows.append(
                [
                    dataset,
                    part,
                    "—" if got is None else _mean_std(got, 1e3, 3),
                    _mean_std(modelled, 1e3, 3),
                ]
            )
    return rows


def end_to_end_rows(results: Sequence[BenchRun]) -> list[list[str]]:
    """Each method's pipeline timed input by input at its no-excess-loss coverage."""
    rows = []
    for dataset, group in _by_dataset(results).items():
        for i, method in enumerate(MEASURED_METHODS):
            runs = [(r, r.end_to_end[i]) for r in group]
            compute = [1 - e.hybrid_s / e.cloud_only_s for _, e in runs]
            uplink = [
                1
                - (e.hybrid_s + (1 - e.coverage) * r.run.latency.uplink_s)
                / (e.cloud_only_s + r.run.latency.uplink_s)
                for r, e in runs
            ]
            rows.append(
                [
                    dataset,
                    LABELS[method],
                    _mean_std([e.coverage for _, e in runs], 1.0, 2),
                    _mean_std([e.accuracy for _, e in runs]),
                    _mean_std([e.hybrid_s for _, e in runs], 1e3, 3),
                    _mean_std([e.cloud_only_s for _, e in runs], 1e3, 3),
                    _mean_std(compute, 100.0, 1) + " %",
                    _mean_std(uplink, 100.0, 1) + " %",
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
    gaps, meas_rows, e2e_rows = (
        gap_rows(results, targets),
        measured_rows(results),
        end_to_end_rows(results),
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
                    "measured": r.measured.to_dict(),
                    "end_to_end": [asdict(e) for e in r.end_to_end],
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
        "closed = (accuracy − random routing) / (oracle − random routing) at exactly that "
        "coverage, from the means over seeds.",
        markdown_grid(COVERAGE_COLUMNS, cov_rows),
        "Share of the oracle gap closed (random routing = 0, oracle = 1), exact coverage:",
        markdown_grid(GAP_COLUMNS, gaps),
        "Baselines:",
        markdown_grid(BASELINE_COLUMNS, base_rows),
        "Lowest latency within 0.5 accuracy points of cloud-only (threshold sweep on test):",
        markdown_grid(NO_LOSS_COLUMNS, loss_rows),
        "Measured on this CPU, one input at a time (median of torch.utils.benchmark), beside "
        "the FLOP-based latency model:",
        markdown_grid(MEASURED_COLUMNS, meas_rows),
        "End to end, measured: each method's pipeline run input by input over the test set "
        "at its no-excess-loss coverage (fastest of 3 passes); cloud-only runs the cloud "
        "model on every input. The uplink is not measured; the last column adds the modelled "
        "uplink to every sent input:",
        markdown_grid(END_TO_END_COLUMNS, e2e_rows),
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    (out_dir / "report.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tables = [
        rich_grid(
            "hybrid bench: accuracy and latency per target coverage",
            COVERAGE_COLUMNS,
            cov_rows,
            section_every=len(targets),
        ),
        rich_grid("baselines", BASELINE_COLUMNS, base_rows),
        rich_grid("lowest latency within 0.5 points of cloud-only", NO_LOSS_COLUMNS, loss_rows),
        rich_grid("share of the oracle gap closed", GAP_COLUMNS, gaps),
        rich_grid("measured on this CPU vs modelled, per input", MEASURED_COLUMNS, meas_rows),
        rich_grid("end to end, measured, at no excess loss", END_TO_END_COLUMNS, e2e_rows),
    ]
    return tables, plots
