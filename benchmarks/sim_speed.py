"""The sim engine's own cost (RESULTS.md section 16, issue 18).

    python benchmarks/sim_speed.py ratio OUT_DIR [--src TREE] [--repeats N] [--strategies a,b]
    python benchmarks/sim_speed.py scale OUT_DIR [--workers 6,32,64,128] [--iterations N]

`ratio`: the default `microcloud-hetero` run of each strategy; prints the loop's wall time
over the gradients' wall time (forward + backward + batch, the summary's `compute_wall_s`),
evaluation excluded. `--src TREE` also runs another source tree (TREE/src first on
PYTHONPATH, e.g. a worktree of main) with this interpreter, alternating run by run, so both
see the same load.

`scale`: microcloud-hetero's three sites and links with N workers split as evenly as the
sites allow (capacities 0.4 / 0.2 / 0.1 GFLOP/s by site, as in the presets; the site pipes
are shared by every flow between two sites), the default `dlion` strategy for a fixed number
of iterations. Reports the command's wall time, the loop's, and the process's peak RSS;
writes OUT_DIR/scale.json and OUT_DIR/scale.png.

Every run is its own `dlion train` process (so peak RSS is the run's own), with
OMP_NUM_THREADS=1. Load average is printed beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

SITES = [("site-a", 0.4), ("site-b", 0.2), ("site-c", 0.1)]


def scaled_microcloud(workers: int) -> dict[str, Any]:
    """microcloud-hetero with `workers` workers over its three sites, as evenly as they go
    (the first sites take the remainder), like the shipped -12/-24/-32 presets."""
    if workers < len(SITES):
        raise ValueError(f"workers: at least {len(SITES)} (one per site), got {workers}")
    base, extra = divmod(workers, len(SITES))
    rows = [
        {"site": site, "capacity_gflops": cap, "nic_mbps": 1000, "count": base + (i < extra)}
        for i, (site, cap) in enumerate(SITES)
    ]
    return {
        "extends": "microcloud-hetero",
        "name": f"microcloud-hetero-x{workers}",
        "description": f"microcloud-hetero scaled out to {workers} workers",
        "cluster": {"workers": rows},
    }


def run_train(
    config: str, strategy: str, out: Path, sets: list[str], src: Path | None = None
) -> dict[str, Any]:
    """One `dlion train` in its own process; its summary plus the command's wall time."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src.resolve() / "src")
    cmd = [sys.executable, "-m", "dlion", "train", config, "--strategy", strategy, "--quiet"]
    cmd += ["--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["command_wall_s"] = time.perf_counter() - start
    summary["load"] = os.getloadavg()[0]
    return summary


def loop_ratio(summary: dict[str, Any]) -> float:
    return (summary["wall_s"] - summary["eval_wall_s"]) / summary["compute_wall_s"]


def ratio(args: argparse.Namespace) -> None:
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.src is not None:
        trees.insert(0, ("src", args.src))
    rows = []
    for strategy in args.strategies.split(","):
        for rep in range(args.repeats):
            for name, tree in trees:
                out = args.out / f"{strategy}-{name}-{rep}"
                s = run_train("microcloud-hetero", strategy, out, [], tree)
                row = {
                    "strategy": strategy,
                    "tree": name,
                    "loop_s": s["wall_s"] - s["eval_wall_s"],
                    "gradient_s": s["compute_wall_s"],
                    "ratio": loop_ratio(s),
                    "load": s["load"],
                }
                rows.append(row)
                print(
                    f"{strategy:14s} {name:5s} loop {row['loop_s']:.3f} s  gradient "
                    f"{row['gradient_s']:.3f} s  ratio {row['ratio']:.2f}  load {row['load']:.1f}",
                    flush=True,
                )
    (args.out / "ratio.json").write_text(json.dumps(rows, indent=1))


def scale(args: argparse.Namespace) -> None:
    rows = []
    sets = [f"train.max_iterations={args.iterations}", "train.stop_at_target=false"]
    for n in [int(x) for x in args.workers.split(",")]:
        config = args.out / f"microcloud-hetero-x{n}.yaml"
        config.write_text(yaml.safe_dump(scaled_microcloud(n), sort_keys=False))
        s = run_train(str(config), args.strategy, args.out / f"x{n}", sets)
        row = {
            "workers": n,
            "command_wall_s": s["command_wall_s"],
            "loop_s": s["wall_s"] - s["eval_wall_s"],
            "gradient_s": s["compute_wall_s"],
            "eval_s": s["eval_wall_s"],
            "peak_rss_mb": s["peak_rss_mb"],
            "virtual_s": s["time_s"],
            "load": s["load"],
        }
        rows.append(row)
        print(
            f"{n:4d} workers: command {row['command_wall_s']:.1f} s, loop {row['loop_s']:.1f} s "
            f"(gradients {row['gradient_s']:.1f} s), peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"load {row['load']:.1f}",
            flush=True,
        )
        (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
    plot_scale(rows, args.out / "scale.png", args.iterations)


def plot_scale(rows: list[dict[str, Any]], path: Path, iterations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["workers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(n, [r["command_wall_s"] for r in rows], "o-", label="command wall (s)")
    ax.plot(n, [r["loop_s"] for r in rows], "s-", label="event loop (s)")
    ax.plot(n, [r["gradient_s"] for r in rows], "^-", label="gradients (s)")
    ax.set_xlabel("workers")
    ax.set_ylabel("wall seconds")
    ax.set_xticks(n)
    rss = ax.twinx()
    rss.plot(n, [r["peak_rss_mb"] for r in rows], "d--", color="gray", label="peak RSS (MB)")
    rss.set_ylabel("peak RSS (MB)")
    lines = ax.get_legend_handles_labels()[0] + rss.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + rss.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=8)
    ax.set_title(f"sim cost: dlion, {iterations} iterations, microcloud-hetero scaled out")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ratio")
    r.add_argument("out", type=Path)
    r.add_argument("--src", type=Path, default=None)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--strategies", default="dlion,dlion-hpdc21")
    s = sub.add_parser("scale")
    s.add_argument("out", type=Path)
    s.add_argument("--workers", default="6,32,64,128")
    s.add_argument("--iterations", type=int, default=100)
    s.add_argument("--strategy", default="dlion")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ratio(args) if args.what == "ratio" else scale(args)


if __name__ == "__main__":
    main()
