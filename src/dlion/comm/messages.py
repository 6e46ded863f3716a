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


QUANT_BITS = (1, 2, 4, 8)  # value widths a Quantized payload may use (they pack into bytes)


def quant_levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The value of each code in units of its scale: 2**bits levels spread uniformly over
    [-1, 1] (2 bits: -1, -1/3, 1/3, 1)."""
    return codes.to(torch.float32) * (2.0 / (2**bits - 1)) - 1.0


@dataclass(frozen=True)
class Quantized:
    """Selected entries of a flat tensor of length `numel`, each value in `bits` bits.

    Entry j is `indices[j]` with value `scales[j // group] * quant_levels(codes[j])`: one
    float32 scale per `group` consecutive values (a chunk of a chunked top-k). On the
    wire: int32 indices, the codes packed `bits` to a value, float32 scales.

    Dense form: no indices (an empty `indices`) and `numel` codes, entry j is index j (a
    low-bit copy of a whole vector: no index bytes on the wire)."""

    indices: torch.Tensor  # int64 in memory, int32 on the wire
    codes: torch.Tensor  # uint8 in memory, one per value; packed on the wire
    scales: torch.Tensor  # float32, ceil(len(codes) / group) of them
    numel: int
    bits: int
    group: int

    @property
    def dense(self) -> bool:
        return self.indices.numel() == 0 and self.codes.numel() == self.numel > 0

    @property
    def nbytes(self) -> int:
        n = self.codes.numel()
        index_bytes = self.indices.numel() * INDEX_BYTES
        return index_bytes + math.ceil(n * self.bits / 8) + self.scales.numel() * VALUE_BYTES

    def values(self) -> torch.Tensor:
        n = self.codes.numel()
        scale = self.scales.repeat_interleave(self.group)[:n] if n else self.scales[:0]
        return scale * quant_levels(self.codes, self.bits)

    def to_dense(self, numel: int) -> torch.Tensor:
        if self.dense:
            return self.values()
        out = torch.zeros(numel, dtype=torch.float32)
        out[self.indices] = self.values()
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


Payload = Dense | Sparse | Quantized | Scalar | Control


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
        if idx.numel():
            low, high = torch.aminmax(idx)
            if int(low) < 0 or int(high) >= payload.numel:
                return "sparse tensor index out of range"
    elif isinstance(payload, Quantized):
        return _quantized_problem(payload, numel)
    else:
        return None
    if values.dtype != torch.float32:
        return f"tensor dtype {values.dtype}, expected torch.float32"
    # A sum with any NaN or Inf in it is never finite, so one reduction usually settles it;
    # only a sum that overflowed needs the element-wise check.
    if not math.isfinite(float(values.sum())) and not bool(torch.isfinite(values).all()):
        return "tensor contains NaN or Inf"
    return None


def _quantized_problem(payload: Quantized, numel: int | None) -> str | None:
    n = payload.codes.numel()
    if numel is not None and payload.numel != numel:
        return f"quantized tensor of length {payload.numel}, expected {numel}"
    if payload.bits not in QUANT_BITS or payload.group < 1:
        return f"quantized tensor with bits={payload.bits}, group={payload.group}"
    indexed = payload.indices.numel() == n and not payload.dense
    if not (indexed or payload.dense) or payload.scales.numel() != math.ceil(n / payload.group):
        return "quantized tensor has inconsistent index, code and scale counts"
    idx = payload.indices
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= payload.numel):
        return "quantized tensor index out of range"
    if payload.codes.dtype != torch.uint8 or (n and int(payload.codes.max()) >= 2**payload.bits):
        return f"quantized codes are not {payload.bits}-bit"
    scales = payload.scales
    if scales.dtype != torch.float32:
        return f"tensor dtype {scales.dtype}, expected torch.float32"
    if scales.numel() and not bool(torch.isfinite(scales).all()):
        return "tensor contains NaN or Inf"
    return None
