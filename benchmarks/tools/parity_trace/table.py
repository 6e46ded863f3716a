"""Per-worker iteration time and its parts, sim against dist runs (section 12e).

python3 table.py SIM_METRICS_JSONL DIST_RUN_DIR [DIST_RUN_DIR ...] [--from 10 --to 120]
Prints, per rank, scenario milliseconds per iteration between iterations FROM and TO and
the per-iteration means of the traced parts (see sitecustomize.py)."""

import argparse
import collections
import glob
import json


def load(paths: list[str], scale: float) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = collections.defaultdict(list)
    for p in paths:
        with open(p) as f:
            events = [json.loads(line) for line in f]
        for e in events:
            if e.get("event") == "tr":
                rows[e["rank"]].append(e)
    return rows


def summarize(rows: dict[int, list[dict]], scale: float, lo: int, hi: int, label: str) -> None:
    print(label)
    for r in sorted(rows):
        its = [x for x in rows[r] if lo <= x["it"] < hi]
        if len(its) < 2:
            continue
        n = len(its) - 1
        span = (its[-1]["now"] - its[0]["now"]) / scale
        keys = sorted({k for x in its[1:] for k in x if "." in k})
        parts = " ".join(
            f"{k}={sum(x.get(k, 0) for x in its[1:]) / n / scale * 1e3:.2f}" for k in keys
        )
        print(f"  rank {r}: {span / n * 1e3:6.2f} ms/it  {parts}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sim")
    ap.add_argument("dist", nargs="+")
    ap.add_argument("--from", dest="lo", type=int, default=10)
    ap.add_argument("--to", dest="hi", type=int, default=120)
    a = ap.parse_args()
    summarize(load([a.sim], 1.0), 1.0, a.lo, a.hi, f"sim {a.sim}")
    for d in a.dist:
        with open(f"{d}/summary.json") as f:
            scale = json.load(f).get("time_scale", 1.0)
        summarize(
            load(glob.glob(f"{d}/workers/rank-*.jsonl"), scale),
            scale,
            a.lo,
            a.hi,
            f"dist {d} (scenario ms)",
        )


if __name__ == "__main__":
    main()
