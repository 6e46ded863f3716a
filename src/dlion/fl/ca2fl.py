"""CA2FL (Wang et al., ICLR 2024, "Tackling the data heterogeneity in asynchronous federated
learning with cached update calibration"): buffered aggregation corrected by each client's
cached latest update.

The server keeps h_i, the latest delta of client i (zero until it uploads), and their mean
over all N clients h = (1/N) sum_i h_i (the paper's Algorithm 1). Uploads are deltas
d_i = w_i - w_o. For each upload it adds the calibration d_i - h_i to a buffer (h_i as it
was when this global step began); when M deltas are buffered it applies

    v = h + (1/M) * sum_{j in buffer} (d_j - h_j),      w <- w + eta * v

then refreshes the cache with the buffered deltas (h_j <- d_j, the latest one if a client
sent two) and bumps the version once. Constants: M (`k`) and eta (`server_lr`) are
tuned (the paper's runs use a global learning rate and a buffer of the same kind as
FedBuff's); no staleness weight (the calibration is the paper's answer to staleness under
heterogeneous data). `tau` optionally drops deltas older than tau versions.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "asynchronous, buffered deltas calibrated by each client's cached latest update"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(5, ge=1, description="Buffer size M: deltas per global step.")
    server_lr: float = Field(1.0, gt=0, description="Global learning rate eta on v.")
    tau: int | None = Field(None, ge=0, description="Drop deltas older than this many versions.")


def calibrated_step(
    cache_mean: torch.Tensor, calibration_sum: torch.Tensor, m: int
) -> torch.Tensor:
    """v = h + (1/M) sum_j (d_j - h_j)."""
    return cache_mean + calibration_sum / m


class CA2FL(Algorithm):
    name = "ca2fl"
    options: Options

    def __init__(self, options: Options, num_clients: int) -> None:
        super().__init__(options, num_clients)
        self.cache: dict[int, torch.Tensor] = {}  # client -> h_i (absent: zero)
        self.cache_sum: torch.Tensor | None = None  # sum_i h_i
        self.buffer: torch.Tensor | None = None  # sum over the buffer of d_j - h_j
        self.pending: dict[int, torch.Tensor] = {}  # the buffer's latest delta per client
        self.count = 0

    def merge(self, state: ServerState, update: Update) -> str:
        elapsed = state.version - update.version
        if self.options.tau is not None and elapsed > self.options.tau:
            return "stale"
        if self.buffer is None or self.cache_sum is None:
            self.buffer = torch.zeros_like(state.model)
            self.cache_sum = torch.zeros_like(state.model)
        i = update.client
        self.buffer.add_(update.delta)
        if i in self.cache:
            self.buffer.sub_(self.cache[i])
        self.pending[i] = update.delta.clone()
        self.count += 1
        if self.count < self.options.k:
            return "buffered"
        v = calibrated_step(self.cache_sum / self.num_clients, self.buffer, self.count)
        state.model.add_(v, alpha=self.options.server_lr)
        state.version += 1
        for j in sorted(self.pending):
            d = self.pending[j]
            old = self.cache.get(j)
            self.cache_sum.add_(d if old is None else d - old)
            self.cache[j] = d
        self.pending.clear()
        self.buffer.zero_()
        self.count = 0
        return "merged"

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.buffer is None or self.cache_sum is None:
            return {}
        out = {
            "buffer": self.buffer,
            "count": torch.tensor([self.count], dtype=torch.int64),
            "cache_ids": torch.tensor(sorted(self.cache), dtype=torch.int64),
            "pending_ids": torch.tensor(sorted(self.pending), dtype=torch.int64),
        }
        if self.cache:
            out["cache"] = torch.stack([self.cache[j] for j in sorted(self.cache)])
        if self.pending:
            out["pending"] = torch.stack([self.pending[j] for j in sorted(self.pending)])
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "buffer" not in tensors:
            return
        self.buffer = tensors["buffer"].clone()
        self.count = int(tensors["count"][0])
        ids = [int(j) for j in tensors["cache_ids"]]
        self.cache = {j: tensors["cache"][n].clone() for n, j in enumerate(ids)}
        pids = [int(j) for j in tensors["pending_ids"]]
        self.pending = {j: tensors["pending"][n].clone() for n, j in enumerate(pids)}
        self.cache_sum = torch.zeros_like(self.buffer)
        for h in self.cache.values():
            self.cache_sum.add_(h)

    def stats(self) -> dict[str, float]:
        return {"cached_clients": float(len(self.cache))}
