"""Per-seed time to target, and the iteration it was reached at, from bench outputs.

RESULTS.md section 14g. Usage: python3 benchmarks/tools17/tta_table.py DIR [DIR ...]
(each DIR a `dlion bench --out` directory; one block per directory, rows by scenario and
label: the mean over seeds that reached the target, then seed: TTA (iteration)).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(out_dir: Path) -> dict[tuple[str, str], dict[int, tuple[float | None, int | None]]]:
    found: dict[tuple[str, str], dict[int, tuple[float | None, int | None]]] = {}
    for path in sorted(out_dir.glob("runs/*/*/seed*/metrics.jsonl")):
        scenario, label, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        events = [json.loads(line) for line in path.open()]
        end = next(e for e in events if e["event"] == "end")
        tta = end.get("tta_s")
        iteration = next(
            (e["iteration"] for e in events if e["event"] == "eval" and e["t"] == tta), None
        )
        found.setdefault((scenario, label), {})[seed] = (tta, iteration)
    return found


def main(dirs: list[str]) -> None:
    for d in dirs:
        print(f"== {d}")
        for (scenario, label), seeds in sorted(rows(Path(d)).items()):
            reached = [v[0] for v in seeds.values() if v[0] is not None]
            mean = f"{sum(reached) / len(reached):.3f}" if reached else "-"
            cells = " ".join(f"s{s}:{v[0]}({v[1]})" for s, v in sorted(seeds.items()))
            print(f"{scenario:30s} {label:12s} mean {mean} ({len(reached)}/{len(seeds)}) | {cells}")


if __name__ == "__main__":
    main(sys.argv[1:])
