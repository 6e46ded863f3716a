"""The dist engine's native all-reduce: one torch.distributed collective over a process
group of the current members, formed again whenever the membership changes.

`ctx.allreduce_sum` (context.py) is a ring of point-to-point messages in the sim; here it
is one `allreduce` of a gloo (or NCCL) group: one C++ operation per iteration instead of
2(n-1) frames through the pair links, which is what PyTorch DDP does. It is used on
unshaped links only (`engine.shaping: none`): its traffic bypasses the transport's pacing
and latencies, so on shaped links (transport or kernel) the dist engine runs the sim's ring
of point-to-point messages instead (DistContext.allreduce_sum).

A group belongs to one membership: its store prefix names the epoch and every member's
rank and incarnation, so the members (and only they) meet in it, and a worker that comes
back never meets its previous life's keys. Forming it blocks in the store's rendezvous,
so it runs in a thread while the worker's loop goes on serving state requests (a member
that re-forms first fetches the leader's state, see `regroup`).

Faults: a collective never waits forever. A member that dies resets its connections, so
the others' operation fails at once; one that hangs stops its heartbeat and is dropped
after `engine.peer_timeout`. Either way the survivors' membership changes, which aborts
the wait (the pending operation is abandoned with its group, kept alive until it ends on
its own timeout), and the caller re-forms over the survivors. The group's own timeout
(`engine.startup_timeout`, at least `engine.peer_timeout`) is only the backstop.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist


class CollectiveGroups:
    """This worker's process groups for native collectives, one per membership."""

    def __init__(
        self, store_factory: Callable[[], dist.Store], *, backend: str, timeout_s: float
    ) -> None:
        self._store_factory = store_factory
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._groups: dict[str, dist.ProcessGroup] = {}
        # Times each membership's group was given up: a group formed again after a failure
        # that did not change the membership meets under a fresh name (every member saw
        # the failure, so they count alike).
        self.attempts: dict[str, int] = {}
        # Groups given up with an operation possibly pending: dropping the last reference
        # would wait for that operation in the destructor, on the worker's loop.
        self._retired: list[dist.ProcessGroup] = []
        self._lock = threading.Lock()

    def get(self, key: str) -> dist.ProcessGroup | None:
        with self._lock:
            return self._groups.get(key)

    def form(self, key: str, index: int, size: int) -> dist.ProcessGroup:
        """Blocks until all `size` members have called it with the same `key`."""
        # A store client per group: a rendezvous given up on may still block in its own.
        store = dist.PrefixStore(f"coll/{key}/", self._store_factory())
        # torch's stubs type these two as c10d Backends without send/recv/allreduce (they
        # have them at run time) and give NCCL's `options` no default (it has one).
        if self.backend == "nccl":
            group: dist.ProcessGroup = dist.ProcessGroupNCCL(store, index, size)  # type: ignore[call-arg,assignment]
        else:
            group = dist.ProcessGroupGloo(store, index, size, self.timeout)  # type: ignore[assignment]
        with self._lock:
            # Only the newest membership's group stays in use; older ones are retired.
            self._retired.extend(self._groups.values())
            self._groups = {key: group}
        return group

    def retire(self, key: str) -> None:
        """Stop using the group of `key` (it failed, or its membership changed)."""
        with self._lock:
            group = self._groups.pop(key, None)
            if group is not None:
                self._retired.append(group)
            self.attempts[key] = self.attempts.get(key, 0) + 1


def group_key(epoch: int, members: list[tuple[int, int]]) -> str:
    """The name all members give one membership's group: the epoch, then every member's
    rank and incarnation, in rank order."""
    return f"{epoch}/" + ",".join(f"{rank}.{inc}" for rank, inc in sorted(members))
