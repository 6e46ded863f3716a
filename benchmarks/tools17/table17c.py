"""Issue 17 section 14c: the 3-seed table from a `dlion bench` output directory.

Usage: python benchmarks/tools17/table17c.py RUNS_DIR [RUNS_DIR ...]  (later dirs add labels)
Prints a markdown table: mean TTA over the seeds that reached the target (k/3 when not all
did), the best baseline (mean TTA over those reaching it on every seed), dlion vs best,
dlion / ideal and the final accuracies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCENARIOS = [
    "homogeneous",
    "compute-hetero",
    "network-hetero",
    "microcloud-hetero",
    "microcloud-dynamic",
    "microcloud-hetero-noniid-0.5",
    "microcloud-hetero-noniid-0.1",
    "microcloud-hetero-12",
    "microcloud-hetero-24",
]
DLION = [
    "dlion",
    "dlion-lr0.1",
    "dlion-lr0.4",
    "dlion-no-sync",
    "dlion-no-gate",
    "dlion-no-z",
    "dlion-hpdc21",
]
BASELINES = ["gaia", "halos", "adpsgd", "allreduce"]


def load(dirs: list[Path]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for d in dirs:  # a label in a later directory replaces the earlier one's runs
        here: dict[tuple[str, str], list[dict]] = {}
        for f in sorted(d.glob("runs/*/*/seed*/summary.json")):
            s = json.loads(f.read_text())
            here.setdefault((s["scenario"], f.parent.parent.name), []).append(s)
        out |= here
    return out


def cell(runs: list[dict]) -> tuple[str, float | None, float]:
    if not runs:
        return "", None, 0.0
    reached = [r["tta_s"] for r in runs if r["tta_s"] is not None]
    acc = 100 * sum(r["final_acc"] for r in runs) / len(runs)
    if not reached:
        return f"— (0/{len(runs)})", None, acc
    mean = sum(reached) / len(reached)
    if len(reached) < len(runs):
        return f"{mean:.2f} ({len(reached)}/{len(runs)})", None, acc
    return f"{mean:.2f}", mean, acc


def main() -> None:
    data = load([Path(a) for a in sys.argv[1:]])
    cols = DLION + BASELINES + ["ideal"]
    print(
        "| scenario | " + " | ".join(cols) + " | best baseline | dlion vs best | dlion / ideal "
        "| final acc dlion / best other (%) |"
    )
    print("|---|" + "---:|" * (len(cols) + 4))
    for sc in SCENARIOS:
        cells = {c: cell(data.get((sc, c), [])) for c in cols}
        base = [(cells[b][1], b) for b in BASELINES if cells[b][1] is not None]
        best = min(base) if base else None
        d = cells["dlion"][1]
        ideal = cells["ideal"][1]
        vs = f"{best[0] / d:.2f}x" if best and d else "—"
        vi = f"{d / ideal:.2f}" if d and ideal else "—"
        other = max((cells[b][2] for b in BASELINES if data.get((sc, b))), default=0.0)
        row = [cells[c][0] for c in cols]
        bb = f"{best[1]} {best[0]:.2f}" if best else "none 3/3"
        print(
            f"| {sc} | " + " | ".join(row) + f" | {bb} | {vs} | {vi} | "
            f"{cells['dlion'][2]:.1f} / {other:.1f} |"
        )


if __name__ == "__main__":
    main()
