"""One worker's model replica: flat parameters, its data shard, gradients, SGD, evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Replica:
    """A model whose parameters live in one flat tensor, so strategies work on plain vectors.

    Every parameter is a view into `self.flat`; reading or replacing the whole model is
    one tensor operation, and the optimizer is a few lines of vector math.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        seed: int,
    ) -> None:
        if len(x) == 0:
            raise ValueError("a replica needs a non-empty data shard")
        self.model = model
        self.x = x
        self.y = y
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.cat([p.detach().reshape(-1) for p in self._params]).clone()
        offset = 0
        for p in self._params:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            offset += n
        self.numel = offset
        self._momentum_buf = torch.zeros_like(self.flat)
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(x), generator=self._gen)
        self._cursor = 0

    def _next_indices(self, batch_size: int) -> torch.Tensor:
        """Next batch of this shard, walking a fresh seeded permutation every epoch."""
        parts: list[torch.Tensor] = []
        needed = batch_size
        while needed > 0:
            if self._cursor >= len(self._order):
                self._order = torch.randperm(len(self.x), generator=self._gen)
                self._cursor = 0
            take = min(needed, len(self._order) - self._cursor)
            parts.append(self._order[self._cursor : self._cursor + take])
            self._cursor += take
            needed -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gradient(self, batch_size: int) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy gradient on the next `batch_size` samples, as a flat vector."""
        idx = self._next_indices(batch_size)
        self.model.train()
        for p in self._params:
            p.grad = None
        loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self._params])  # type: ignore[union-attr]
        for p in self._params:
            p.grad = None
        return grad, float(loss.detach())

    def params(self) -> torch.Tensor:
        """A copy of the flat parameter vector."""
        return self.flat.clone()

    def set_params(self, flat: torch.Tensor) -> None:
        self.flat.copy_(flat)

    def state_vector(self) -> torch.Tensor:
        """Parameters and optimizer state (momentum) as one flat vector of 2 * numel."""
        return torch.cat([self.flat, self._momentum_buf])

    def load_state_vector(self, state: torch.Tensor) -> None:
        """Adopt another replica's parameters and optimizer state (a `state_vector`)."""
        if state.numel() != 2 * self.numel:
            raise ValueError(f"state vector has {state.numel()} entries, expected {2 * self.numel}")
        self.flat.copy_(state[: self.numel])
        self._momentum_buf.copy_(state[self.numel :])

    def snapshot(self) -> tuple[dict[str, torch.Tensor], int]:
        """Everything that decides this replica's future, for a checkpoint: copies of the
        parameters, momentum, batch generator state and epoch permutation, plus the cursor."""
        tensors = {
            "params": self.flat.clone(),
            "momentum": self._momentum_buf.clone(),
            "generator": self._gen.get_state(),
            "order": self._order.clone(),
        }
        return tensors, self._cursor

    def restore(self, tensors: dict[str, torch.Tensor], cursor: int) -> None:
        """Adopt a `snapshot`; ValueError (nothing changed) if it does not fit this replica."""
        for key, like in (("params", self.flat), ("momentum", self._momentum_buf)):
            got = tensors.get(key)
            if got is None or got.shape != like.shape or got.dtype != like.dtype:
                raise ValueError(f"{key}: expected {like.dtype} of shape {tuple(like.shape)}")
        order, gen = tensors.get("order"), tensors.get("generator")
        if order is None or order.dtype != torch.int64 or order.numel() != len(self.x):
            raise ValueError(f"order: expected a permutation of {len(self.x)} indices")
        if gen is None or gen.dtype != torch.uint8 or not 0 <= cursor <= len(order):
            raise ValueError("generator state or cursor out of range")
        self._gen.set_state(gen.clone())
        self.flat.copy_(tensors["params"])
        self._momentum_buf.copy_(tensors["momentum"])
        self._order = order.clone()
        self._cursor = cursor

    def apply(self, grad: torch.Tensor) -> None:
        """One SGD step with momentum and weight decay (torch.optim.SGD semantics)."""
        if self.weight_decay:
            grad = grad + self.weight_decay * self.flat
        if self.momentum:
            self._momentum_buf.mul_(self.momentum).add_(grad)
            grad = self._momentum_buf
        self.flat.sub_(self.lr * grad)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(accuracy, mean loss) on the given split."""
        self.model.eval()
        logits = self.model(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(dim=1) == y).float().mean())
        return acc, loss
