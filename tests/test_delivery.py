"""Sends that end when their bytes have crossed (comm/delivery.py): the model of the
sender's estimate and the window of acknowledged frames, on hand-computed cases."""

from __future__ import annotations

import asyncio

import pytest

from dlion.comm.delivery import (
    ACK_MIN_BYTES,
    DeliveryLedger,
    crossing_time,
    reading_counts,
    window_open,
)


def test_crossing_time_queues_behind_the_previous_frame() -> None:
    # 1000 B at 500 B/s: 2 s after it may leave, or after the frame ahead of it crosses.
    assert crossing_time(leave=1.0, busy=0.0, nbytes=1000, rate=500.0) == pytest.approx(3.0)
    assert crossing_time(leave=1.0, busy=4.0, nbytes=1000, rate=500.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="positive"):
        crossing_time(0.0, 0.0, 10, 0.0)


def test_the_window_allows_one_unacknowledged_frame_beyond_the_one_sent() -> None:
    assert window_open(1, 0)  # the first frame: nothing earlier to wait for
    assert not window_open(3, 1)  # frame 2 still unacknowledged
    assert window_open(3, 2)
    assert window_open(3, 5)


def test_ledger_counts_large_frames_and_chains_the_model() -> None:
    ledger = DeliveryLedger()
    # Two 10 kB frames at 10 kB/s leaving at t = 0: they cross at 1 s and 2 s.
    assert ledger.on_send(1, 10_000, 0.0, 10_000.0) == (1, pytest.approx(1.0))
    assert ledger.on_send(1, 10_000, 0.0, 10_000.0) == (2, pytest.approx(2.0))
    # A small frame is modelled but not acknowledged (index 0); another peer is its own link.
    assert ledger.on_send(1, ACK_MIN_BYTES - 1, 0.0, 10_000.0)[0] == 0
    assert ledger.on_send(2, 10_000, 0.5, 10_000.0) == (1, pytest.approx(1.5))
    assert ledger.unacknowledged(1) == 2


def test_a_send_waits_for_the_earlier_frames_acknowledgement() -> None:
    async def scenario() -> list[str]:
        ledger = DeliveryLedger()
        seen: list[str] = []
        for _ in range(3):
            ledger.on_send(1, 5000, 0.0, 1e9)

        async def third() -> None:
            assert await ledger.wait(1, 3, timeout=5.0)
            seen.append("third done")

        task = asyncio.ensure_future(third())
        await asyncio.sleep(0.01)
        ledger.on_ack(1, 1)  # frame 2 still out: the third send waits on
        await asyncio.sleep(0.01)
        seen.append("after ack 1")
        ledger.on_ack(1, 2)
        await task
        # Acknowledgements only move forward; a stale one changes nothing.
        ledger.on_ack(1, 1)
        assert ledger.unacknowledged(1) == 1
        return seen

    assert asyncio.run(scenario()) == ["after ack 1", "third done"]


def test_a_missing_acknowledgement_times_out_and_a_reset_wakes_waiters() -> None:
    async def scenario() -> tuple[bool, bool]:
        ledger = DeliveryLedger()
        for _ in range(2):
            ledger.on_send(1, 5000, 0.0, 1e9)
        timed_out = await ledger.wait(1, 2, timeout=0.05)
        waiter = asyncio.ensure_future(ledger.wait(1, 2, timeout=5.0))
        await asyncio.sleep(0.01)
        ledger.reset(1)  # the peer is gone: nobody waits for it
        woken = await asyncio.wait_for(waiter, 1.0)
        # A new link counts from 1 again.
        assert ledger.on_send(1, 5000, 0.0, 1e9)[0] == 1
        return timed_out, woken

    assert asyncio.run(scenario()) == (False, True)


def test_small_frames_feed_the_estimate_only_when_they_take_long_enough_to_time() -> None:
    # 16 kB and up always; an 8 kB frame (4 kB timed) at 4 Mbit/s estimated is 8 ms: no;
    # at 2 Mbit/s (or a link now slower than its estimate says) 16 ms: yes.
    assert reading_counts(20_000, 15_912, 5e6, 16_384)
    assert not reading_counts(8_192, 4_104, 500_000.0, 16_384)
    assert reading_counts(8_192, 4_104, 250_000.0, 16_384)
    assert not reading_counts(8_192, 4_104, 0.0, 16_384)
