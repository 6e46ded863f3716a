"""FedAvg (McMahan et al., AISTATS 2017): synchronous rounds, weighted by sample count.

Each round the server samples `clients.concurrency` checked-in clients, sends them the
global model and waits for their uploads (or their departure, or the task timeout);
the new global model is the sample-count-weighted mean of the returned models.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "synchronous rounds, sampled clients, models averaged by sample count"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    select_wait_s: float = Field(
        5.0,
        ge=0,
        description="With fewer checked-in clients than clients.concurrency, wait this "
        "long for more before starting the round with those there are.",
    )


def weighted_average(models: list[torch.Tensor], samples: list[int]) -> torch.Tensor:
    """sum_i n_i w_i / sum_i n_i."""
    total = sum(samples)
    out = torch.zeros_like(models[0])
    for w, n in zip(models, samples, strict=True):
        out.add_(w, alpha=n / total)
    return out


class FedAvg(Algorithm):
    name = "fedavg"
    synchronous = True
    options: Options

    def aggregate_round(self, state: ServerState, updates: list[Update]) -> None:
        # A round in which every client vanished leaves the model (and version) as it was.
        if not updates:
            return
        new = weighted_average([u.weights for u in updates], [u.samples for u in updates])
        state.model.copy_(new)
        state.version += 1
