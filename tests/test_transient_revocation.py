"""Revocation leases and their membership events; cost accounting from a timeline."""

from __future__ import annotations

import itertools
import random

import pytest

from dlion.core.config import check_membership, load_config, with_membership
from dlion.core.errors import ConfigError
from dlion.transient.catalog import InstanceType, Revocation
from dlion.transient.cost import Billing, RankBilling, billed_intervals, run_cost
from dlion.transient.revocation import Lease, Timeline, draw_timeline, membership_events


def _inst(mean_h: float = 1.0, startup_s: float = 100.0, warning_s: float = 30.0) -> InstanceType:
    return InstanceType(
        name="t",
        peak_gflops=100,
        efficiency=1.0,
        on_demand_per_h=1.0,
        transient_per_h=0.25,
        startup_s=startup_s,
        revocation=Revocation(
            distribution="exponential", mean_lifetime_h=mean_h, warning_s=warning_s
        ),
    )


def test_on_demand_is_never_revoked() -> None:
    tl = draw_timeline(_inst(0.01), "on-demand", 4, 1e6, random.Random(0))
    assert tl.revocations == 0
    assert [(x.rank, x.ready_s, x.revoked_s) for x in tl.leases] == [
        (r, 0.0, None) for r in range(4)
    ]


def test_replacements_follow_revocations_and_draws_are_seeded() -> None:
    inst = _inst(mean_h=0.5, startup_s=100.0)
    tl = draw_timeline(inst, "transient", 3, 20 * 3600, random.Random(7))
    assert tl.revocations > 10
    for rank in range(3):
        mine = [x for x in tl.leases if x.rank == rank]
        assert mine[0].requested_s == 0.0
        for prev, nxt in itertools.pairwise(mine):
            assert nxt.requested_s == prev.revoked_s  # requested at the revocation
            assert nxt.ready_s == pytest.approx(nxt.requested_s + 100.0)  # after the startup
            assert prev.revoked_s is not None and prev.revoked_s > prev.ready_s
    again = draw_timeline(inst, "transient", 3, 20 * 3600, random.Random(7))
    assert again == tl
    other = draw_timeline(inst, "transient", 3, 20 * 3600, random.Random(8))
    assert other != tl
    no_replace = draw_timeline(inst, "transient", 3, 20 * 3600, random.Random(7), replace=False)
    assert len(no_replace.leases) == 3


def test_keep_one_live_defers_the_last_revocation() -> None:
    inst = _inst(mean_h=0.2, startup_s=600.0)
    deferred = 0
    for seed in range(20):
        tl = draw_timeline(inst, "transient", 2, 10 * 3600, random.Random(seed), keep_one_live=True)
        changes = sorted(
            [(x.ready_s, 1) for x in tl.leases]
            + [(x.revoked_s, -1) for x in tl.leases if x.revoked_s is not None],
            key=lambda c: (c[0], -c[1]),
        )
        live = 0
        for t, d in changes:
            live += d
            assert live >= 1 or t == 0.0, f"seed {seed}: nobody live at {t}"
        deferred += tl.deferred
    assert deferred > 0  # the rule was exercised, not vacuous
    with pytest.raises(ConfigError, match="no worker to hold the model"):
        draw_timeline(inst, "transient", 1, 1e9, random.Random(0), keep_one_live=True)


def test_membership_events_leave_or_crash_then_join() -> None:
    tl = Timeline(
        [
            Lease(0, 0.0, 0.0, 7200.0),
            Lease(0, 7200.0, 7560.0, None),
            Lease(1, 0.0, 0.0, None),
        ],
        deferred=0,
    )
    events = membership_events(tl, 3600.0, announce=True)
    assert [(e.at_s, e.rank, e.event, e.startup_s) for e in events] == [
        (2.0, 0, "leave", 0.0),
        (2.0, 0, "join", pytest.approx(0.1)),
    ]
    check_membership(events, 2)
    crash = membership_events(tl, 3600.0, announce=False)
    assert crash[0].event == "crash"


def _two_workers():  # type: ignore[no-untyped-def]
    base = load_config("homogeneous", ["cluster.workers.0.count=2"])
    tl = Timeline(
        [Lease(0, 0.0, 0.0, 7200.0), Lease(0, 7200.0, 9000.0, None), Lease(1, 0.0, 0.0, None)],
        deferred=0,
    )
    return with_membership(base, membership_events(tl, 3600.0, announce=True))


def test_cost_hand_computed_from_timeline() -> None:
    cfg = _two_workers()
    # rank 0 left at 2.0 sim s; its replacement was requested then (ready at 2.5);
    # the run ended at 5.0. Billed: rank 0: [0, 2] and [2, 5]; rank 1: [0, 5].
    log = [
        {"t": 2.0, "rank": 0, "event": "leave"},
        {"t": 2.5, "rank": 0, "event": "join_started"},
        {"t": 2.5, "rank": 0, "event": "join"},
    ]
    assert billed_intervals(cfg, log, 5.0) == {0: [(0.0, 2.0), (2.0, 5.0)], 1: [(0.0, 5.0)]}
    billing = Billing(
        (RankBilling("t", "transient", 0.25), RankBilling("u", "on-demand", 1.0)), 3600.0
    )
    cost = run_cost(cfg, log, 5.0, billing)
    assert cost["types"]["t (transient)"] == {"instances": 2, "instance_hours": 5.0, "usd": 1.25}
    assert cost["types"]["u (on-demand)"] == {"instances": 1, "instance_hours": 5.0, "usd": 5.0}
    assert cost["usd"] == 6.25
    assert cost["instance_hours"] == 10.0
    assert cost["revocations"] == 1
    # The run stopped before the replacement was ready: it was still billed from its request.
    early = run_cost(cfg, log[:1], 2.2, billing)
    assert early["types"]["t (transient)"]["instance_hours"] == pytest.approx(2.2)
    # A revocation on an on-demand rank would not be one: only transient ranks count.
    assert (
        run_cost(cfg, [{"t": 1.0, "rank": 1, "event": "crash"}], 5.0, billing)["revocations"] == 0
    )


def test_unpriced_run_counts_sim_hours() -> None:
    cfg = load_config("homogeneous")
    cost = run_cost(cfg, [], 36.0)
    assert cost["usd"] is None
    assert cost["types"]["unpriced"]["instance_hours"] == pytest.approx(6 * 36.0 / 3600)
    with pytest.raises(ValueError, match="billing covers 1 ranks"):
        run_cost(cfg, [], 1.0, Billing((RankBilling("t", "transient", 1.0),)))
