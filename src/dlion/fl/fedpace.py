"""FedPace: dlion's own asynchronous FL method, built from what the FedASMU runs showed
(RESULTS.md section 7, issue 20). Four techniques, each with a switch and an ablation:

1. Staleness-aware dynamic weights on deltas (`delta_merge`). Upload i (delta d_i =
   w_i - w_start) gets the weight a_i = lambda_i * (1 + s_i) ** -sigma. K weighted
   deltas are buffered, then w <- w + server_lr * (1/K) sum_i a_i d_i. Adding deltas
   never drags the global model back toward the client's stale start, which FedASMU's
   model mixing w <- (1 - a) w + a w_i does: `delta_merge: false` buffers
   a_i (w_i - w) instead (the pull-back included). lambda_i is per device, adapted from
   the proxy-loss change of each buffer flush as FedASMU adapts its lambda (r = relative
   loss change, normalized by its running mean |r|, clipped to [-3, 3];
   lambda_i *= exp(-eta r) for every device in the buffer, bounded to [0.25, 4]).
2. Staleness in rounds (`round_staleness`). s_i = (U - U_i) / C: uploads the server
   received since the task was handed out, over the clients training at once C. A
   client that waited for every other client once is one round stale, whatever C is.
   (FedASMU's t - o grows with C: 10x faster at C = 10 than in rounds.)
   `round_staleness: false` uses versions, s_i = t - o.
3. A pull only when it pays (`pull`). Before local step pull_fraction * steps the device
   asks for the fresh model, sending the time its remaining steps will take (R, from its
   own step times). The server answers only when the model can land before training
   ends (D < R, D = half the client's measured round-trip communication time) and the
   staleness it removes exceeds the staleness the download itself adds:
   beta * s_i > D / round_s, round_s = C x the mean time between uploads. The device then
   rebases: w += beta (w_fresh - w_start), w_start += beta (w_fresh - w_start), so its
   upload stays its own progress; its staleness counts from the pull for the share beta.
   `pull: always` answers whenever the server has moved on (FedASMU's rule),
   `pull: off` never asks.
4. Speed-aware local work (`speed_steps`), the FL analogue of DLion's weighted batching.
   From each upload the server learns the client's time per local step s_i
   (train_s / steps); the next task gets Q_i = round(Q0_i * median_j(s_j) / s_i) steps,
   Q0_i the client's default (one config's `local.epochs`), clamped to
   [1, max_steps_factor * Q0_i]: fast devices do more work per (costly) round trip, slow
   ones less and so come back less stale. `speed_steps: false` keeps Q0_i.

Constants (defaults; k, server_lr and sigma are searched with every baseline, grid in
src/dlion/suites/fl.yaml): K = 5, server_lr = 1, sigma = 0.5 (FedBuff's exponent),
lambda0 = 1, eta = 0.05 (FedASMU's adaptation step), beta = 1 (full rebase),
pull_fraction = 0.5, max_steps_factor = 4.
"""

from __future__ import annotations

import math
import statistics
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlion.fl.base import Algorithm, ServerState, Update

SUMMARY = "dlion's own: delta weights by staleness in rounds, gated pulls, speed-aware steps"

LAMBDA_BOUNDS = (0.25, 4.0)

# (name suffix, what it shows, the option it pins): one ablation per technique.
ABLATIONS: tuple[tuple[str, str, dict[str, object]], ...] = (
    (
        "models",
        "weights on whole models (FedASMU's mixing) instead of deltas",
        {"delta_merge": False},
    ),
    ("versions", "staleness in versions t - o instead of rounds", {"round_staleness": False}),
    (
        "alwayspull",
        "every pull answered once the server moved on (no gain test)",
        {"pull": "always"},
    ),
    ("nopull", "no mid-task pull", {"pull": "off"}),
    ("fixedsteps", "the config's local steps for every client", {"speed_steps": False}),
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    delta_merge: bool = Field(True, description="Weights on deltas (false: whole models).")
    round_staleness: bool = Field(True, description="Staleness in rounds (false: versions).")
    pull: Literal["gated", "always", "off"] = Field("gated", description="Mid-task pull rule.")
    speed_steps: bool = Field(True, description="Local steps proportional to client speed.")
    k: int = Field(5, ge=1, description="Buffer size K: uploads per global step.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate on the mean.")
    sigma: float = Field(0.5, ge=0, description="Staleness exponent: (1 + s) ** -sigma.")
    adapt: bool = Field(True, description="Adapt lambda_i from the proxy-loss change.")
    lambda0: float = Field(1.0, gt=0, description="Initial per-device weight lambda_i.")
    eta: float = Field(0.05, ge=0, description="Adaptation step.")
    ema: float = Field(0.9, ge=0, lt=1, description="Decay of the running means.")
    beta: float = Field(1.0, gt=0, le=1, description="Share of the fresh model a pull takes.")
    pull_fraction: float = Field(0.5, gt=0, lt=1, description="Pull before this share of steps.")
    max_steps_factor: float = Field(4.0, ge=1, description="At most this x the default steps.")


def staleness_rounds(uploads_now: int, uploads_at_start: float, concurrency: int) -> float:
    """(U - U_i) / C: uploads since the task began, in units of a full set of clients."""
    return max(0.0, (uploads_now - uploads_at_start) / concurrency)


def delta_weight(lam: float, staleness: float, sigma: float) -> float:
    """lambda_i * (1 + s) ** -sigma."""
    return lam * (1 + staleness) ** -sigma


def speed_steps(default_steps: int, step_s: float, median_step_s: float, cap: float) -> int:
    """round(Q0 * median / s_i), clamped to [1, cap * Q0]."""
    q = round(default_steps * median_step_s / step_s)
    return max(1, min(q, math.floor(cap * default_steps)))


def pull_pays(
    beta: float, staleness: float, download_s: float, remaining_s: float, round_s: float
) -> bool:
    """Answer a pull iff the model lands in time (D < R) and the staleness it removes,
    beta * s, exceeds the staleness its download adds, D / round_s."""
    if not (download_s < remaining_s) or round_s <= 0:
        return False
    return beta * staleness > download_s / round_s


class FedPace(Algorithm):
    name = "fedpace"
    reports_timing = True
    options: Options

    def __init__(self, options: Options, num_clients: int) -> None:
        super().__init__(options, num_clients)
        # Whole-model ablation: the device mixes as FedASMU's does (the upload is then
        # relative to the original start, so w_i = w_o + d_i holds on the server).
        self.rebase_on_pull = options.delta_merge
        n = num_clients + 1
        self.lam = torch.full((n,), options.lambda0, dtype=torch.float64)
        self.uploads = 0  # U: uploads seen
        self.start_u: dict[int, float] = {}  # U when each client's task was handed out
        self.pull_u: dict[int, float] = {}  # U when its pull was answered
        self.step_s: dict[int, float] = {}
        self.comm_s: dict[int, float] = {}
        self.default_steps: dict[int, int] = {}
        self.gap_s = 0.0  # running mean time between uploads
        self.last_upload: float | None = None
        self.abs_r = 0.0
        self.buffer: torch.Tensor | None = None
        self.members: list[int] = []
        self.staleness_sum = 0.0
        self.weight_sum = 0.0
        self.pulls_answered = 0

    # ---------------------------------------------------------------- scheduling
    def task_meta(self, client: int) -> dict[str, float]:
        self.start_u[client] = float(self.uploads)
        self.pull_u.pop(client, None)
        o = self.options
        if not o.speed_steps or client not in self.step_s or client not in self.default_steps:
            return {}
        median = statistics.median(self.step_s.values())
        q = speed_steps(self.default_steps[client], self.step_s[client], median, o.max_steps_factor)
        return {"steps": float(q)}

    def task_lost(self, client: int) -> None:
        self.start_u.pop(client, None)
        self.pull_u.pop(client, None)

    # ---------------------------------------------------------------- device side
    def pull_step(self, meta: dict[str, float], steps: int) -> int | None:
        if self.options.pull == "off" or steps < 2:
            return None
        return max(1, min(steps - 1, round(self.options.pull_fraction * steps)))

    def answer_pull(
        self, state: ServerState, client: int, version: int, meta: dict[str, float]
    ) -> bool:
        o = self.options
        if o.pull == "off" or state.version <= version:
            return False
        if o.pull == "gated":
            if client not in self.comm_s or self.gap_s <= 0:
                return False  # no measurement yet: the gain cannot be weighed
            s = self._staleness(client, version, state.version, self.uploads, pulled=0.0)
            download_s = self.comm_s[client] / 2
            round_s = self.gap_s * self.concurrency
            if not pull_pays(o.beta, s, download_s, meta.get("remaining_s", 0.0), round_s):
                return False
        self.pull_u[client] = float(self.uploads)
        self.pulls_answered += 1
        return True

    def device_beta(self, meta: dict[str, float], fresh_version: int, version: int) -> float:
        return self.options.beta if fresh_version > version else 0.0

    # ---------------------------------------------------------------- server side
    def _staleness(
        self,
        client: int,
        version: int,
        now_version: int,
        uploads: int,
        pulled: float,
        pull_version: float | None = None,
    ) -> float:
        """Rounds (or versions) since the task's effective start: a pull moves the start
        by the share `pulled` toward the moment it was answered."""
        if self.options.round_staleness:
            start = self.start_u.get(client, float(uploads))
            if pulled > 0 and client in self.pull_u:
                start += pulled * (self.pull_u[client] - start)
            return staleness_rounds(uploads, start, max(1, self.concurrency))
        o_eff = float(version)
        if pulled > 0 and pull_version is not None:
            o_eff += pulled * (pull_version - version)
        return max(0.0, now_version - o_eff)

    def merge(self, state: ServerState, update: Update) -> str:
        o = self.options
        i = update.client
        now = self.clock()
        if self.last_upload is not None:
            gap = max(0.0, now - self.last_upload)
            self.gap_s = o.ema * self.gap_s + (1 - o.ema) * gap if self.gap_s > 0 else gap
        self.last_upload = now
        steps, train_s = update.meta.get("steps", 0.0), update.meta.get("train_s", 0.0)
        if steps >= 1 and train_s > 0:
            self.step_s[i] = train_s / steps
            self.comm_s[i] = max(0.0, update.elapsed - train_s)
        default = update.meta.get("default_steps", 0.0)
        if default >= 1:
            self.default_steps[i] = int(default)
        s = self._staleness(
            i,
            update.version,
            state.version,
            self.uploads,
            update.meta.get("pulled", 0.0),
            update.meta.get("pull_version"),
        )
        self.uploads += 1
        self.start_u.pop(i, None)
        self.pull_u.pop(i, None)
        a = delta_weight(float(self.lam[i]), s, o.sigma)
        self.staleness_sum += s
        self.weight_sum += a
        if self.buffer is None:
            self.buffer = torch.zeros_like(state.model)
        if o.delta_merge:
            self.buffer.add_(update.delta, alpha=a)
        else:
            self.buffer.add_(update.weights - state.model, alpha=a)
        self.members.append(i)
        if len(self.members) < o.k:
            return "buffered"
        adapting = o.adapt and o.eta > 0
        before = state.probe_loss() if adapting else 0.0
        state.model.add_(self.buffer, alpha=o.server_lr / len(self.members))
        state.version += 1
        if adapting:
            self._adapt(before, state.probe_loss())
        self.buffer.zero_()
        self.members = []
        return "merged"

    def _adapt(self, before: float, after: float) -> None:
        o = self.options
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return
        r = (after - before) / before
        self.abs_r = o.ema * self.abs_r + (1 - o.ema) * abs(r) if self.abs_r > 0 else abs(r)
        if self.abs_r <= 0:
            return
        g = max(-3.0, min(3.0, r / self.abs_r))
        for i in self.members:
            value = float(self.lam[i]) * math.exp(-o.eta * g)
            self.lam[i] = min(max(value, LAMBDA_BOUNDS[0]), LAMBDA_BOUNDS[1])

    # ---------------------------------------------------------------- checkpoints
    # Per-device weights and speeds survive a resume; the buffer and tasks in flight do not.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        speeds = torch.full((3, self.num_clients + 1), math.nan, dtype=torch.float64)
        for i, s in self.step_s.items():
            speeds[0, i], speeds[1, i] = s, self.comm_s[i]
        for i, q in self.default_steps.items():
            speeds[2, i] = q
        return {"lambda": self.lam, "speeds": speeds}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lam = tensors["lambda"].clone()
        speeds = tensors["speeds"]
        for i in range(speeds.shape[1]):
            if math.isfinite(float(speeds[0, i])):
                self.step_s[i], self.comm_s[i] = float(speeds[0, i]), float(speeds[1, i])
            if math.isfinite(float(speeds[2, i])):
                self.default_steps[i] = int(speeds[2, i])

    def stats(self) -> dict[str, float]:
        n = max(1, self.uploads)
        return {
            "mean_staleness": self.staleness_sum / n,
            "mean_weight": self.weight_sum / n,
            "mean_lambda": float(self.lam[1:].mean()),
            "pulls_answered": float(self.pulls_answered),
        }
