"""Real links, wrong speeds (RESULTS.md section 15b): DLion on kernel-shaped links whose
configured speeds are right, 10x too high or 10x too low, and on a link slowed mid-run.

    sudo .venv/bin/python benchmarks/real_links.py wrong-speeds --strategy dlion --out /tmp/ws
    sudo .venv/bin/python benchmarks/real_links.py slowed-link --out /tmp/sl

wrong-speeds: `dlion netns up` with the config's speeds times FACTOR, then every tc class
is changed back to the right rate, so the kernel shapes the true links while the workers
are told speeds FACTOR x off; one dist run per factor (1, 10, 0.1), time to target each.

slowed-link: the same cluster with the right speeds; once the run is AT seconds old, the
pipe between sites a and b is changed to a tenth of its rate, both ways (tc class change). The sim
is run on the same config with a bandwidth trace that slows that pipe at the same scenario
time, and the two times to target are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dlion.core.config import ExperimentConfig, config_from_dict
from dlion.engines import netns
from dlion.engines.launcher import run_dist


def base_config(strategy: str, target: float, max_time: float) -> dict[str, Any]:
    """Two sites: a (two workers, 40 Mbit/s between them) and b (one), a 4 Mbit/s pipe
    between them; a 77 kB dense gradient, so the pipe, not the compute, sets the pace of
    what crosses between sites."""
    return {
        "name": "real-links",
        "cluster": {
            "sites": [{"name": "a", "intra_bandwidth_mbps": 40}, {"name": "b"}],
            "workers": [
                {"site": "a", "capacity_gflops": 0.05, "count": 2},
                {"site": "b", "capacity_gflops": 0.05, "count": 1},
            ],
            "links": [{"sites": ["a", "b"], "bandwidth_mbps": 4, "latency_ms": 2}],
        },
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [256]},
        "strategy": {"name": strategy, "options": {}},
        "train": {
            "max_time": max_time,
            "batch_per_worker": 16,
            "lr": 0.05,
            "target_acc": target,
            "stop_at_target": True,
        },
        "evaluation": {"every_s": 0.25},
        "engine": {
            "name": "dist",
            "shaping": "kernel",
            "peer_timeout": 5.0,
            "heartbeat_s": 0.2,
        },
    }


def with_speeds(raw: dict[str, Any], factor: float) -> ExperimentConfig:
    """The config with every link speed (site, pair, NIC, up/downlink) times `factor`."""
    out = json.loads(json.dumps(raw))
    c = out["cluster"]
    for s in c["sites"]:
        if "intra_bandwidth_mbps" in s:
            s["intra_bandwidth_mbps"] *= factor
        for key in ("uplink_mbps", "downlink_mbps"):
            if s.get(key) is not None:
                s[key] *= factor
    for w in c["workers"]:
        if w.get("nic_mbps") is not None:
            w["nic_mbps"] *= factor
    for link in c["links"]:
        link["bandwidth_mbps"] *= factor
    return config_from_dict(out)


def _tc_change(ns: list[str], dev: str, parent: str, classid: str, rate: int, ceil: int) -> None:
    subprocess.run(
        [*ns, "class", "change", "dev", dev, "parent", parent, "classid", classid, "htb",
         "rate", f"{rate}bit", "ceil", f"{ceil}bit"],
        check=True, capture_output=True,
    )  # fmt: skip


def retune(plan: netns.Plan, right: netns.Plan) -> None:
    """Change every shaped class of `plan` (up) to the rate `right` gives the same class."""
    for w, rw in zip(plan.workers, right.workers, strict=True):
        ns = ["tc", "-n", w.netns]
        if w.nic_bps is not None and rw.nic_bps is not None:
            _tc_change(ns, netns.WORKER_IFNAME, "1:", "1:1", rw.nic_bps, rw.nic_bps)
        for c, rc in zip(w.classes, rw.classes, strict=True):
            if c.rate_bps < netns.UNSHAPED_BPS:
                _tc_change(ns, netns.WORKER_IFNAME, c.parent, c.classid, rc.rate_bps, rc.ceil_bps)
    for r, rr in zip(plan.routers, right.routers, strict=True):
        ns = ["tc", "-n", r.netns]
        if r.uplink_bps is not None and rr.uplink_bps is not None:
            _tc_change(ns, netns.ROUTER_WAN, "1:", "1:1", rr.uplink_bps, rr.uplink_bps)
        for c, rc in zip(r.pipes, rr.pipes, strict=True):
            _tc_change(ns, netns.ROUTER_WAN, c.parent, c.classid, rc.rate_bps, rc.ceil_bps)


def set_pipe(plan: netns.Plan, site: str, to: str, mbps: float) -> None:
    """Change site `site`'s pipe towards site `to` to `mbps` (mid-run)."""
    r = next(r for r in plan.routers if r.site == site)
    c = next(c for c in r.pipes if c.site == to)
    bps = int(mbps * 1e6)
    _tc_change(["tc", "-n", r.netns], netns.ROUTER_WAN, c.parent, c.classid, bps, bps)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _run(cfg: ExperimentConfig, plan: netns.Plan, out: Path) -> dict[str, Any]:
    load = _load()
    result = run_dist(cfg, out_dir=out, progress=False, netns=plan.prefix)
    s = result.summary
    return {"tta_s": s["tta_s"], "final_acc": s["final_acc"], "load_before": load}


def wrong_speeds(args: argparse.Namespace) -> list[dict[str, Any]]:
    raw = base_config(args.strategy, args.target, args.max_time)
    right = netns.plan_for(with_speeds(raw, 1.0), args.prefix, args.subnet)
    rows = []
    for rep in range(args.repeats):
        for factor in (1.0, 10.0, 0.1):
            cfg = with_speeds(raw, factor)
            plan = netns.up(netns.plan_for(cfg, args.prefix, args.subnet))
            try:
                retune(plan, right)
                row = _run(cfg, plan, args.out / f"{args.strategy}-x{factor:g}-{rep}")
            finally:
                netns.down(args.prefix)
            row.update(strategy=args.strategy, factor=factor, repeat=rep)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def slowed_link(args: argparse.Namespace) -> list[dict[str, Any]]:
    from dlion.engines.sim import run_sim

    raw = base_config(args.strategy, args.target, args.max_time)
    rows = []
    cfg = with_speeds(raw, 1.0)
    for rep in range(args.repeats):
        plan = netns.up(netns.plan_for(cfg, args.prefix, args.subnet))
        changed: dict[str, float] = {}
        out = args.out / f"dist-{rep}"

        def slow_down(
            out: Path = out, changed: dict[str, float] = changed, plan: netns.Plan = plan
        ) -> None:
            # The run's clock starts at t0_wall (the first line of metrics.jsonl).
            metrics = out / "metrics.jsonl"
            while not (metrics.is_file() and "t0_wall" in metrics.read_text()):
                time.sleep(0.02)
            t0 = json.loads(metrics.read_text().splitlines()[0])["t0_wall"]
            time.sleep(max(0.0, t0 + args.at - time.time()))
            set_pipe(plan, "a", "b", 0.4)  # both ways, as the sim's trace changes it
            set_pipe(plan, "b", "a", 0.4)
            changed["t"] = time.time() - t0

        timer = threading.Thread(target=slow_down, daemon=True)
        timer.start()
        try:
            row = _run(cfg, plan, out)
        finally:
            netns.down(args.prefix)
        row.update(engine="dist", repeat=rep, changed=changed.get("t"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    sim_raw = json.loads(json.dumps(raw))
    sim_raw["engine"] = {"name": "sim"}
    sim_raw["dynamics"] = {
        "bandwidth": [{"sites": ["a", "b"], "step": {"at_s": args.at, "to": 0.1}}],
    }
    sim = run_sim(config_from_dict(sim_raw), progress=False)
    row = {"engine": "sim", "tta_s": sim.summary["tta_s"], "final_acc": sim.summary["final_acc"]}
    print(json.dumps(row), flush=True)
    rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["wrong-speeds", "slowed-link"])
    parser.add_argument("--strategy", default="dlion")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-time", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--at", type=float, default=3.0, help="slowed-link: seconds in")
    parser.add_argument("--prefix", default="rl")
    parser.add_argument("--subnet", default="10.77.241.0/24")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault(netns.STATE_DIR_ENV, str(args.out / "netns-state"))
    rows = wrong_speeds(args) if args.what == "wrong-speeds" else slowed_link(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.what}-{args.strategy}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
