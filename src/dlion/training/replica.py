"""One worker's model replica: flat parameters and buffers, its data shard, gradients,
the optimizer step, evaluation."""

from __future__ import annotations

import math

import torch
from torch import nn

from dlion.core.config import EvaluationConfig, TrainConfig
from dlion.core.errors import DlionError
from dlion.data.examples import Examples, TensorExamples
from dlion.training.objective import Objective, build_objective
from dlion.training.optim import (
    FlatSGD,
    build_optimizer,
    flat_state,
    flat_state_numel,
    load_flat_state,
    materialize_state,
    schedule_factor,
    state_tensors,
)


class NonFiniteLoss(DlionError):
    """The training loss became NaN or infinite: the run diverged (or the loss is broken)."""


class Replica:
    """A model whose parameters live in one flat tensor, so strategies work on plain vectors.

    Every trainable parameter is a view into `self.flat`, and every floating-point buffer
    (BatchNorm running statistics and the like) a view into `self.buffers`: reading or
    replacing the whole model is one tensor operation. `model_state()` is both together;
    strategies that exchange whole models exchange it, so buffers travel with parameters.
    Integer buffers (BatchNorm's `num_batches_tracked`) are counters and stay local.

    The replica's data is its shard: positions `indices` into the shared `data` (never a
    copy of the samples), walked in a fresh seeded permutation every epoch.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Examples,
        indices: torch.Tensor | None = None,
        *,
        train: TrainConfig,
        seed: int,
        objective: Objective | None = None,
    ) -> None:
        self.indices = torch.arange(len(data), dtype=torch.int64) if indices is None else indices
        if len(self.indices) == 0:
            raise ValueError("a replica needs a non-empty data shard")
        self.model = model
        self.data = data
        self.objective = objective or build_objective(train, EvaluationConfig())
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.cat([p.detach().reshape(-1) for p in self._params]).clone()
        offset = 0
        for p in self._params:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            offset += n
        self.numel = offset
        self.buffers = _flatten_float_buffers(model)
        # BatchNorm cannot train on one sample: strategies that size batches keep >= 2.
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.min_batch = 2 if has_bn else 1
        self.model_numel = self.numel + self.buffers.numel()
        # The optimizer sees either the flat vector (FlatSGD) or the model's parameters;
        # both are views of self.flat, so strategies and optimizer agree on one model.
        self._flat_param = nn.Parameter(self.flat, requires_grad=True)
        self.optimizer = build_optimizer(train, self._flat_param, model)
        self._opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        materialize_state(self.optimizer, self._opt_params)
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._factor = schedule_factor(train.schedule, train.max_iterations)
        self.updates = 0  # optimizer steps taken: the schedule's clock
        self._fresh = True  # still the initial model (no update, no adopted state)
        self._set_lr()
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(self.indices), generator=self._gen)
        self._cursor = 0

    @classmethod
    def from_tensors(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        seed: int,
    ) -> Replica:
        """A replica on tensors of its own, trained with cross-entropy and SGD (FL clients
        and the FL server's proxy set)."""
        train = TrainConfig(lr=lr, momentum=momentum, weight_decay=weight_decay)
        return cls(model, TensorExamples(x, y), train=train, seed=seed)

    @property
    def x(self) -> torch.Tensor:
        """This shard's inputs as one tensor (tensor-backed data only)."""
        return self.data.batch(self.indices)[0]

    @property
    def y(self) -> torch.Tensor:
        return self.data.batch(self.indices)[1]

    # ---------------------------------------------------------------- data
    def _next_indices(self, batch_size: int) -> torch.Tensor:
        """Next batch of this shard (dataset positions), walking a fresh seeded permutation
        every epoch."""
        parts: list[torch.Tensor] = []
        needed = batch_size
        while needed > 0:
            if self._cursor >= len(self._order):
                self._order = torch.randperm(len(self.indices), generator=self._gen)
                self._cursor = 0
            take = min(needed, len(self._order) - self._cursor)
            parts.append(self._order[self._cursor : self._cursor + take])
            self._cursor += take
            needed -= take
        local = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.indices[local]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the next `batch_size` samples of this shard."""
        return self.data.batch(self._next_indices(batch_size))

    # ---------------------------------------------------------------- training
    def gradient(self, batch_size: int) -> tuple[torch.Tensor, float]:
        """Mean loss gradient on the next `batch_size` samples, as a flat vector.
        NonFiniteLoss if the loss is NaN or infinite."""
        x, y = self.next_batch(batch_size)
        self.model.train()
        for p in self._params:
            p.grad = None
        loss = self.objective.loss(self.model(x), y)
        value = float(loss.detach())
        if not math.isfinite(value) and self.updates == 0 and self._fresh:
            # Non-finite before any update: the loss function itself is broken. Later, it
            # is divergence (too high a learning rate), which the run reports as such.
            raise NonFiniteLoss(
                f"train.loss: the loss function returned {value} on the first batch "
                "(before any update): check the loss and the targets"
            )
        loss.backward()
        grad = torch.cat(
            [
                p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                for p in self._params
            ]
        )
        for p in self._params:
            p.grad = None
        return grad, value

    @property
    def lr(self) -> float:
        """The learning rate of the next update (the schedule applied to train.lr)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        """Set train.lr (the schedule's base) for every parameter group."""
        self._base_lrs = [float(value)] * len(self._base_lrs)
        self._set_lr()

    def _set_lr(self) -> None:
        factor = self._factor(self.updates)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor if factor != 1.0 else base

    @property
    def optimizer_cost(self) -> tuple[str, int]:
        """How an optimizer step is charged (dlion.cluster.vector_cost): its kind, `sgd` for
        FlatSGD and `adamw` for anything else, and the tensors it steps one by one."""
        kind = "sgd" if isinstance(self.optimizer, FlatSGD) else "adamw"
        return kind, len(self._opt_params)

    def apply(self, grad: torch.Tensor) -> None:
        """One step of the configured optimizer with `grad` (a flat vector, usually the
        update the strategy aggregated), then the schedule advances."""
        if self._opt_params == [self._flat_param]:
            self._flat_param.grad = grad
        else:
            offset = 0
            for p in self._params:
                n = p.numel()
                p.grad = grad[offset : offset + n].view_as(p)
                offset += n
        self.optimizer.step()
        for p in self._opt_params:
            p.grad = None
        self.updates += 1
        self._fresh = False
        self._set_lr()

    # ---------------------------------------------------------------- whole-model access
    def params(self) -> torch.Tensor:
        """A copy of the flat parameter vector."""
        return self.flat.clone()

    def set_params(self, flat: torch.Tensor) -> None:
        self.flat.copy_(flat)
        self._fresh = False

    def model_state(self) -> torch.Tensor:
        """A copy of parameters and float buffers as one vector (`model_numel` entries)."""
        return torch.cat([self.flat, self.buffers])

    def set_model_state(self, state: torch.Tensor) -> None:
        """Adopt a `model_state` vector; a parameters-only vector leaves buffers as they are."""
        self._fresh = False
        if state.numel() == self.numel:
            self.flat.copy_(state)
            return
        if state.numel() != self.model_numel:
            raise ValueError(
                f"model state has {state.numel()} entries, expected {self.model_numel}"
            )
        self.flat.copy_(state[: self.numel])
        self.buffers.copy_(state[self.numel :])

    def state_vector(self) -> torch.Tensor:
        """Parameters, float buffers and optimizer state as one flat vector (`state_numel`),
        for a joining peer."""
        return torch.cat([self.flat, self.buffers, flat_state(self.optimizer)])

    @property
    def state_numel(self) -> int:
        return self.model_numel + flat_state_numel(self.optimizer)

    def load_state_vector(self, state: torch.Tensor) -> None:
        """Adopt another replica's `state_vector` (ValueError, nothing changed, if it does
        not fit)."""
        if state.numel() != self.state_numel:
            raise ValueError(
                f"state vector has {state.numel()} entries, expected {self.state_numel}"
            )
        self.set_model_state(state[: self.model_numel])
        load_flat_state(self.optimizer, state[self.model_numel :])

    # ---------------------------------------------------------------- checkpoints
    def snapshot(self) -> tuple[dict[str, torch.Tensor], int]:
        """Everything that decides this replica's future, for a checkpoint: copies of the
        parameters, buffers (all of them, by name), optimizer state, update count, batch
        generator state and epoch permutation, plus the cursor."""
        tensors = {
            "params": self.flat.clone(),
            "generator": self._gen.get_state(),
            "order": self._order.clone(),
            "updates": torch.tensor([self.updates], dtype=torch.int64),
        }
        for name, buf in self.model.named_buffers():
            tensors[f"buffer.{name}"] = buf.detach().clone()
        for name, value in state_tensors(self.optimizer):
            tensors[f"optim.{name}"] = value.detach().clone()
        return tensors, self._cursor

    def restore(self, tensors: dict[str, torch.Tensor], cursor: int) -> None:
        """Adopt a `snapshot`; ValueError (nothing changed) if it does not fit this replica."""
        expected: list[tuple[str, torch.Tensor]] = [("params", self.flat)]
        expected += [(f"buffer.{n}", b) for n, b in self.model.named_buffers()]
        expected += [(f"optim.{n}", t) for n, t in state_tensors(self.optimizer)]
        for key, like in expected:
            got = tensors.get(key)
            if got is None or got.shape != like.shape or got.dtype != like.dtype:
                raise ValueError(f"{key}: expected {like.dtype} of shape {tuple(like.shape)}")
        order, gen, updates = tensors.get("order"), tensors.get("generator"), tensors.get("updates")
        if order is None or order.dtype != torch.int64 or order.numel() != len(self.indices):
            raise ValueError(f"order: expected a permutation of {len(self.indices)} indices")
        if gen is None or gen.dtype != torch.uint8 or not 0 <= cursor <= len(order):
            raise ValueError("generator state or cursor out of range")
        if updates is None or updates.numel() != 1 or int(updates) < 0:
            raise ValueError("updates: expected the optimizer's step count")
        self._gen.set_state(gen.clone())
        with torch.no_grad():
            for key, like in expected:
                like.copy_(tensors[key])
        self._order = order.clone()
        self._cursor = cursor
        self.updates = int(updates)
        self._set_lr()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        examples: Examples | torch.Tensor,
        y: torch.Tensor | None = None,
        batch_size: int = 1024,
    ) -> tuple[float, float]:
        """(metric, mean loss) on `examples` (or on tensors `examples`, `y`), read in
        minibatches, with this replica's own buffers (eval mode)."""
        if isinstance(examples, torch.Tensor):
            if y is None:
                raise ValueError("evaluate: give targets with input tensors")
            examples = TensorExamples(examples, y)
        self.model.eval()
        n = len(examples)
        metric_sum = loss_sum = 0.0
        single = n <= batch_size
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            x, y = examples.batch(idx)
            out = self.model(x)
            loss = float(self.objective.loss(out, y))
            metric = loss if self.objective.metric is None else float(self.objective.metric(out, y))
            if single:  # one batch: exactly the whole-set values
                return metric, loss
            metric_sum += metric * len(idx)
            loss_sum += loss * len(idx)
        return metric_sum / n, loss_sum / n


def _flatten_float_buffers(model: nn.Module) -> torch.Tensor:
    """Concatenate the model's floating-point buffers into one vector and make each buffer
    a view of it (in-place updates such as BatchNorm's running mean land in the vector)."""
    owners = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and buf.is_floating_point()
    ]
    if not owners:
        return torch.zeros(0)
    flat = torch.cat([buf.detach().reshape(-1).float() for _, _, buf in owners]).clone()
    offset = 0
    for module, name, buf in owners:
        n = buf.numel()
        module._buffers[name] = flat[offset : offset + n].view_as(buf)
        offset += n
    return flat
