"""FADAS (Wang et al., ICML 2024, "FADAS: towards federated adaptive asynchronous
optimization"): buffered deltas applied by an AMSGrad server optimizer whose learning rate
adapts to the delay.

Uploads are deltas d_i = w_i - w_o. When M are buffered (`k`), with delta = their mean:

    m     = beta1 m + (1 - beta1) delta
    v     = beta2 v + (1 - beta2) delta^2
    v_hat = max(v_hat, v)
    eta_t = min(eta, 1 / tau_max)  if tau_max > tau_c  else eta      (delay-adaptive)
    w    <- w + eta_t m / (sqrt(v_hat) + eps)

tau_max is the largest delay in the buffer, in versions (global steps) since the
client's start. Constants: beta1 = 0.9, beta2 = 0.99, eps = 1e-8 (the adaptive-FL
defaults the paper uses); eta (`server_lr`), M (`k`) and the threshold tau_c tuned.
`delay_adaptive: false` gives plain buffered AMSGrad (FedBuff with an AMSGrad server).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "asynchronous, buffered deltas applied by AMSGrad with a delay-adaptive server lr"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(5, ge=1, description="Buffer size M: deltas per global step.")
    server_lr: float = Field(0.01, gt=0, description="Server learning rate eta.")
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="Second-moment decay.")
    eps: float = Field(1e-8, gt=0, description="Added to sqrt(v_hat).")
    delay_adaptive: bool = Field(True, description="Shrink eta when the buffer holds old deltas.")
    tau_c: int = Field(5, ge=0, description="Delay threshold (versions) of the adaptive lr.")
    tau: int | None = Field(None, ge=0, description="Drop deltas older than this many versions.")


def delay_adaptive_lr(eta: float, tau_max: int, tau_c: int) -> float:
    """min(eta, 1 / tau_max) when tau_max > tau_c, else eta."""
    if tau_max > tau_c:
        return min(eta, 1.0 / tau_max)
    return eta


def amsgrad_step(
    m: torch.Tensor,
    v: torch.Tensor,
    v_hat: torch.Tensor,
    delta: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Update m, v, v_hat in place; return the direction m / (sqrt(v_hat) + eps)."""
    m.mul_(beta1).add_(delta, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(delta, delta, value=1 - beta2)
    torch.maximum(v_hat, v, out=v_hat)
    return m / (v_hat.sqrt() + eps)


class FADAS(Algorithm):
    name = "fadas"
    options: Options

    def __init__(self, options: Options, num_clients: int) -> None:
        super().__init__(options, num_clients)
        self.moments: dict[str, torch.Tensor] = {}  # buffer, m, v, v_hat
        self.count = 0
        self.tau_max = 0
        self.last_lr = options.server_lr

    def merge(self, state: ServerState, update: Update) -> str:
        o = self.options
        elapsed = state.version - update.version
        if o.tau is not None and elapsed > o.tau:
            return "stale"
        if not self.moments:
            self.moments = {k: torch.zeros_like(state.model) for k in ("buffer", "m", "v", "v_hat")}
        self.moments["buffer"].add_(update.delta)
        self.tau_max = max(self.tau_max, elapsed)
        self.count += 1
        if self.count < o.k:
            return "buffered"
        mt = self.moments
        direction = amsgrad_step(
            mt["m"], mt["v"], mt["v_hat"], mt["buffer"] / self.count, o.beta1, o.beta2, o.eps
        )
        lr = (
            delay_adaptive_lr(o.server_lr, self.tau_max, o.tau_c)
            if o.delay_adaptive
            else o.server_lr
        )
        state.model.add_(direction, alpha=lr)
        state.version += 1
        self.last_lr = lr
        mt["buffer"].zero_()
        self.count = 0
        self.tau_max = 0
        return "merged"

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.moments:
            return {}
        counters = torch.tensor([self.count, self.tau_max], dtype=torch.int64)
        return {**self.moments, "counters": counters}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "buffer" not in tensors:
            return
        self.moments = {k: tensors[k].clone() for k in ("buffer", "m", "v", "v_hat")}
        self.count, self.tau_max = (int(x) for x in tensors["counters"])

    def stats(self) -> dict[str, float]:
        return {"last_server_lr": self.last_lr}
