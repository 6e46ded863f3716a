"""Transfer benchmark (RecycleML, EdgeSys '18): seeds x directions of a modality pair, one
report: bench.json (every run's summary and the aggregate), bench.md and a PNG."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import torch

from dlion.report import write_json_atomic
from dlion.transfer.config import TransferConfig, with_overrides
from dlion.transfer.pipeline import load_data, run_transfer
from dlion.transfer.progress import Stages
from dlion.transfer.report import (
    DirectionResult,
    aggregate,
    markdown_tables,
    plot_accuracy_vs_labels,
)

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
BENCH_PNG = "accuracy_vs_labels.png"


def directions(cfg: TransferConfig, both: bool) -> list[tuple[str, str]]:
    """The configured (source, target), and the reverse when `both`."""
    pair = (cfg.data.source, cfg.data.target)
    return [pair, (pair[1], pair[0])] if both else [pair]


def run_bench(
    cfg: TransferConfig,
    out_dir: Path,
    *,
    seeds: int = 3,
    both_directions: bool = True,
    progress: bool = True,
    command: str = "",
) -> tuple[list[DirectionResult], dict[str, Any]]:
    """Run seeds cfg.seed .. cfg.seed + seeds - 1 for each direction; write the report."""
    pairs = directions(cfg, both_directions)
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    with (
        Stages(enabled=progress, transient=True) as stages,
        stages.stage("benchmark runs", seeds * len(pairs)) as overall,
    ):
        for i in range(seeds):
            seeded = with_overrides(cfg, [f"seed={cfg.seed + i}"])
            # Both directions of a seed share one data set (generated or read once).
            data = load_data(seeded)
            for source, target in pairs:
                run_cfg = with_overrides(seeded, [f"data.source={source}", f"data.target={target}"])
                overall.note(f"{source} → {target}, seed {run_cfg.seed}")
                summaries.append(run_transfer(run_cfg, stages=stages, data=data))
                overall.tick()
    wall = time.perf_counter() - started
    results = aggregate(summaries)
    report = {
        "config": cfg.model_dump(mode="json"),
        "seeds": [cfg.seed + i for i in range(seeds)],
        "directions": [list(p) for p in pairs],
        "wall_time_s": wall,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}",
        "date": date.today().isoformat(),
        "command": command,
        "runs": summaries,
        "aggregate": [asdict(r) for r in results],
    }
    write_outputs(out_dir, results, report)
    return results, report


def write_outputs(out_dir: Path, results: list[DirectionResult], report: dict[str, Any]) -> None:
    """bench.json, the PNG and bench.md (bench.json alone is enough to redraw the others)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / BENCH_JSON, report)
    plot_accuracy_vs_labels(
        results, out_dir / BENCH_PNG, title="RecycleML cross-modality transfer: accuracy vs labels"
    )
    write_markdown(out_dir / BENCH_MD, results, report)


def write_markdown(path: Path, results: list[DirectionResult], report: dict[str, Any]) -> None:
    lines = [
        "# Cross-modality transfer (RecycleML)",
        "",
        f"Command: `{report['command'] or 'dlion transfer bench'}`; seeds {report['seeds']}; "
        f"{report['wall_time_s']:.0f} s wall on {report['machine']}, {report['date']}.",
        "",
        markdown_tables(results),
        "",
        f"![accuracy vs labels]({BENCH_PNG})",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
