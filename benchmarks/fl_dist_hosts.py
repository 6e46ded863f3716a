"""FL on real processes: one host against separate hosts (network namespaces), and the
cost of a stop and `--resume`. Root with `ip netns` for the separate-hosts part.

    sudo .venv/bin/python benchmarks/fl_dist_hosts.py --out runs/fl-dist-hosts

Job: 3 clients, digits, FedBuff (K=2), evaluation every 0.25 s, time scale 1.
1. one host: `dlion train CFG --engine dist` (the launcher starts server and clients);
   separate hosts: `dlion fl serve` in one namespace, `dlion fl client` in three others,
   over a bridge. Both run to the target (85 %): wall of the whole command, start-up
   (command start to the run's first evaluation), time to target, versions.
2. resume: the same job to train.max_time=10 with the target out of reach, uninterrupted
   against SIGTERM at ~5 s then `--resume` to 10: the versions reached and the wall of
   the commands; checkpoint size and write time from the server's log.
Prints one JSON object per measurement and writes them to OUT/results.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dlion.cluster.topology import Cluster
from dlion.core.config import config_from_dict
from dlion.engines import netns
from dlion.fl.config import fl_config_from_dict

DLION = [sys.executable, "-m", "dlion"]


def job(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "kind": "fl",
        "name": "fl-hosts",
        "clients": {
            "count": 3,
            "concurrency": 3,
            "compute_gflops": {"min": 0.05, "max": 0.2},
            "bandwidth_mbps": {"min": 5, "max": 20},
            "availability": {"mean_online_s": 10, "mean_offline_s": 0},
        },
        "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": [32]},
        "algorithm": {"name": "fedbuff", "options": {"k": 2}},
        "local": {"epochs": 0.5},
        "train": {"max_time": 60, "target_acc": 0.85, "stop_at_target": True},
        "evaluation": {"every_s": 0.25},
        "checkpoint": {"every_s": 1},
    }
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    return fl_config_from_dict(raw).model_dump(mode="json")


def free_subnet() -> str:
    used = netns._root_networks()
    for i in range(2, 255):
        net = ipaddress.ip_network(f"10.78.{i}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free /24 in 10.78.0.0/16")


def events(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def measure(run: Path, began: float, ended: float) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    start = next(e for e in events(run) if e["event"] in ("start", "resume"))
    first_eval = next(e for e in events(run) if e["event"] == "eval")
    ckpts = [e for e in events(run) if e["event"] == "checkpoint"]
    return {
        "command_wall_s": round(ended - began, 2),
        # Process start-up, admission and links, and the ending: the command's wall
        # outside the run's own clock.
        "outside_run_s": round(ended - began - s["wall_s"], 2),
        "first_eval_t": first_eval["t"],
        "tta_s": s["tta_s"],
        "time_s": s["time_s"],
        "versions": s["iterations"],
        "final_acc": round(s["final_acc"], 4),
        "stop_reason": s["stop_reason"],
        "linked_at_start": start.get("linked"),
        "checkpoint_s": [round(e.get("seconds", 0.0), 4) for e in ckpts][-3:],
        "checkpoint_bytes": ckpts[-1].get("bytes") if ckpts else None,
    }


def one_host(cfg: Path, run: Path, extra: list[str] | None = None) -> tuple[float, float]:
    began = time.time()
    subprocess.run(
        [*DLION, "train", str(cfg), "--engine", "dist", "--out", str(run), "--quiet", "--force"]
        + (extra or []),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return began, time.time()


def separate_hosts(cfg: Path, run: Path, plan: netns.Plan) -> tuple[float, float]:
    address = f"{plan.workers[0].address}:29533"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": netns.WORKER_IFNAME, "OMP_NUM_THREADS": "1"}

    def on(host: int, argv: list[str]) -> subprocess.Popen[bytes]:
        cmd = ["ip", "netns", "exec", plan.workers[host].netns, *DLION, *argv]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    began = time.time()
    server = on(0, ["fl", "serve", str(cfg), "--listen", address, "--out", str(run), "--force"])
    clients = [
        on(k, ["fl", "client", str(cfg), "--server", address, "--client-id", str(k)])
        for k in (1, 2, 3)
    ]
    assert server.wait(timeout=600) == 0
    ended = time.time()
    for c in clients:
        c.wait(timeout=60)
    return began, ended


def interrupted_then_resumed(cfg: Path, run: Path, at: float) -> tuple[float, float, float]:
    """SIGTERM at run time `at`, then --resume: (began, first command ended, resume ended)."""
    began = time.time()
    cmd = [*DLION, "train", str(cfg), "--engine", "dist", "--out", str(run), "--quiet", "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if (run / "metrics.jsonl").exists() and any(
            e["event"] == "eval" and e["t"] >= at for e in events(run)
        ):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    first = time.time()
    resume = [*DLION, "train", str(cfg), "--engine", "dist", "--resume", str(run), "--quiet"]
    subprocess.run(resume, check=True, stdout=subprocess.DEVNULL)
    return began, first, time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/fl-dist-hosts"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / "target.yaml"
    target.write_text(json.dumps(job()))
    budget = out / "budget.yaml"
    budget.write_text(
        json.dumps(job(train={"max_time": 10, "target_acc": 0.99, "stop_at_target": False}))
    )
    results: list[dict[str, Any]] = []

    def record(name: str, values: dict[str, Any]) -> None:
        row = {"case": name, "load_avg_1m": round(os.getloadavg()[0], 2), **values}
        print(json.dumps(row), flush=True)
        results.append(row)

    for i in range(args.repeat):
        run = out / f"one-host-{i}"
        record("one host, to target", measure(run, *one_host(target, run)))
    if os.geteuid() == 0 and shutil.which("ip"):
        base = config_from_dict(
            {
                "cluster": {
                    "sites": [{"name": "a", "intra_bandwidth_mbps": 1000}],
                    "workers": [{"site": "a", "capacity_gflops": 1.0, "count": 4}],
                }
            }
        )
        prefix = f"fh{os.getpid() % 100000}"
        plan = netns.make_plan(
            Cluster.from_config(base.cluster), time_scale=1.0, prefix=prefix, subnet=free_subnet()
        )
        netns.up(plan)
        try:
            for i in range(args.repeat):
                run = out / f"hosts-{i}"
                record(
                    "separate hosts (netns), to target",
                    measure(run, *separate_hosts(target, run, plan)),
                )
        finally:
            netns.down(prefix)
    run = out / "budget-whole"
    record("one host, 10 s, uninterrupted", measure(run, *one_host(budget, run)))
    run = out / "budget-resumed"
    began, first, ended = interrupted_then_resumed(budget, run, 5.0)
    row = measure(run, first, ended)
    row["first_command_wall_s"] = round(first - began, 2)
    row["total_wall_s"] = round(ended - began, 2)
    record("one host, SIGTERM at 5 s, --resume to 10 s", row)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
