"""The TTA table of a `dlion bench` run that has not finished (bench writes its report only
at the end): mean time to target over the seeds per scenario x label, from the runs'
summary.json and config.yaml. A label whose runs have not all finished in a scenario is
shown as "not finished (n/3 runs)"; a scenario with no finished label is left out.
Usage: python3 benchmarks/tools/paper_partial.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

SEEDS = 3
BOUND = "ideal"  # the synchronous-SGD bound: never marked as the fastest strategy


def chosen_setting(run_dir: Path) -> str:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    text = f"lr {cfg['train']['lr']}"
    options = cfg["strategy"].get("options") or {}
    if "H" in options:
        text += f", H {options['H']}"
    if (cfg["train"].get("optimizer") or {}).get("name") == "adamw":
        text += ", AdamW"
    return text


def cell(ttas: list[float], seeds: int, fastest: bool) -> str:
    if not ttas:
        return f"— (0/{seeds})"
    text = f"{sum(ttas) / len(ttas):.1f}"
    if len(ttas) < seeds:
        text += f" ({len(ttas)}/{seeds})"
    return f"**{text}**" if fastest else text


def main(out_dir: Path) -> None:
    root = out_dir / "runs"
    chosen: dict[str, str] = {}
    table: dict[str, dict[str, list[float]]] = {}
    unfinished: dict[str, dict[str, int]] = {}
    for scenario_dir in sorted(root.iterdir()):
        runs: dict[str, list[float]] = {}
        for label_dir in sorted(scenario_dir.iterdir()):
            summaries = sorted(label_dir.glob("seed*/summary.json"))
            if len(summaries) < SEEDS:
                unfinished.setdefault(scenario_dir.name, {})[label_dir.name] = len(summaries)
                continue
            results = [json.loads(f.read_text()) for f in summaries]
            runs[label_dir.name] = [r["tta_s"] for r in results if r["tta_s"] is not None]
            chosen[label_dir.name] = chosen_setting(summaries[0].parent)
        if runs:
            table[scenario_dir.name] = runs
    labels = sorted({label for runs in table.values() for label in runs})
    print("| scenario | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for scenario, runs in table.items():
        means = {
            label: sum(t) / len(t)
            for label, t in runs.items()
            if label != BOUND and len(t) == SEEDS
        }
        best = min(means.values(), default=None)
        missing = unfinished.get(scenario, {})
        cells = [
            f"not finished ({missing.get(label, 0)}/{SEEDS} runs)"
            if label not in runs
            else cell(runs[label], SEEDS, means.get(label) == best and best is not None)
            for label in labels
        ]
        print(f"| {scenario} | " + " | ".join(cells) + " |")
    print()
    print("chosen: " + "; ".join(f"{label} {text}" for label, text in sorted(chosen.items())))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
