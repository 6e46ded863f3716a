"""FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation.

Uploads are model deltas d_i = w_i - w_o. The server adds s(t - o) * d_i to a buffer,
s(k) = (1 + k) ** -p with k the versions elapsed since the client's start; when K deltas
are buffered it applies  w <- w + server_lr * (buffer / K)  (the paper's rule: the sum of
weighted deltas over K), clears the buffer and bumps the version once.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "asynchronous, K staleness-weighted deltas buffered then applied with a server lr"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(5, ge=1, description="Buffer size K: deltas per global step.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate on the mean delta.")
    p: float = Field(0.5, ge=0, description="Staleness weight s(k) = (1 + k) ** -p.")
    tau: int | None = Field(None, ge=0, description="Drop deltas older than this many versions.")


def staleness_weight(p: float, elapsed: int) -> float:
    """(1 + elapsed) ** -p, elapsed = versions since the client started (0 = fresh)."""
    return (1 + elapsed) ** -p


class FedBuff(Algorithm):
    name = "fedbuff"
    options: Options

    def __init__(self, options: Options, num_clients: int) -> None:
        super().__init__(options, num_clients)
        self.buffer: torch.Tensor | None = None
        self.count = 0

    def merge(self, state: ServerState, update: Update) -> str:
        elapsed = state.version - update.version
        if self.options.tau is not None and elapsed > self.options.tau:
            return "stale"
        if self.buffer is None:
            self.buffer = torch.zeros_like(state.model)
        self.buffer.add_(update.delta, alpha=staleness_weight(self.options.p, elapsed))
        self.count += 1
        if self.count < self.options.k:
            return "buffered"
        state.model.add_(self.buffer, alpha=self.options.server_lr / self.options.k)
        state.version += 1
        self.buffer.zero_()
        self.count = 0
        return "merged"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.buffer is None:
            return {}
        return {"buffer": self.buffer, "count": torch.tensor([self.count], dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "buffer" in tensors:
            self.buffer = tensors["buffer"].clone()
            self.count = int(tensors["count"][0])
