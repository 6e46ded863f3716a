"""Cost accounting of a run: instance-hours and money per instance type, revocations seen.

A pure function of the config (who is present at the start, when replacements are
requested), the membership timeline the sim logged (when instances left) and the billing
plan (type, tier and price per rank). An instance is billed from its request (a
replacement pays for its startup) until it is revoked or the run ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dlion.core.config import ExperimentConfig, initially_absent


@dataclass(frozen=True)
class RankBilling:
    instance_type: str
    tier: str  # "transient" or "on-demand"
    price_per_h: float  # USD per instance-hour


@dataclass(frozen=True)
class Billing:
    """What each rank's instance costs, and how sim time maps to real time."""

    ranks: tuple[RankBilling, ...]
    time_scale: float = 1.0  # real seconds per simulated second


UNPRICED = "unpriced"


def billed_intervals(
    cfg: ExperimentConfig, membership: Sequence[Mapping[str, Any]], end_s: float
) -> dict[int, list[tuple[float, float]]]:
    """Per rank, the (start, stop) sim-second intervals its instances were billed."""
    n = sum(w.count for w in cfg.cluster.workers)
    planned = cfg.dynamics.membership
    starts: dict[int, list[float]] = {r: [] for r in range(n)}
    for r in sorted(set(range(n)) - initially_absent(planned)):
        starts[r].append(0.0)
    for ev in planned:
        if ev.event == "join" and ev.at_s < end_s:
            starts[ev.rank].append(ev.at_s)  # requested now, billed through its startup
    stops: dict[int, list[float]] = {r: [] for r in range(n)}
    for entry in membership:
        if entry["event"] in ("leave", "crash") and entry["t"] <= end_s:
            stops[int(entry["rank"])].append(float(entry["t"]))
    out: dict[int, list[tuple[float, float]]] = {}
    for r in range(n):
        pending = sorted(stops[r])
        spans = []
        for start in sorted(starts[r]):
            later = [s for s in pending if s >= start]
            stop = later[0] if later else end_s
            if later:
                pending.remove(stop)
            spans.append((start, stop))
        out[r] = spans
    return out


def run_cost(
    cfg: ExperimentConfig,
    membership: Sequence[Mapping[str, Any]],
    end_s: float,
    billing: Billing | None = None,
) -> dict[str, Any]:
    """The cost block of a run summary. Without a billing plan, instance-hours are counted
    in simulated hours under the type "unpriced" and money is None."""
    n = sum(w.count for w in cfg.cluster.workers)
    if billing is not None and len(billing.ranks) != n:
        raise ValueError(f"billing covers {len(billing.ranks)} ranks, the cluster has {n}")
    scale = billing.time_scale if billing is not None else 1.0
    per_type: dict[str, dict[str, Any]] = {}
    for rank, spans in billed_intervals(cfg, membership, end_s).items():
        hours = sum(stop - start for start, stop in spans) * scale / 3600.0
        if billing is None:
            key, price = UNPRICED, None
        else:
            rb = billing.ranks[rank]
            key, price = f"{rb.instance_type} ({rb.tier})", rb.price_per_h
        row = per_type.setdefault(key, {"instances": 0, "instance_hours": 0.0, "usd": 0.0})
        row["instances"] += len(spans)
        row["instance_hours"] += hours
        row["usd"] = None if price is None else row["usd"] + hours * price
    departures = [e for e in membership if e["event"] in ("leave", "crash") and e["t"] <= end_s]
    transient = (
        set(range(n))
        if billing is None
        else {r for r, rb in enumerate(billing.ranks) if rb.tier == "transient"}
    )
    usd = [row["usd"] for row in per_type.values()]
    return {
        "time_scale": scale,
        "types": per_type,
        "instance_hours": sum(row["instance_hours"] for row in per_type.values()),
        "usd": None if any(u is None for u in usd) else sum(usd),
        "revocations": sum(int(e["rank"]) in transient for e in departures),
    }


def cost_fields(
    cfg: ExperimentConfig, billing: Billing | None
) -> Callable[[list[dict[str, Any]], float], dict[str, Any]]:
    """The summary's cost block as `run_sim(summary_fields=...)` takes it: the engine knows
    nothing of prices, it hands over its membership log and end time."""

    def fields(membership: list[dict[str, Any]], end_s: float) -> dict[str, Any]:
        return {"cost": run_cost(cfg, membership, end_s, billing)}

    return fields
