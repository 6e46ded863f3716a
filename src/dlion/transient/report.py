"""The planner's table (rich and JSON) and its cost/time frontier plot (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from dlion.report.plots import png_figure
from dlion.transient.planner import Outcome, Plan, pareto_front


def _hours(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds / 3600:.2f}"


def _usd(value: float) -> str:
    return "—" if math.isinf(value) else f"{value:.2f}"


def goal_text(plan: Plan) -> str:
    if plan.goal == "deadline":
        return f"deadline {plan.limit / 3600:.2f} h"
    return f"budget ${plan.limit:.2f}"


def plan_table(plan: Plan, title: str) -> Table:
    table = Table(title=escape(title))
    # escape(): rich would read "[time]" in a header as a style tag and drop it.
    for col in ("cluster", "step (s)", "E[time] (h)", "p90 time (h)", "E[cost] ($)"):
        table.add_column(escape(col), justify="left" if col == "cluster" else "right")
    table.add_column(escape(f"P(meet {goal_text(plan)})"), justify="right")
    table.add_column(escape("E[revocations]"), justify="right")
    table.add_column("", justify="left")
    for o in sorted(plan.outcomes, key=lambda o: (o.mean_cost, o.mean_time_s)):
        mark = "[bold green]recommended[/]" if o is plan.recommended else ""
        p90 = float(sorted(o.times_s)[int(0.9 * (len(o.times_s) - 1))])
        table.add_row(
            o.candidate.label,
            f"{o.step_s:.1f}",
            _hours(o.mean_time_s),
            _hours(p90),
            _usd(o.mean_cost),
            f"{plan.probability(o):.2f}",
            f"{o.revocations.mean():.2f}",
            mark,
        )
    return table


def outcome_record(o: Outcome, plan: Plan) -> dict[str, Any]:
    finite = math.isfinite(o.mean_time_s)
    return {
        "cluster": o.candidate.label,
        "instance_type": o.candidate.instance.name,
        "count": o.candidate.count,
        "tier": o.candidate.tier,
        "step_s": o.step_s,
        "nominal_time_s": o.nominal_s if finite else None,
        "mean_time_s": o.mean_time_s if finite else None,
        "mean_cost_usd": o.mean_cost if finite else None,
        "probability": plan.probability(o),
        "mean_revocations": float(o.revocations.mean()),
    }


def plan_record(plan: Plan) -> dict[str, Any]:
    rec = plan.recommended
    return {
        "goal": plan.goal,
        "limit": plan.limit,
        "confidence": plan.confidence,
        "recommended": rec.candidate.label if rec is not None else None,
        "meets_confidence": plan.meets_confidence,
        "candidates": [outcome_record(o, plan) for o in plan.outcomes],
    }


def plot_frontier(plan: Plan, path: Path, title: str) -> Path:
    """Expected cost vs expected time of every candidate; the Pareto front as a line, the
    recommendation ringed, the deadline or budget dashed."""
    with png_figure(path, figsize=(7.5, 5)) as ax:
        finite = [o for o in plan.outcomes if math.isfinite(o.mean_time_s)]
        for tier, marker in (("transient", "o"), ("on-demand", "s")):
            pts = [o for o in finite if o.candidate.tier == tier]
            ax.scatter(
                [o.mean_time_s / 3600 for o in pts],
                [o.mean_cost for o in pts],
                marker=marker,
                label=tier,
                alpha=0.8,
            )
            for o in pts:
                ax.annotate(
                    f"{o.candidate.count}x{o.candidate.instance.name}",
                    (o.mean_time_s / 3600, o.mean_cost),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        front = pareto_front(finite)
        ax.plot(
            [o.mean_time_s / 3600 for o in front],
            [o.mean_cost for o in front],
            color="gray",
            linewidth=1,
            label="cost/time frontier",
        )
        if plan.recommended is not None and math.isfinite(plan.recommended.mean_time_s):
            r = plan.recommended
            ax.scatter(
                [r.mean_time_s / 3600],
                [r.mean_cost],
                s=250,
                facecolors="none",
                edgecolors="red",
                linewidths=2,
                label=f"recommended: {r.candidate.label}",
            )
        if plan.goal == "deadline":
            ax.axvline(plan.limit / 3600, color="red", linestyle="--", linewidth=1)
        else:
            ax.axhline(plan.limit, color="red", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("expected time to target (h)")
        ax.set_ylabel("expected cost (USD)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return path
