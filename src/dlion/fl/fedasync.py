"""FedAsync (Xie et al., 2019): merge every upload at once, weight decayed by staleness.

    w_t = (1 - a_t) w_{t-1} + a_t w_i,   a_t = a * (t - o + 1) ** -p   (polynomial)

where the upload was trained from version o and produces version t (t - o >= 1).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "asynchronous, every upload merged with polynomial staleness weight a(t-o+1)^-p"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(0.5, gt=0, le=1, description="Mixing weight of a fresh upload.")
    p: float = Field(0.5, ge=0, description="Polynomial staleness exponent.")
    tau: int | None = Field(None, ge=1, description="Drop uploads with t - o > tau.")


def staleness_weight(a: float, p: float, t: int, o: int) -> float:
    """a * (t - o + 1) ** -p."""
    return a * (t - o + 1) ** -p


class FedAsync(Algorithm):
    name = "fedasync"
    options: Options

    def merge(self, state: ServerState, update: Update) -> str:
        t = state.version + 1
        if self.options.tau is not None and t - update.version > self.options.tau:
            return "stale"
        a_t = staleness_weight(self.options.a, self.options.p, t, update.version)
        state.model.mul_(1 - a_t).add_(update.weights, alpha=a_t)
        state.version = t
        return "merged"
