"""Typed message payloads; each knows its encoded size, which is what the network charges."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

VALUE_BYTES = 4  # float32 values on the wire
INDEX_BYTES = 4  # int32 indices on the wire (models here have < 2**31 parameters)
SCALAR_BYTES = 8
META_ENTRY_BYTES = 12  # 4-byte key id + 8-byte value


@dataclass(frozen=True)
class Dense:
    """A whole flat tensor."""

    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.values.numel() * VALUE_BYTES

    def to_dense(self, numel: int) -> torch.Tensor:
        return self.values


@dataclass(frozen=True)
class Sparse:
    """Selected entries of a flat tensor of length `numel` as (index, value) pairs."""

    indices: torch.Tensor  # int64 in memory, int32 on the wire
    values: torch.Tensor
    numel: int

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * (INDEX_BYTES + VALUE_BYTES)

    def to_dense(self, numel: int) -> torch.Tensor:
        out = torch.zeros(numel, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out


@dataclass(frozen=True)
class Scalar:
    value: float

    @property
    def nbytes(self) -> int:
        return SCALAR_BYTES


@dataclass(frozen=True)
class Control:
    """Small protocol message (join, leave, ack); `data` holds a few JSON-like fields."""

    kind: str
    data: dict[str, object] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return 16 + 8 * len(self.data)


Payload = Dense | Sparse | Scalar | Control


@dataclass(frozen=True)
class Message:
    src: int
    dst: int
    tag: str
    payload: Payload
    sent_at: float  # sender's clock when the send started
    # Small piggybacked numbers (a worker's speed, its loss EMA): saves a message per iteration.
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes + META_ENTRY_BYTES * len(self.meta)


# Failures are ordinary values (not exceptions) so every strategy handles them the same way.


@dataclass(frozen=True)
class Timeout:
    src: int | None
    tag: str
    waited: float


@dataclass(frozen=True)
class PeerGone:
    src: int


@dataclass(frozen=True)
class ViewChanged:
    """The membership changed (a peer left or joined) since the epoch the receive was
    planned for: collectives abort and re-form."""

    epoch: int


RecvResult = Message | Timeout | PeerGone | ViewChanged


def tensor_problem(payload: Payload, numel: int | None) -> str | None:
    """Why a received tensor payload must be rejected (wrong size, dtype, non-finite), or None."""
    if isinstance(payload, Dense):
        values = payload.values
        if numel is not None and values.numel() != numel:
            return f"dense tensor has {values.numel()} entries, expected {numel}"
    elif isinstance(payload, Sparse):
        values = payload.values
        if numel is not None and payload.numel != numel:
            return f"sparse tensor of length {payload.numel}, expected {numel}"
        if payload.indices.numel() != values.numel():
            return "sparse tensor has different index and value counts"
        idx = payload.indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= payload.numel):
            return "sparse tensor index out of range"
    else:
        return None
    if values.dtype != torch.float32:
        return f"tensor dtype {values.dtype}, expected torch.float32"
    # A sum with any NaN or Inf in it is never finite, so one reduction usually settles it;
    # only a sum that overflowed needs the element-wise check.
    if not math.isfinite(float(values.sum())) and not bool(torch.isfinite(values).all()):
        return "tensor contains NaN or Inf"
    return None
