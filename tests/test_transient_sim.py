"""Revocations in the sim: a revoked parameter server hands its role on, training goes on,
the replacement joins, and the run's summary bills it all."""

from __future__ import annotations

import pytest

from dlion.core.config import load_config, with_changes, with_membership
from dlion.engines.sim import run_sim
from dlion.transient.catalog import InstanceType, Revocation
from dlion.transient.cost import Billing, RankBilling, cost_fields, run_cost
from dlion.transient.revocation import Lease, Timeline, membership_events
from dlion.transient.runs import Candidate, run_transient, transient_config
from dlion.transient.spec import TransientSpec

SPEC = TransientSpec(time_scale=3600.0)


def _base(strategy: str = "ps-asp"):  # type: ignore[no-untyped-def]
    return with_changes(
        load_config("homogeneous"),
        [
            f"strategy.name={strategy}",
            "cluster.workers.0.count=3",
            "train.max_time=3",
            "train.stop_at_target=false",
            "train.lr=0.02",
            "evaluation.every_s=0.25",
        ],
    )


def test_revoked_server_role_moves_and_replacement_joins() -> None:
    # The server node (rank 0) is revoked at 1 sim s (1 h); its replacement is ready 0.2 s later.
    tl = Timeline(
        [
            Lease(0, 0.0, 0.0, 3600.0),
            Lease(0, 3600.0, 4320.0, None),
            Lease(1, 0.0, 0.0, None),
            Lease(2, 0.0, 0.0, None),
        ],
        deferred=0,
    )
    cfg = with_membership(_base(), membership_events(tl, 3600.0, announce=True))
    billing = Billing(tuple(RankBilling("k80", "transient", 0.5) for _ in range(3)), 3600.0)
    result = run_sim(cfg, progress=False, summary_fields=cost_fields(cfg, billing))
    s = result.summary
    kinds = [(m["rank"], m["event"]) for m in s["membership"]]
    assert kinds[0] == (0, "leave") and (0, "join") in kinds
    roles = [e for e in result.events if e["event"] == "ps_role"]
    moved = [e for e in roles if e["server"] == 1]
    assert moved and all(e["t"] >= 1.0 for e in moved)  # rank 1 took over after the leave
    assert any(e["server"] == 0 and e["t"] > 1.2 for e in roles)  # handed back on return
    # Training went on through the revocation and the model kept improving.
    acc_at = {p.t: p.mean_acc for p in result.points}
    assert s["final_acc"] > acc_at[1.0] and s["final_acc"] > 0.85
    # Cost: 3 ranks x 3 h, all transient at $0.5/h, rank 0 in two instances.
    cost = s["cost"]
    assert cost["revocations"] == 1
    assert cost["types"]["k80 (transient)"]["instances"] == 4
    assert cost["instance_hours"] == pytest.approx(9.0)
    assert cost["usd"] == pytest.approx(4.5)


def test_unannounced_revocation_is_a_crash_the_server_survives() -> None:
    tl = Timeline([Lease(0, 0.0, 0.0, 3600.0), Lease(1, 0, 0, None), Lease(2, 0, 0, None)], 0)
    cfg = with_membership(_base(), membership_events(tl, 3600.0, announce=False))
    cfg = with_changes(cfg, ["engine.peer_timeout=0.3"])
    result = run_sim(cfg, progress=False)
    events = [m["event"] for m in result.summary["membership"]]
    assert events == ["crash", "crash_detected"]
    unpriced = run_cost(cfg, result.summary["membership"], result.points[-1].t)
    assert unpriced["usd"] is None and unpriced["revocations"] == 1  # no billing plan
    assert result.summary["iterations"] > 100


FLAKY = InstanceType(
    name="flaky",
    peak_gflops=200,
    efficiency=1.0,
    on_demand_per_h=1.0,
    transient_per_h=0.3,
    startup_s=600,
    revocation=Revocation(distribution="exponential", mean_lifetime_h=2.0, warning_s=30),
)


@pytest.mark.parametrize("strategy", ["ps-asp", "dlion"])
def test_drawn_revocations_run_and_are_billed(strategy: str) -> None:
    cand = Candidate(FLAKY, 4, "transient")
    _cfg, _billing, timeline = transient_config(_base(strategy), cand, SPEC, seed=3)
    assert timeline.revocations >= 2  # 4 instances x 3 h at a 2 h mean lifetime
    result = run_transient(_base(strategy), cand, SPEC, seed=3)
    s = result.summary
    revoked = [m for m in s["membership"] if m["event"] in ("leave", "crash")]
    assert s["cost"]["revocations"] == len(revoked) == timeline.revocations
    hours = s["cost"]["instance_hours"]
    assert hours == pytest.approx(4 * s["time_s"] * 3600 / 3600)  # billed through startups
    assert s["cost"]["usd"] == pytest.approx(0.3 * hours)
    assert s["final_acc"] > 0.8
    again = run_transient(_base(strategy), cand, SPEC, seed=3).summary
    assert again["cost"] == s["cost"] and again["final_acc"] == s["final_acc"]
