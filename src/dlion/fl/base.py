"""What every FL algorithm shares: the server state, a screened client update, the base class.

An algorithm is one file with one `Algorithm` subclass. The server and client behaviours
(fl/roles.py) are written once and call the algorithm's hooks: `merge` for each upload
(asynchronous algorithms) or `aggregate_round` for a round's uploads (synchronous ones),
and, on the device, `pull_step` / `device_beta` for an algorithm that merges the fresh
global model into a local model mid-training (FedASMU). `task_meta` may set "steps" to
choose a task's number of local steps (FedCompass, FedPace); `task_lost` tells an
algorithm that a task ended without an upload (the client left or timed out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel


@dataclass
class ServerState:
    """The global model and its version. Version 0 is the initial model; every change of
    the global model (one merge, one buffer flush, one round) makes the next version."""

    model: torch.Tensor  # flat parameters, updated in place
    version: int = 0
    # Loss of the global model on the server's proxy set; set by the engine (no virtual time).
    probe_loss: Callable[[], float] = field(default=lambda: float("nan"), repr=False)


@dataclass(frozen=True)
class Update:
    """One client upload that passed the server's screening."""

    client: int  # rank of the client
    version: int  # o: the global version the client started from (the server's record)
    delta: torch.Tensor  # w_i - w_o (clipped if the norm screen says so)
    weights: torch.Tensor  # w_i = w_o + delta
    samples: int  # local training samples, for sample-weighted averaging
    meta: dict[str, float]  # what the client reported (loss, steps, train_s, pulled)
    # Server clock from sending the task to receiving the upload (download + training +
    # upload), measured by the server; 0 where unknown.
    elapsed: float = 0.0


class AggregationModeError(RuntimeError):
    """The server called the aggregation hook of the other mode (round-based vs one upload
    at a time): a bug in the server loop, never a user error."""


class Algorithm:
    """Server-side rule plus the device-side hooks. Defaults: no mid-training pull."""

    name: ClassVar[str]
    synchronous: ClassVar[bool] = False
    # Device pull: False mixes the fresh model into the local one (FedASMU); True moves
    # the task's start point along with it, so the upload stays the local progress only.
    rebase_on_pull: bool = False
    # Clients add their step counts and training time to uploads (and the time left to a
    # pull): extra meta bytes on the wire, so only for algorithms that read them.
    reports_timing: ClassVar[bool] = False

    def __init__(self, options: BaseModel, num_clients: int) -> None:
        self.options = options
        self.num_clients = num_clients
        # Set by build_algorithm (clients.concurrency) and by the server (its clock).
        self.concurrency = 1
        self.clock: Callable[[], float] = lambda: 0.0

    # ---------------------------------------------------------------- server side
    def merge(self, state: ServerState, update: Update) -> str:
        """Fold one upload into the global model (asynchronous algorithms). Returns what
        happened: "merged", "buffered" or "stale" (dropped)."""
        raise AggregationModeError(f"{self.name} aggregates whole rounds, not single uploads")

    def aggregate_round(self, state: ServerState, updates: list[Update]) -> None:
        """Combine one round's uploads (synchronous algorithms)."""
        raise AggregationModeError(f"{self.name} merges uploads one by one")

    def task_meta(self, client: int) -> dict[str, float]:
        """Numbers sent with a task to client `client` (rank), e.g. its device parameters;
        "steps" sets the task's number of local steps."""
        return {}

    def task_lost(self, client: int) -> None:
        """The task of `client` ended without an upload (departure, timeout)."""
        return

    def answer_pull(
        self, state: ServerState, client: int, version: int, meta: dict[str, float]
    ) -> bool:
        """Whether to answer a mid-task pull of `client` (task from `version`) with the
        fresh model; `meta` is what the device sent with its pull."""
        return state.version - version >= self.pull_min_advance()

    # ---------------------------------------------------------------- device side
    def pull_step(self, meta: dict[str, float], steps: int) -> int | None:
        """Local step before which the device pulls the fresh global model, or None."""
        return None

    def pull_min_advance(self) -> int:
        """A pull is answered with the model only when the server is this many versions on."""
        return 1

    def device_beta(self, meta: dict[str, float], fresh_version: int, version: int) -> float:
        """Weight of the fresh global model when the device merges it into its local one."""
        return 0.0

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Algorithm state to checkpoint (per-device parameters, buffers)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what state_tensors() saved (already checked against the config)."""
        return

    def stats(self) -> dict[str, Any]:
        """Algorithm-specific numbers for the run summary."""
        return {}
