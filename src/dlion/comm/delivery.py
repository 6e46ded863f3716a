"""Sends that end when their bytes have crossed the link (dist engine, real links).

On a real link (`engine.shaping` kernel or none) gloo reports a send done once the kernel
took its bytes, and a socket buffer takes megabytes: a strategy that sends "when the
previous message has left" (DLion's inter-site pumps) would queue message after message
in the kernel while its bandwidth estimate says each fits in an iteration. The sim's send
ends when the bytes have crossed, and the dist send must too. Rule, per link (sender
side):

- every data frame of at least `ACK_MIN_BYTES` is acknowledged by its receiver, which
  counts such frames per link and sends the count back (ahead of any queued data frame,
  so an acknowledgement waits behind at most the one frame in progress), with the
  receiver's timing of the frame, which feeds the bandwidth estimate (engines/dist.py)
  when the frame is long enough to time (`reading_counts`);
- a send of n bytes ends at the latest of: the transport handed it to the kernel; its
  crossing time by the current estimate B of the link, `crossing_time` = max(leave,
  busy) + n / B, where busy is when the link's previous frame crosses by the same
  model; and every *earlier* acknowledged frame to that peer has been acknowledged
  (`window_open`: at most one frame in the network beyond the one being sent).

The model paces the sender at its estimate, so nothing queues while the estimate is right
(the receiver's timing reads 0.5-1.15x the tc rate on the loaded 2-core host, RESULTS.md
15b); the acknowledgement bound is what makes it self-correcting when the estimate is
too high or the link slows: however wrong B is, at most two frames wait in the kernel, so
a message sized to an iteration of pipe time arrives within about two iterations instead
of behind an ever longer queue. Waiting for the acknowledgement of the frame itself
(stop-and-wait, a first prototype) costs a round trip per frame, and the round trip of a
busy pair is long: the acknowledgement, and gloo's own recv-ready notice for the frame's
second part (gloo's tcp pairs send an unbound buffer only once the receiver has posted
its recv), cross the reverse path behind the peer's frames; with traffic both ways every
other frame waited behind one, which is why that prototype read 11 and 23 Mbit/s in turn
on a 20 Mbit/s link. Allowing the one frame beyond hides that round trip.

Waits are bounded (`engine.peer_timeout`): an acknowledgement that never comes (a peer
whose receiver is gone) ends the wait, and a dropped peer wakes its waiters at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# Frames above 1 kB are acknowledged: control messages and acknowledgements are smaller.
ACK_MIN_BYTES = 1024
# A receiver's timing of a frame smaller than `engine.measure_min_bytes` counts when the
# sender's estimate says its timed part takes at least this long: thread wake-ups on a
# loaded host move a span by milliseconds, so a 1 ms span reads anything, a 10 ms one
# within about 10-20%.
MIN_TIMED_SPAN_S = 0.01


def crossing_time(leave: float, busy: float, nbytes: int, rate: float) -> float:
    """When a frame of `nbytes` that may leave at `leave` has crossed a link of `rate`
    bytes/s whose previous frame crosses at `busy` (model of the sender's estimate)."""
    if rate <= 0:
        raise ValueError(f"crossing_time: rate must be positive, got {rate}")
    return max(leave, busy) + nbytes / rate


def reading_counts(frame: int, timed: int, estimate: float, min_frame: int) -> bool:
    """Does the receiver's timing of `timed` bytes of a `frame`-byte frame feed the link's
    estimate? Yes for frames of at least `min_frame` bytes (`engine.measure_min_bytes`),
    and for smaller ones whose timed part takes at least MIN_TIMED_SPAN_S at `estimate`
    bytes/s. Why the second: a strategy that sizes its messages to the estimate sends
    small ones on a slow link; when that link slows further (a tc class change to a
    tenth), only small frames cross it, and without them the estimate would stay 10x too
    high all run (RESULTS.md section 15c: the site-b leader's 3-15 kB messages). An
    estimate that is too high only makes the span look shorter, so a link that slowed is
    still caught once its frames take MIN_TIMED_SPAN_S at the old rate."""
    return frame >= min_frame or (estimate > 0 and timed / estimate >= MIN_TIMED_SPAN_S)


def window_open(index: int, acked: int) -> bool:
    """May the `index`-th acknowledged frame to a peer (1-based) count as delivered, with
    `acked` of them acknowledged? Yes once every earlier one is (one frame beyond)."""
    return acked >= index - 1


@dataclass
class _Link:
    sent: int = 0  # acknowledged frames sent on this link
    acked: int = 0  # the receiver's count in its latest acknowledgement
    busy: float = 0.0  # when the last frame crosses, by the model
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


class DeliveryLedger:
    """Per-peer counts and model clocks of one worker's sends (on its event loop)."""

    def __init__(self) -> None:
        self._links: dict[int, _Link] = {}

    def on_send(self, peer: int, nbytes: int, leave: float, rate: float) -> tuple[int, float]:
        """A frame of `nbytes` to `peer` may leave at `leave`: (its index among the
        acknowledged frames, 0 if it is not acknowledged; when it has crossed by the model)."""
        link = self._links.setdefault(peer, _Link())
        link.busy = crossing_time(leave, link.busy, nbytes, rate)
        index = 0
        if nbytes >= ACK_MIN_BYTES:
            link.sent += 1
            index = link.sent
        return index, link.busy

    def on_ack(self, peer: int, count: int) -> None:
        """`peer` has received `count` acknowledged frames of ours (cumulative)."""
        link = self._links.get(peer)
        if link is None or count <= link.acked:
            return
        link.acked = count
        keep = []
        for index, fut in link.waiters:
            if window_open(index, count):
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((index, fut))
        link.waiters = keep

    def unacknowledged(self, peer: int) -> int:
        link = self._links.get(peer)
        return 0 if link is None else link.sent - link.acked

    async def wait(self, peer: int, index: int, timeout: float) -> bool:
        """Until the window lets frame `index` to `peer` count as delivered; False if
        `timeout` seconds passed first."""
        link = self._links.get(peer)
        if index == 0 or link is None or window_open(index, link.acked):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.waiters.append((index, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True

    def reset(self, peer: int) -> None:
        """The link to `peer` is gone or new: wake its waiters and start its counts over."""
        link = self._links.pop(peer, None)
        if link is not None:
            for _, fut in link.waiters:
                if not fut.done():
                    fut.set_result(None)
