"""What every real-process job shares: the job's store, membership with a shared secret,
pair rendezvous, and the processes a launcher starts and reaps.

Used by the dist engine (engines/dist.py, engines/launcher.py, worker.py) and by FL on
real processes (fl/processes.py); it imports neither.

- The store: a torch.distributed TCPStore (hosted by a launcher, by torchrun's agent, or
  by the FL server) holds everything that is not training traffic. A job's keys live
  under its own prefix (`job_store`); `Keys` is the layout.
- Membership: a process registers a record (pid, host, a fresh nonce, and, when a shared
  secret is set, the HMAC-SHA256 of "run:rank:nonce" under it: the secret never travels);
  one coordinator (the launcher, torchrun's rank 0, the FL server) decides `admitted` or
  `refused` (with the reason), and the process waits for that word before it touches a
  peer. `claim_rank` registers atomically, so two processes cannot take one rank.
- Pairs: each pair of ranks forms its own two-rank group, named by both sides alike
  (`pair_label`); `connect_all` forms several in parallel and reports the failures.
- Processes: `Fault` (a signal at a time, for tests and benchmarks), `reap`, and the
  words for an exit status (`exit_text`, `last_line`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dlion.core.errors import BadInput

if TYPE_CHECKING:
    import torch.distributed as dist

SECRET_ENV = "DLION_SECRET"


class Keys:
    """Store keys of one job (all under the job's prefix). `inc` is a rank's incarnation:
    0 for a process present from the start, then 1, 2, ... for each (re)join."""

    T0 = "t0"  # wall-clock start (time.time()) shared by every process
    GO = "go"
    STOP = "stop"

    @staticmethod
    def member(rank: int) -> str:
        return f"member/{rank}"

    @staticmethod
    def absent(rank: int) -> str:
        return f"absent/{rank}"

    @staticmethod
    def admitted(rank: int, inc: int) -> str:
        return f"admitted/{rank}.{inc}"

    @staticmethod
    def refused(rank: int, inc: int) -> str:
        return f"refused/{rank}.{inc}"

    @staticmethod
    def ready(rank: int) -> str:
        return f"ready/{rank}"

    @staticmethod
    def heartbeat(rank: int) -> str:
        return f"hb/{rank}"

    @staticmethod
    def left(rank: int, inc: int) -> str:
        return f"left/{rank}.{inc}"

    @staticmethod
    def join(rank: int) -> str:
        return f"join/{rank}"

    @staticmethod
    def since(rank: int, inc: int) -> str:
        return f"since/{rank}.{inc}"

    @staticmethod
    def acked(rank: int, inc: int, by: int) -> str:
        return f"acked/{rank}.{inc}/{by}"

    @staticmethod
    def detected(peer: int, inc: int, by: int) -> str:
        return f"detected/{peer}.{inc}/{by}"

    @staticmethod
    def snapshot(k: int, rank: int) -> str:
        return f"snap/{k}/{rank}"

    @staticmethod
    def final(rank: int, inc: int) -> str:
        return f"final/{rank}.{inc}"


# ----------------------------------------------------------------------------- the store


def job_store(store: dist.Store, run_id: str) -> dist.Store:
    """The job's keys live under their own prefix, so a shared store (torchrun's) stays tidy."""
    import torch.distributed as dist

    return dist.PrefixStore(f"dlion/{run_id}/", store)


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Host a store on host:port (0: any free port; `.port` tells which)."""
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        port,
        None,
        True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


StoreFactory = Callable[[], "dist.Store"]


def store_factory(host: str, port: int, run_id: str, timeout_s: float) -> StoreFactory:
    """A maker of clients of the job `run_id`'s store on host:port (one per thread)."""

    def factory() -> dist.Store:
        return job_store(store_client(host, port, timeout_s), run_id)

    return factory


def launched_job(timeout_s: float) -> tuple[StoreFactory, str] | None:
    """The store a launcher started this process with (DLION_STORE=HOST:PORT and
    DLION_RUN_ID in the environment): (a factory of its clients, run id); None: none."""
    if "DLION_STORE" not in os.environ:
        return None
    host, port = parse_address(os.environ["DLION_STORE"], "DLION_STORE")
    run_id = os.environ.get("DLION_RUN_ID", "")
    if not run_id:
        raise BadInput("DLION_RUN_ID must be set with DLION_STORE")
    return store_factory(host, port, run_id, timeout_s), run_id


def store_timeout(value: float) -> datetime.timedelta:
    """A store timeout."""
    return datetime.timedelta(seconds=value)


def store_get_json(store: dist.Store, key: str) -> dict[str, Any]:
    return json.loads(store.get(key).decode())


def store_has(store: dist.Store, key: str) -> bool:
    return bool(store.check([key]))


def heartbeat_stale(
    beat: dict[str, Any] | None, incarnation: int, now: float, timeout: float
) -> bool:
    """Is a peer of `incarnation` silent for more than `timeout` s, by its heartbeat record
    `beat` (None: none yet) at wall time `now`? A record of an earlier incarnation counts
    as none: a worker that rejoins shares its rank's key with its previous life, whose
    last beat (the crash) is already old when the members link the new one, before its
    own first beat; reading it dropped the joiner at some members only, so the members
    disagreed on who takes part from its admission on (a dist job stalled there)."""
    if beat is None or int(beat.get("incarnation", 0)) < incarnation:
        return False
    return now - float(beat["wall"]) > timeout


def parse_address(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); BadInput naming `option` otherwise."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"{option} {text!r}: expected HOST:PORT (port 1-65535)")
    return host.strip("[]"), int(port)


# ----------------------------------------------------------------------------- membership


def shared_secret(configured: str | None) -> str | None:
    """The job's shared secret: DLION_SECRET wins over the config's; None: none set."""
    return os.environ.get(SECRET_ENV) or configured


def membership_proof(secret: str | None, run_id: str, rank: int, nonce: str) -> str:
    """HMAC of (run, rank, nonce) under the shared secret; the secret never travels."""
    if secret is None:
        return ""
    text = f"{run_id}:{rank}:{nonce}".encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def check_membership(secret: str | None, run_id: str, rank: int, record: dict[str, Any]) -> bool:
    if secret is None:
        return True
    claimed = str(record.get("proof", ""))
    expected = membership_proof(secret, run_id, rank, str(record.get("nonce", "")))
    return hmac.compare_digest(claimed, expected)


def refusal_reason(secret: str | None, run_id: str, rank: int, record: dict[str, Any]) -> str:
    """Why a record is refused ('' if it is not): no proof at all, or a wrong one."""
    if check_membership(secret, run_id, rank, record):
        return ""
    if not record.get("proof"):
        return "no shared secret given, and the job requires one"
    return "shared secret mismatch"


def member_record(secret: str | None, run_id: str, rank: int, incarnation: int) -> dict[str, Any]:
    """What a process registers: who it is and, with a secret, its proof."""
    nonce = secrets.token_hex(16)
    return {
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "nonce": nonce,
        "proof": membership_proof(secret, run_id, rank, nonce),
        "incarnation": incarnation,
    }


def register(store: dist.Store, record: dict[str, Any], rank: int) -> None:
    store.set(Keys.member(rank), json.dumps(record))


def claim_rank(
    store: dist.Store, make_record: Callable[[int], dict[str, Any]], rank: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Register as `rank` unless a live process holds it: (this process's record, None),
    or (nothing registered, the holder's record). A holder that was refused or has left
    (Keys.refused/left of its incarnation) gives way: the newcomer registers atomically
    over it as the next incarnation."""
    expected, inc = "", 0
    while True:
        record = make_record(inc)
        mine = json.dumps(record)
        held = store.compare_set(Keys.member(rank), expected, mine)
        text = held.decode() if isinstance(held, bytes) else str(held)
        if text == mine:
            return record, None
        holder = json.loads(text)
        held_inc = int(holder.get("incarnation", 0))
        gone = store_has(store, Keys.refused(rank, held_inc)) or store_has(
            store, Keys.left(rank, held_inc)
        )
        if not gone:
            return {}, holder
        expected, inc = text, held_inc + 1


def undecided(
    store: dist.Store, ranks: Iterable[int], decided: set[tuple[int, int]]
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """The coordinator's new registrations among `ranks`: (rank, incarnation, record) for
    each not in `decided` yet, which it is added to."""
    for r in ranks:
        if not store_has(store, Keys.member(r)):
            continue
        record = store_get_json(store, Keys.member(r))
        inc = int(record.get("incarnation", 0))
        if (r, inc) not in decided:
            decided.add((r, inc))
            yield r, inc, record


def decide(
    store: dist.Store, secret: str | None, run_id: str, rank: int, record: dict[str, Any]
) -> str:
    """The coordinator's decision on `rank`'s registered `record`: sets admitted/refused
    for its incarnation and returns '' (admitted) or the reason (refused)."""
    inc = int(record.get("incarnation", 0))
    why = refusal_reason(secret, run_id, rank, record)
    if why:
        store.set(Keys.refused(rank, inc), why)
    else:
        store.set(Keys.admitted(rank, inc), "1")
    return why


def wait_decision(
    store: dist.Store, rank: int, inc: int, timeout_s: float, *, absent_counts: bool = True
) -> tuple[str, str]:
    """The coordinator's word on `rank`: ("admitted" | "refused" | "absent" | "missing",
    reason). "absent": the coordinator started without it (incarnation 0 only)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if store_has(store, Keys.admitted(rank, inc)):
            return "admitted", ""
        if store_has(store, Keys.refused(rank, inc)):
            return "refused", store.get(Keys.refused(rank, inc)).decode()
        if absent_counts and inc == 0 and store_has(store, Keys.absent(rank)):
            return "absent", ""
        time.sleep(0.02)
    return "missing", f"no decision within {timeout_s:g} s"


# ----------------------------------------------------------------------------- pairs


def pair_label(rank_a: int, inc_a: int, rank_b: int, inc_b: int) -> str:
    """Both sides of a pair name its rendezvous the same way: incarnations in rank order."""
    return f"{inc_a}-{inc_b}" if rank_a < rank_b else f"{inc_b}-{inc_a}"


class _Connects(Protocol):
    def connect(self, peer: int, incarnation: str) -> None: ...


def connect_all(
    transport: _Connects, labels: Mapping[int, str], timeout_s: float
) -> dict[int, str]:
    """Form the pair groups with every peer in `labels` (peer -> pair label) in parallel;
    returns {peer: error} for those that failed or did not meet within `timeout_s`."""
    errors: dict[int, str] = {}

    def connect(peer: int) -> None:
        try:
            transport.connect(peer, incarnation=labels[peer])
        except Exception as err:  # recorded; the peer counts as gone
            errors[peer] = first_line(err)

    threads = {p: threading.Thread(target=connect, args=(p,), daemon=True) for p in labels}
    for t in threads.values():
        t.start()
    deadline = time.time() + timeout_s
    for p, t in threads.items():
        t.join(max(0.0, deadline - time.time()))
        if t.is_alive():  # the peer died before its side of the rendezvous
            errors[p] = f"no rendezvous within {timeout_s:g} s"
    return errors


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


async def cancel_others(rounds: int = 100) -> None:
    """Cancel every other task of the running loop and wait for them to end. A task that
    swallowed its cancellation (asyncio.wait_for does when its inner future completes in
    the same step) is cancelled again, every 0.1 s, `rounds` times at most."""
    seen: set[asyncio.Task[Any]] = set()
    for _ in range(rounds):
        me = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not leftovers:
            break
        seen.update(leftovers)
        for t in leftovers:
            t.cancel()
        await asyncio.wait(leftovers, timeout=0.1)
    for t in seen:  # retrieved, so that none is reported as never retrieved
        if t.done() and not t.cancelled():
            t.exception()


def call_from_thread(
    loop: asyncio.AbstractEventLoop | None, fn: Callable[..., object], *args: object
) -> None:
    """Run fn(*args) on `loop` soon; nothing if the loop is gone (the run is over)."""
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to do
            loop.call_soon_threadsafe(fn, *args)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Fault:
    """At scenario time `at`: KILL (a crash: SIGKILL), TERM (a clean leave: SIGTERM) or
    JOIN (start a new incarnation of worker `rank`, which joins the running job)."""

    rank: int
    at: float
    signal: Literal["KILL", "TERM", "JOIN"] = "KILL"

    @property
    def signum(self) -> int:
        return signal.SIGKILL if self.signal == "KILL" else signal.SIGTERM


class _Process(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def reap(processes: Iterable[_Process], grace_s: float = 10.0) -> None:
    """Wait for processes to exit (after the stop flag); kill any that do not in time."""
    deadline = time.time() + grace_s
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_text(code: int) -> str:
    """A process's exit status in words: `exit code 2`, `killed by SIGKILL`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def last_line(path: Path) -> str:
    """The last non-empty line of a process's log ('' if none): usually its error."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")
