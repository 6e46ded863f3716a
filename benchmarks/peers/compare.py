"""Hivemind beside dlion on the same kernel-shaped wires (issue 16, part 6).

    sudo .venv/bin/python benchmarks/peers/compare.py microcloud-hetero --out runs/peers

Sets up `dlion netns` for the scenario (a namespace per worker behind a router per site,
site pipes shaped by tc htb at `bandwidth / time_scale`), runs each dlion strategy on the
dist engine with `engine.shaping=kernel` inside it, then Hivemind (hivemind_peer.py, one
peer per namespace, the same model, shard, global batch, lr, target and emulated machine
speeds) at each matchmaking time given, and writes `report.md`, `summary.json` and
`accuracy_vs_time.png` under `--out`. Time to target is in scenario seconds (wall /
time_scale) from each run's common start, start-up excluded for both. A run that fails
still reports what rank 0 logged.

Needs root, `ip netns`, and the optional extra: `pip install -e '.[peers]'`. Never part of
`make test`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dlion.core.config import load_config
from dlion.engines import netns
from dlion.engines.launcher import run_dist

PEER = Path(__file__).with_name("hivemind_peer.py")
app = typer.Typer(add_completion=False)


def tta(points: list[tuple[float, float]], target: float) -> float | None:
    """First time at which accuracy reaches `target` (points are (t, acc), sorted)."""
    return next((t for t, acc in points if acc >= target), None)


def run_hivemind(
    scenario: str,
    sets: list[str],
    plan: netns.Plan,
    out: Path,
    matchmaking_s: float,
    max_time: float,
    scale: float,
    fp16: bool,
    extra: list[str],
) -> list[tuple[float, float]]:
    """One Hivemind run, a peer per namespace; rank 0's (t, accuracy) after every epoch."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "done", out / "dht-maddr", *out.glob("ready-*")]:
        stale.unlink(missing_ok=True)
    launched = time.time()
    procs = []
    for w in plan.workers:
        argv = [
            "ip", "netns", "exec", w.netns, sys.executable, str(PEER), scenario,
            *(a for s in sets for a in ("--set", s)),
            "--rank", str(w.rank), "--host", w.address, "--dir", str(out),
            "--world", str(len(plan.workers)), "--matchmaking-time", f"{matchmaking_s:g}",
        ]  # fmt: skip
        if fp16:
            argv.append("--fp16")
        argv += extra
        log = (out / f"peer-{w.rank}.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = launched + 300.0 + max_time * scale + 60.0  # start-up, training, shutdown
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    log0 = out / "peer-0.jsonl"
    rows = [json.loads(line) for line in log0.read_text().splitlines()] if log0.exists() else []
    if not rows:
        print(f"hivemind rank 0 logged nothing: see {out}/peer-0.log", flush=True)
    return [(r["t"], r["acc"]) for r in rows if "acc" in r] or [(0.0, float("nan"))]


@app.command()
def main(
    scenario: str,
    out: Annotated[Path, typer.Option()] = Path("runs/peers"),
    set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    time_scale: float = 4.0,
    strategies: str = "dlion,allreduce",
    matchmaking: Annotated[str, typer.Option(help="Hivemind matchmaking times (wall s)")] = (
        "0.5,1,2"
    ),
    fp16: bool = False,
    state_every: Annotated[int, typer.Option(help="hivemind average_state_every")] = 1,
    chunk_timeout: Annotated[float | None, typer.Option(help="next_chunk_timeout (s)")] = None,
    prefix: str = "hmp",
    subnet: str = "10.79.0.0/24",
) -> None:
    sets = [*(set_ or []), "engine.name=dist", f"engine.time_scale={time_scale:g}"]
    base = load_config(scenario, sets)
    target, max_time = base.train.target_acc, base.train.max_time
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    plan = netns.up(netns.plan_for(base, prefix, subnet))
    try:
        for name in filter(None, strategies.split(",")):
            cfg = load_config(scenario, [*sets, f"strategy.name={name}", "engine.shaping=kernel"])
            res = run_dist(cfg, out_dir=out / name, netns=plan.prefix, progress=False)
            s = res.summary
            curves[name] = [(p.t / time_scale, p.mean_acc) for p in res.points]
            rows.append({"method": name, "tta_s": s["tta_scenario_s"], "final_acc": s["final_acc"]})
            print(f"{name}: TTA {s['tta_scenario_s']} final {s['final_acc']:.3f}", flush=True)
        extra = ["--average-state-every", str(state_every)]
        if chunk_timeout is not None:
            extra += ["--chunk-timeout", f"{chunk_timeout:g}"]
        knobs = f"state every {state_every}{', fp16' if fp16 else ''}"
        for mm in (float(v) for v in matchmaking.split(",")):
            label = f"hivemind (matchmaking {mm:g} s, {knobs})"
            points = run_hivemind(
                scenario, sets, plan, out / f"hivemind-mm{mm:g}", mm, max_time, time_scale,
                fp16, extra,
            )  # fmt: skip
            curves[label] = points
            rows.append({"method": label, "tta_s": tta(points, target), "final_acc": points[-1][1]})
            print(f"{label}: TTA {rows[-1]['tta_s']} final {points[-1][1]:.3f}", flush=True)
    finally:
        netns.down(plan.prefix)

    fastest = min((r["tta_s"] for r in rows if r["tta_s"] is not None), default=None)
    lines = [
        f"{scenario}, time_scale {time_scale:g}, kernel-shaped links (`dlion netns`), "
        f"target {target}, max {max_time:g} scenario s, sets {sets}",
        "",
        "| method | TTA (scenario s) | vs fastest | final acc |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        t = r["tta_s"]
        ratio = "-" if t is None or fastest is None else f"{t / fastest:.2f}x"
        lines.append(
            f"| {r['method']} | {'not reached' if t is None else f'{t:.2f}'} | {ratio} | "
            f"{r['final_acc']:.3f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(curves, target, out / "accuracy_vs_time.png", scenario)
    print("\n".join(lines))


def plot(
    curves: dict[str, list[tuple[float, float]]], target: float, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in curves.items():
        ax.plot([t for t, _ in pts], [a for _, a in pts], label=label)
    ax.axhline(target, color="grey", linestyle=":", label="target")
    ax.set_xlabel("scenario time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}: dlion dist vs Hivemind, kernel-shaped links")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app()
