"""Markdown reports of `dlion transient bench` and `dlion transient perf` records."""

from __future__ import annotations

import math
from typing import Any


def _ms(s: dict[str, float], fmt: str = ".2f", scale: float = 1.0) -> str:
    """mean ± std (min..max) of a stats block."""
    if not s or s.get("n", 0) == 0 or math.isnan(s["mean"]):
        return "—"
    m, sd, lo, hi = (scale * s[k] for k in ("mean", "std", "min", "max"))
    return f"{m:{fmt}} ± {sd:{fmt}} ({lo:{fmt}}..{hi:{fmt}})"


def bench_markdown(rec: dict[str, Any]) -> str:
    lines: list[str] = []
    if "paper" in rec:
        p = rec["paper"]
        pub = p["published"]
        n = len(p["pairs"])
        lines += [
            f"### Paper comparison: {p['workers']} transient vs 1 on-demand {p['instance']}, "
            f"{p['epochs']} epochs of work each, ps-asp, {n} seeds",
            "",
            "| metric | sim (mean ± std (min..max)) | published (ICAC '19) |",
            "|---|---|---|",
            f"| speedup | {_ms(p['speedup'])}x | {pub['speedup']}x |",
            f"| cost saving | {_ms(p['cost_saving'], '.1f', 100)} % | "
            f"~{100 * pub['cost_saving']:.0f} % |",
            f"| accuracy, 1 on-demand | {_ms(p['acc_one'], '.1f', 100)} % | "
            f"{100 * pub['acc_one']:.1f} % |",
            f"| accuracy, {p['workers']} transient | {_ms(p['acc_many'], '.1f', 100)} % | "
            f"{100 * pub['acc_many']:.1f} % |",
            f"| accuracy gap (pp) | {_ms(p['acc_gap_pp'])} | "
            f"{100 * (pub['acc_one'] - pub['acc_many']):.1f} |",
            f"| time, 1 on-demand (h) | {_ms(p['time_one_h'])} | |",
            f"| time, {p['workers']} transient (h) | {_ms(p['time_many_h'])} | |",
            f"| cost, 1 on-demand ($) | {_ms(p['usd_one'])} | |",
            f"| cost, {p['workers']} transient ($) | {_ms(p['usd_many'])} | |",
            f"| revocations per run | {_ms(p['revocations'])} | |",
            f"| revocations of the server node (rank 0) | "
            f"{p.get('server_revocations', '—')} in {n} runs | |",
            "",
            f"Learning rate per update (same grid search for both): 1 worker {p['lr_one']}, "
            f"{p['workers']} workers {p['lr_many']}.",
            "",
        ]
    if "strategies" in rec:
        s = rec["strategies"]
        lines += [
            f"### DLion vs ps-asp on {s['cluster']}, to {100 * s['target_acc']:.0f} %",
            "",
            "| strategy | lr | reached | time to target (h) | cost to target ($) | final acc (%) "
            "| revocations |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in s["strategies"].items():
            lines.append(
                f"| {name} | {r['lr']} | {r['reached']}/{len(r['runs'])} | {_ms(r['tta_h'])} | "
                f"{_ms(r['usd'])} | {_ms(r['final_acc'], '.1f', 100)} | {_ms(r['revocations'])} |"
            )
        lines.append("")
    if "planner" in rec:
        lines += [
            "### Planner: recommendation per deadline vs full sim runs (fresh seeds)",
            "",
            "| deadline (h) | recommended | promised P | sim runs meeting it | predicted time (h) "
            "| sim time (h) | predicted cost ($) | sim cost ($) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in rec["planner"]["deadlines"]:
            if "recommended" not in d:
                lines.append(f"| {d['deadline_h']} | none can meet it | | | | | | |")
                continue
            lines.append(
                f"| {d['deadline_h']} | {d['recommended']} | {d['promised']:.2f} | "
                f"{d['met']}/{len(d['runs'])} ({d['met_share']:.2f}) | "
                f"{d['predicted_time_h']:.2f} | {_ms(d['sim_tta_h'])} | "
                f"{d['predicted_usd']:.2f} | {_ms(d['sim_usd'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def perf_markdown(rec: dict[str, Any]) -> str:
    sm, ck = rec["step_model"], rec["checkpoint_model"]
    coef = ", ".join(f"{n} {c:.3g}" for n, c in zip(sm["features"], sm["coef"], strict=True))
    return "\n".join(
        [
            "### Performance model",
            "",
            f"Step time = {coef} (least squares on relative error, sim profiles).",
            "",
            "| model | relative error, fit set | relative error, held out |",
            "|---|---|---|",
            f"| step time | {_ms(sm['fit_error'], '.1f', 100)} % | "
            f"{_ms(sm['held_out_error'], '.1f', 100)} % |",
            f"| step time, fit on <= 4 workers, predict 8 | | "
            f"{_ms(sm['extrapolation_8_workers_error'], '.1f', 100)} % |",
            f"| checkpoint time (real writes, {ck['overhead_s'] * 1e3:.2f} ms + size / "
            f"{ck['mb_per_s']:.0f} MB/s) | | {_ms(ck['held_out_error'], '.1f', 100)} % |",
            "",
        ]
    )
