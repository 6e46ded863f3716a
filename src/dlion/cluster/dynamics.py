"""The membership schedule of a run: explicit join/leave/crash events plus seeded random
departures, as one time-ordered list the engine replays."""

from __future__ import annotations

import random

from dlion.core.config import DynamicsConfig, MembershipEvent, check_membership, initially_absent


def membership_schedule(dyn: DynamicsConfig, n: int, horizon: float) -> list[MembershipEvent]:
    """Explicit events plus random departures before `horizon`, sorted by time.

    Random departures: ranks without explicit events each draw an exponential lifetime;
    a departure that would leave fewer than `min_live` workers is skipped; with
    `rejoin_after_s` the worker comes back (a join with that startup time) and draws again.
    """
    events = list(dyn.membership)
    rd = dyn.random_departures
    if rd is not None:
        rng = random.Random(rd.seed)
        named = {e.rank for e in events}
        # Draw per rank in rank order so the draws do not depend on event interleaving.
        drawn: list[MembershipEvent] = []
        for rank in range(n):
            if rank in named:
                continue
            t = 0.0
            while True:
                t += rng.expovariate(1.0 / rd.mean_lifetime_s)
                if t >= horizon:
                    break
                drawn.append(MembershipEvent(at_s=t, rank=rank, event=rd.event))
                if rd.rejoin_after_s is None:
                    break
                drawn.append(
                    MembershipEvent(at_s=t, rank=rank, event="join", startup_s=rd.rejoin_after_s)
                )
                t += rd.rejoin_after_s
        events = _respect_min_live(events, drawn, n, rd.min_live)
    order = sorted(range(len(events)), key=lambda i: (events[i].at_s, i))
    out = [events[i] for i in order]
    check_membership(out, n)
    return out


def _respect_min_live(
    fixed: list[MembershipEvent], drawn: list[MembershipEvent], n: int, min_live: int
) -> list[MembershipEvent]:
    """Add drawn events in time order, skipping a departure (and the return that goes
    with it) when fewer than `min_live` workers would be present."""
    present = set(range(n)) - initially_absent(fixed)
    timeline = sorted(
        [(e.ready_s, 0, e) for e in fixed]
        + [(e.at_s if e.event != "join" else e.ready_s, 1, e) for e in drawn],
        key=lambda x: (x[0], x[1]),
    )
    kept = list(fixed)
    skipped: set[int] = set()  # ranks whose last drawn departure was skipped
    for _, drawn_flag, ev in timeline:
        if ev.event == "join":
            if drawn_flag and ev.rank in skipped:
                skipped.discard(ev.rank)
                continue
            present.add(ev.rank)
        else:
            if drawn_flag and len(present) - 1 < min_live:
                skipped.add(ev.rank)
                continue
            present.discard(ev.rank)
        if drawn_flag:
            kept.append(ev)
    return kept
