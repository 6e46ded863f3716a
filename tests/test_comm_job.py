"""comm/job.py: what the dist engine and FL on real processes share (membership with the
shared secret, one process per rank, pair labels, addresses, cancelling a loop's tasks)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from dlion.comm.job import (
    Keys,
    cancel_others,
    check_membership,
    claim_rank,
    decide,
    heartbeat_stale,
    host_store,
    job_store,
    member_record,
    membership_proof,
    pair_label,
    parse_address,
    refusal_reason,
)
from dlion.core.errors import BadInput


def test_the_proof_is_an_hmac_of_run_rank_and_nonce() -> None:
    # HMAC-SHA256 of b"run:1:n" under b"k" (a known answer, computed once).
    assert membership_proof("k", "run", 1, "n") == (
        "a23a1a8dbe15e982489ec987072171627fb611ac14a3a17180e077c2d7f59c5a"
    )
    assert membership_proof(None, "run", 1, "n") == ""


def test_refusal_names_a_missing_or_a_wrong_secret() -> None:
    good = {"nonce": "n", "proof": membership_proof("k", "run", 1, "n")}
    assert refusal_reason("k", "run", 1, good) == ""
    assert refusal_reason(None, "run", 1, {"proof": ""}) == ""  # no secret: anyone
    assert refusal_reason("k", "run", 1, {"nonce": "n", "proof": ""}) == (
        "no shared secret given, and the job requires one"
    )
    wrong = {"nonce": "n", "proof": membership_proof("guess", "run", 1, "n")}
    assert refusal_reason("k", "run", 1, wrong) == "shared secret mismatch"
    # A proof is bound to its rank and run: replayed for another, it fails.
    assert not check_membership("k", "run", 2, good)
    assert not check_membership("k", "other", 1, good)


def test_one_process_per_rank_and_a_refused_or_departed_one_gives_way() -> None:
    store = job_store(host_store("127.0.0.1", 0, 10.0), "t")

    def make(pid: int) -> Any:
        return lambda inc: {"pid": pid, "nonce": str(pid), "proof": "", "incarnation": inc}

    first, holder = claim_rank(store, make(1), 3)
    assert holder is None and first["incarnation"] == 0
    _, holder = claim_rank(store, make(2), 3)
    assert holder is not None and holder["pid"] == 1  # taken: nothing registered
    assert json.loads(store.get(Keys.member(3)).decode())["pid"] == 1
    assert decide(store, "k", "t", 3, first) == "no shared secret given, and the job requires one"
    second, holder = claim_rank(store, make(2), 3)  # the refused one gives way
    assert holder is None and second["incarnation"] == 1
    assert decide(store, None, "t", 3, second) == ""
    assert store.check([Keys.admitted(3, 1)])
    store.set(Keys.left(3, 1), "{}")  # it crashed; the coordinator recorded it
    third, holder = claim_rank(store, make(3), 3)
    assert holder is None and third["incarnation"] == 2
    record = member_record("k", "t", 3, 0)
    assert check_membership("k", "t", 3, record) and record["incarnation"] == 0


def test_pair_labels_addresses() -> None:
    assert pair_label(0, 0, 2, 1) == pair_label(2, 1, 0, 0) == "0-1"
    assert parse_address("10.0.0.1:29400", "--server") == ("10.0.0.1", 29400)
    assert parse_address("[::1]:5", "--server") == ("::1", 5)
    for bad in ("host", ":1", "h:0", "h:70000", "h:x"):
        with pytest.raises(BadInput, match=r"--server .*expected HOST:PORT"):
            parse_address(bad, "--server")


def test_cancel_others_outlasts_a_task_that_swallows_its_cancellation() -> None:
    ended: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            ended.append("swallowed")  # as asyncio.wait_for may do
        await asyncio.sleep(100)

    async def main() -> None:
        task = asyncio.ensure_future(stubborn())
        await asyncio.sleep(0)
        await cancel_others()
        assert task.cancelled()

    asyncio.run(main())
    assert ended == ["swallowed"]


def test_a_previous_incarnations_heartbeat_never_makes_a_joiner_stale() -> None:
    # Rank 2 crashed at wall 100 (its last beat, incarnation 0) and rejoined as
    # incarnation 1; at wall 108 the members have linked the joiner, which has not beaten
    # yet. The old record is 8 s old, past the 5 s timeout, but it is not the joiner's.
    old = {"wall": 100.0, "incarnation": 0}
    assert not heartbeat_stale(old, 1, now=108.0, timeout=5.0)
    # The same record is stale for the incarnation that wrote it, and the joiner's own
    # record is judged like any other.
    assert heartbeat_stale(old, 0, now=108.0, timeout=5.0)
    assert not heartbeat_stale({"wall": 106.0, "incarnation": 1}, 1, now=108.0, timeout=5.0)
    assert heartbeat_stale({"wall": 102.0, "incarnation": 1}, 1, now=108.0, timeout=5.0)
    assert not heartbeat_stale(None, 1, now=108.0, timeout=5.0)
    # Records written before incarnations were recorded count as incarnation 0.
    assert heartbeat_stale({"wall": 100.0}, 0, now=108.0, timeout=5.0)
