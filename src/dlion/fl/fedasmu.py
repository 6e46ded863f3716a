"""FedASMU (Liu et al., AAAI 2024): asynchronous staleness-aware model update.

Server, dynamic staleness-aware aggregation. Upload w_i from device i, trained from
version o, producing version t (t - o >= 1):
    w_t = (1 - alpha) w_{t-1} + alpha w_i,   alpha = mu*xi / (1 + mu*xi)
    xi  = lambda_i / (sqrt(t) * (t - o + 1) ** sigma_i) + iota_i
and uploads with t - o > tau are dropped.

Device, adaptive local model adjustment. Before local step `pull_fraction * steps` the
device asks for the global model; if the server is at least `pull_min_advance` versions
past o it sends w_{t'} and the device merges
    w <- (1 - beta) w + beta w_{t'},   beta = mu*phi / (1 + mu*phi)
    phi = (gamma_i / sqrt(t')) * (1 - nu_i / sqrt(t' - o + 1))
with beta clamped to [0, 1) (phi <= 0: no merge).

Adaptation (spec: the paper learns lambda, sigma, iota, gamma, nu by gradient; we adapt
them from the observed loss change of each merge). After merging device i's upload the
server measures the relative change r of its proxy-set loss. r is normalized by a
running mean of |r| (so the step does not depend on the loss scale) and clipped to
[-3, 3]; then, with step eta:
    lambda_i *= exp(-eta r),  iota_i *= exp(-eta r),  sigma_i += eta r
(a merge that lowered the loss gives the device more weight and forgives its staleness
more), and, if the device pulled mid-training,
    gamma_i *= exp(-eta r),   nu_i *= exp(eta r)
(a pull that led to a helpful update makes the device pull harder). Every parameter is
clamped to its configured bounds. Device parameters live on the server (the device holds
nothing between tasks) and travel with each task.

Ablations: `server: false` replaces the dynamic aggregation by FedAsync's static
polynomial weight a (t - o + 1) ** -p with no adaptation (`fedasmu-noserver`);
`device: false` turns the mid-training pull off (`fedasmu-nodevice`).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update
from dlion.fl.fedasync import staleness_weight

SUMMARY = "asynchronous, adaptive staleness-aware merge + device-side pull of the fresh model"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: bool = Field(True, description="Dynamic staleness-aware aggregation (else static).")
    device: bool = Field(True, description="Adaptive local model adjustment (mid-task pull).")
    mu: float = Field(2.0, gt=0, description="Scale inside alpha and beta (pilot-tuned).")
    tau: int = Field(50, ge=1, description="Drop uploads with staleness t - o > tau.")
    lambda0: float = Field(
        10.0,
        gt=0,
        description="Initial lambda_i. Large because t counts every merge: with 1/sqrt(t) at "
        "t ~ 1000, lambda ~ 1 would leave only iota in xi (pilot runs, seed 100).",
    )
    sigma0: float = Field(0.5, ge=0, description="Initial sigma_i (staleness exponent).")
    iota0: float = Field(0.1, gt=0, description="Initial iota_i (weight floor).")
    gamma0: float = Field(
        20.0, gt=0, description="Initial gamma_i (pull strength; / sqrt(t') as for lambda)."
    )
    nu0: float = Field(0.5, gt=0, description="Initial nu_i.")
    adapt: bool = Field(True, description="Adapt the per-device parameters online.")
    eta: float = Field(0.05, ge=0, description="Adaptation step.")
    ema: float = Field(0.9, ge=0, lt=1, description="Decay of the running mean of |r|.")
    lambda_bounds: tuple[float, float] = (0.05, 20.0)
    sigma_bounds: tuple[float, float] = (0.0, 3.0)
    iota_bounds: tuple[float, float] = (0.001, 0.5)
    gamma_bounds: tuple[float, float] = (0.1, 50.0)
    nu_bounds: tuple[float, float] = (0.01, 1.0)
    pull_fraction: float = Field(
        0.5, gt=0, lt=1, description="(spec) Pull before this fraction of the local steps."
    )
    pull_min_advance: int = Field(
        1, ge=1, description="(spec) Merge only if the server moved this many versions on."
    )
    static_a: float = Field(0.5, gt=0, le=1, description="server=false: FedAsync's a.")
    static_p: float = Field(0.5, ge=0, description="server=false: FedAsync's p.")


def xi(lam: float, sigma: float, iota: float, t: int, o: int) -> float:
    return lam / (math.sqrt(t) * (t - o + 1) ** sigma) + iota


def alpha(mu: float, xi_value: float) -> float:
    return mu * xi_value / (1 + mu * xi_value)


def phi(gamma: float, nu: float, t_fresh: int, o: int) -> float:
    return (gamma / math.sqrt(t_fresh)) * (1 - nu / math.sqrt(t_fresh - o + 1))


def beta(mu: float, phi_value: float) -> float:
    """mu*phi / (1 + mu*phi), clamped to [0, 1): a negative phi means no merge."""
    if phi_value <= 0:
        return 0.0
    return mu * phi_value / (1 + mu * phi_value)


def _clamp(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


class FedASMU(Algorithm):
    name = "fedasmu"
    options: Options

    def __init__(self, options: Options, num_clients: int) -> None:
        super().__init__(options, num_clients)
        o = options
        # Index = client rank (rank 0, the server, is unused); float64 so the adaptation's
        # small multiplicative steps do not round away.
        n = num_clients + 1
        self.params = {
            "lambda": torch.full((n,), o.lambda0, dtype=torch.float64),
            "sigma": torch.full((n,), o.sigma0, dtype=torch.float64),
            "iota": torch.full((n,), o.iota0, dtype=torch.float64),
            "gamma": torch.full((n,), o.gamma0, dtype=torch.float64),
            "nu": torch.full((n,), o.nu0, dtype=torch.float64),
        }
        self.abs_r = torch.zeros(1, dtype=torch.float64)  # running mean of |r|

    # ---------------------------------------------------------------- server side
    def merge(self, state: ServerState, update: Update) -> str:
        o = self.options
        t = state.version + 1
        if t - update.version > o.tau:
            return "stale"
        i = update.client
        if o.server:
            p = self.params
            x = xi(
                float(p["lambda"][i]), float(p["sigma"][i]), float(p["iota"][i]), t, update.version
            )
            a = alpha(o.mu, x)
        else:
            a = staleness_weight(o.static_a, o.static_p, t, update.version)
        adapting = o.server and o.adapt and o.eta > 0
        before = state.probe_loss() if adapting else 0.0
        state.model.mul_(1 - a).add_(update.weights, alpha=a)
        state.version = t
        if adapting:
            self._adapt(i, before, state.probe_loss(), bool(update.meta.get("pulled", 0.0)))
        return "merged"

    def _adapt(self, i: int, before: float, after: float, pulled: bool) -> None:
        o = self.options
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return
        r = (after - before) / before
        scale = float(self.abs_r[0])
        self.abs_r[0] = o.ema * scale + (1 - o.ema) * abs(r) if scale > 0 else abs(r)
        if self.abs_r[0] <= 0:
            return
        g = max(-3.0, min(3.0, r / float(self.abs_r[0])))
        p = self.params
        p["lambda"][i] = _clamp(float(p["lambda"][i]) * math.exp(-o.eta * g), o.lambda_bounds)
        p["iota"][i] = _clamp(float(p["iota"][i]) * math.exp(-o.eta * g), o.iota_bounds)
        p["sigma"][i] = _clamp(float(p["sigma"][i]) + o.eta * g, o.sigma_bounds)
        if pulled and o.device:
            p["gamma"][i] = _clamp(float(p["gamma"][i]) * math.exp(-o.eta * g), o.gamma_bounds)
            p["nu"][i] = _clamp(float(p["nu"][i]) * math.exp(o.eta * g), o.nu_bounds)

    def task_meta(self, client: int) -> dict[str, float]:
        if not self.options.device:
            return {}
        return {
            "gamma": float(self.params["gamma"][client]),
            "nu": float(self.params["nu"][client]),
        }

    # ---------------------------------------------------------------- device side
    def pull_step(self, meta: dict[str, float], steps: int) -> int | None:
        if not self.options.device or steps < 2:
            return None
        return max(1, min(steps - 1, round(self.options.pull_fraction * steps)))

    def pull_min_advance(self) -> int:
        return self.options.pull_min_advance

    def device_beta(self, meta: dict[str, float], fresh_version: int, version: int) -> float:
        if fresh_version - version < 1:
            return 0.0  # nothing new since the task started
        return beta(self.options.mu, phi(meta["gamma"], meta["nu"], fresh_version, version))

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"param.{k}": v for k, v in self.params.items()}, "abs_r": self.abs_r}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.params:
            self.params[k] = tensors[f"param.{k}"].clone()
        self.abs_r = tensors["abs_r"].clone()

    def stats(self) -> dict[str, float]:
        p = self.params
        return {f"mean_{k}": float(v[1:].mean()) for k, v in p.items()}
