"""Optimizers and learning-rate schedules for replicas, and their state as flat tensors.

A replica applies the update its strategy aggregated through a `torch.optim.Optimizer`:
`sgd` is `FlatSGD` (below), `adamw` is `torch.optim.AdamW` over the model's parameters,
and "pkg.module:fn" is the user's, called as `fn(params, lr=..., **options)`.

Optimizer state is created eagerly (`materialize_state`), so every replica of a config has
the same state layout from the start: a joining worker can adopt a live peer's state as one
flat vector (`flat_state` / `load_flat_state`) and checkpoints store it as named tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dlion.core.config import OptimizerConfig, ScheduleConfig, TrainConfig
from dlion.core.errors import ConfigError
from dlion.core.usercode import call_user, load_callable


class FlatSGD(torch.optim.Optimizer):
    """torch.optim.SGD's rule (momentum without dampening or Nesterov, L2 weight decay
    added to the gradient) on the replica's one flat parameter vector:
        g <- g + wd * w;   buf <- momentum * buf + g;   w <- w - lr * buf
    It differs from torch.optim.SGD only in rounding: torch computes w + (-lr) * buf as
    one fused multiply-add, this computes lr * buf first (up to 1 ulp per step). Kept so
    the figures in benchmarks/RESULTS.md, measured with this rule, stay reproducible;
    `torch.optim:SGD` gives torch's own."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd:
                    grad = grad + wd * p
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
                    buf.mul_(momentum).add_(grad)
                    grad = buf
                p.sub_(lr * grad)


def build_optimizer(
    cfg: TrainConfig, flat: nn.Parameter, model: nn.Module
) -> torch.optim.Optimizer:
    """The configured optimizer: FlatSGD over the flat vector, others over the model's
    parameters (views into that vector), so a user's per-parameter groups still work."""
    opt: OptimizerConfig = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
        kwargs.update(opt.options)
        return _construct(FlatSGD, "train.optimizer", [flat], kwargs)
    if opt.name == "adamw":
        kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": False}
        kwargs.update(opt.options)
        return _construct(torch.optim.AdamW, "train.optimizer", params, kwargs)
    fn = load_callable(opt.name, "train.optimizer.name")
    kwargs = {"lr": cfg.lr, **opt.options}
    made = call_user(fn, "train.optimizer", params, **kwargs)
    if not isinstance(made, torch.optim.Optimizer):
        raise ConfigError(
            f"train.optimizer: {opt.name!r} returned {type(made).__name__}, "
            "expected a torch.optim.Optimizer"
        )
    return made


def _construct(
    cls: type[torch.optim.Optimizer], field: str, params: list[Any], kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}.options: {exc}") from None


def schedule_factor(cfg: ScheduleConfig, max_iterations: int | None) -> Callable[[int], float]:
    """The lr factor after `step` updates (LambdaLR's function)."""
    total = cfg.total_steps or max_iterations
    if cfg.name == "cosine" and total is None:
        raise ConfigError("train.schedule.total_steps: cosine needs it (or train.max_iterations)")

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        after = step - cfg.warmup_steps
        if cfg.name == "step":
            return float(cfg.gamma ** (after // cfg.step_size))
        if cfg.name == "cosine":
            span = max(1, (total or 1) - cfg.warmup_steps)
            progress = min(1.0, after / span)
            return cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def materialize_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Create the optimizer's state now, equal to the state it would create lazily: one
    step on zero gradients, then parameters restored and every state tensor zeroed (Adam's
    step counter included). Parameters are left exactly as they were."""
    saved = [p.detach().clone() for p in params]
    lrs = [group["lr"] for group in opt.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    with torch.no_grad():
        for p, before in zip(params, saved, strict=True):
            p.copy_(before)
            p.grad = None
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr


def state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating-point state tensor, in a fixed order."""
    out: list[tuple[str, torch.Tensor]] = []
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key in sorted(state):
                value = state[key]
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    out.append((f"{index}.{key}", value))
            index += 1
    return out


def flat_state(opt: torch.optim.Optimizer) -> torch.Tensor:
    tensors = [t.detach().reshape(-1).float() for _, t in state_tensors(opt)]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def flat_state_numel(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() for _, t in state_tensors(opt))


def load_flat_state(opt: torch.optim.Optimizer, vector: torch.Tensor) -> None:
    """Adopt a `flat_state` vector of the same layout (ValueError, nothing changed, if not)."""
    tensors = state_tensors(opt)
    total = sum(t.numel() for _, t in tensors)
    if vector.numel() != total:
        raise ValueError(f"optimizer state has {vector.numel()} entries, expected {total}")
    offset = 0
    with torch.no_grad():
        for _, t in tensors:
            n = t.numel()
            t.copy_(vector[offset : offset + n].view_as(t).to(t.dtype))
            offset += n
