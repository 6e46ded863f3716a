"""Planner: choose instance type, count and tier for a deadline or a budget.

Each candidate cluster (type x count x tier) is evaluated by Monte Carlo over revocation
draws, without running the sim per draw: the performance model predicts the cluster's step
time, profile runs give the iterations to the target accuracy per type and count, and a
draw's membership timeline says how much of the cluster works when (progress runs at
live/n of the full rate; a replacement works after its startup). Cost per draw bills
every instance from its request until its revocation or the end of training.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dlion.core.errors import ConfigError
from dlion.transient.catalog import TIERS, Catalog, InstanceType
from dlion.transient.revocation import Lease, draw_timeline
from dlion.transient.runs import Candidate
from dlion.transient.spec import TransientSpec

Goal = Literal["deadline", "budget"]

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(min|s|m|h|d)")


def parse_duration(text: str) -> float:
    """'90m', '2h', '1h30m', '1.5h', '3600s' or a plain number of seconds -> seconds > 0."""
    s = text.strip().lower()
    try:
        value = float(s)
    except ValueError:
        parts = _PART.findall(s)
        if not parts or _PART.sub("", s).strip():
            raise ConfigError(
                f"--deadline: cannot read {text!r} as a duration (e.g. 90m, 2h, 1h30m, 3600s)"
            ) from None
        value = sum(float(num) * _UNITS[unit] for num, unit in parts)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--deadline: must be a positive duration, got {text!r}")
    return value


def parse_budget(text: str) -> float:
    """'12.5' or '$12.5' -> USD > 0."""
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        raise ConfigError(f"--budget: expected an amount in USD, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--budget: must be a positive amount, got {text!r}")
    return value


@dataclass(frozen=True)
class Workload:
    """What the planner knows of the job, in real seconds."""

    # Per-worker iterations to target by type and count, one value per profiled training
    # seed (None: that seed never reached the target); each draw picks one, so training
    # noise counts.
    iterations: Callable[[InstanceType, int], Sequence[float | None]]
    step_s: Callable[[InstanceType, int], float]  # real seconds per iteration, by type, count


@dataclass(frozen=True)
class Outcome:
    """One candidate over all draws."""

    candidate: Candidate
    step_s: float  # predicted real seconds per iteration without revocations
    nominal_s: float  # time to target without revocations (inf: never reaches it)
    times_s: np.ndarray  # per draw (inf: not within the horizon)
    costs: np.ndarray  # per draw, USD
    revocations: np.ndarray  # per draw

    @property
    def mean_time_s(self) -> float:
        return float(np.mean(self.times_s))

    @property
    def mean_cost(self) -> float:
        return float(np.mean(self.costs))

    def p_time(self, deadline_s: float) -> float:
        return float(np.mean(self.times_s <= deadline_s))

    def p_cost(self, budget: float) -> float:
        return float(np.mean(self.costs <= budget))


def finish_time(leases: Sequence[Lease], n: int, work_s: float) -> float:
    """When `work_s` seconds of full-cluster work are done, progress running at live/n."""
    changes: list[tuple[float, int]] = []
    for lease in leases:
        changes.append((lease.ready_s, +1))
        if lease.revoked_s is not None:
            changes.append((lease.revoked_s, -1))
    changes.sort()
    done, live, t = 0.0, 0, 0.0
    for when, delta in changes:
        if live and done + (when - t) * live / n >= work_s:
            return t + (work_s - done) * n / live
        done += (when - t) * live / n
        live, t = live + delta, when
    if live == 0:
        return math.inf
    return t + (work_s - done) * n / live


def billed_cost(leases: Sequence[Lease], end_s: float, price_per_h: float) -> float:
    """USD of the leases up to `end_s`, each from its request to its revocation or the end."""
    hours = 0.0
    for lease in leases:
        if lease.requested_s >= end_s:
            continue
        stop = end_s if lease.revoked_s is None else min(lease.revoked_s, end_s)
        hours += (stop - lease.requested_s) / 3600.0
    return hours * price_per_h


class IterationDraws:
    """Iterations to target for one draw. The profiled seeds are few (3-5), and their
    empirical spread understates the true one (RESULTS.md 8c: 5 seeds spanned 266..332
    iterations, 10 fresh ones 275..360), so a draw comes from the Student-t predictive
    distribution of a normal fitted to them: mean + s * sqrt(1 + 1/k) * t_(k-1). A seed
    that never reached the target makes that share of draws never finish."""

    def __init__(self, profiled: Sequence[float | None]) -> None:
        if not profiled:
            raise ValueError("no iteration profile")
        self.finite = [float(x) for x in profiled if x is not None]
        self.never = 1.0 - len(self.finite) / len(profiled)
        k = len(self.finite)
        self.mean = statistics.fmean(self.finite) if k else math.inf
        self.scale = statistics.stdev(self.finite) * math.sqrt(1 + 1 / k) if k >= 2 else 0.0
        self.df = k - 1

    def draw(self, rng: random.Random) -> float:
        if not self.finite or rng.random() < self.never:
            return math.inf
        if self.scale == 0.0:
            return self.mean
        t = rng.gauss(0.0, 1.0) / math.sqrt(rng.gammavariate(self.df / 2, 2.0) / self.df)
        return max(1.0, self.mean + self.scale * t)


def evaluate(
    cand: Candidate, work: Workload, spec: TransientSpec, draws: int, seed: int
) -> Outcome:
    its = IterationDraws(list(work.iterations(cand.instance, cand.count)))
    step = work.step_s(cand.instance, cand.count)
    nominal = its.mean * step if its.never == 0 else math.inf
    price = cand.instance.price_per_h(cand.tier)
    # Long enough that a job slowed by many revocations still finishes inside it.
    horizon = 20 * (its.mean * step if its.finite else 0.0) + 24 * 3600
    rng = random.Random(f"plan/{seed}/{cand.label}")
    times, costs, revs = [], [], []
    for _ in range(draws):
        work_s = its.draw(rng) * step
        if math.isinf(work_s):
            times.append(math.inf)
            costs.append(math.inf)
            revs.append(0)
            continue
        horizon_i = max(horizon, 20 * work_s)
        tl = draw_timeline(
            cand.instance, cand.tier, cand.count, horizon_i, rng, replace=spec.replace
        )
        end = finish_time(tl.leases, cand.count, work_s)
        times.append(end)
        costs.append(billed_cost(tl.leases, end, price) if math.isfinite(end) else math.inf)
        revs.append(sum(1 for x in tl.leases if x.revoked_s is not None and x.revoked_s < end))
    return Outcome(cand, step, nominal, np.array(times), np.array(costs), np.array(revs))


def candidates(
    catalog: Catalog, types: Sequence[str] | None, counts: Sequence[int], tiers: Sequence[str]
) -> list[Candidate]:
    insts = [catalog.get(t) for t in types] if types else list(catalog.instances)
    for tier in tiers:
        if tier not in TIERS:
            raise ConfigError(f"--tiers: unknown tier {tier!r} (transient, on-demand)")
    for c in counts:
        if c < 1:
            raise ConfigError(f"--counts: worker counts must be >= 1, got {c}")
    return [Candidate(i, c, t) for i in insts for c in counts for t in tiers]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Plan:
    goal: Goal
    limit: float  # deadline (s) or budget (USD)
    confidence: float
    outcomes: list[Outcome]
    recommended: Outcome | None
    meets_confidence: bool  # the recommendation reaches the asked probability

    def probability(self, o: Outcome) -> float:
        return o.p_time(self.limit) if self.goal == "deadline" else o.p_cost(self.limit)


def recommend(outcomes: Sequence[Outcome], goal: Goal, limit: float, confidence: float) -> Plan:
    """Deadline: the cheapest expected cost among candidates that meet the deadline with at
    least `confidence`; budget: the fastest expected time among those that stay within the
    budget with at least `confidence`. If none qualifies, the most likely one (flagged)."""

    def prob(o: Outcome) -> float:
        return o.p_time(limit) if goal == "deadline" else o.p_cost(limit)

    feasible = [o for o in outcomes if prob(o) >= confidence]
    if feasible:
        key = (
            (lambda o: (o.mean_cost, o.mean_time_s))
            if goal == "deadline"
            else (lambda o: (o.mean_time_s, o.mean_cost))
        )
        return Plan(goal, limit, confidence, list(outcomes), min(feasible, key=key), True)
    ranked = [o for o in outcomes if prob(o) > 0]
    best = max(ranked, key=lambda o: (prob(o), -o.mean_cost)) if ranked else None
    return Plan(goal, limit, confidence, list(outcomes), best, False)


def pareto_front(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Candidates no other beats on both expected time and expected cost, by time."""
    finite = [o for o in outcomes if math.isfinite(o.mean_time_s)]
    front = [
        o
        for o in finite
        if not any(
            p.mean_time_s <= o.mean_time_s
            and p.mean_cost <= o.mean_cost
            and (p.mean_time_s < o.mean_time_s or p.mean_cost < o.mean_cost)
            for p in finite
        )
    ]
    return sorted(front, key=lambda o: o.mean_time_s)
