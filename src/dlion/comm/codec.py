"""Wire format for messages between real processes: a JSON header, then raw tensor bytes.

Nothing is unpickled: a peer can only make us allocate what the header declares, and the
header is checked against the frame's length and a size limit before any tensor is built.
Frame layout: 4-byte big-endian header length, UTF-8 JSON header (padded with spaces so
the tensors start 8-byte aligned), then the tensors' bytes back to back (little-endian, as
torch stores them on every platform we run on).

Decoding a writable frame (the receive buffer the transport filled, which nothing else
uses) takes the tensors as views of it, without copying; a read-only or misaligned one is
copied.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from dlion.comm.messages import (
    QUANT_BITS,
    Control,
    Dense,
    Message,
    Payload,
    Quantized,
    Scalar,
    Sparse,
)

MAX_HEADER_BYTES = 64 * 1024
_LEN = struct.Struct(">I")
_ALIGN = 8  # tensors start at a multiple of this in a frame (the widest dtype's size)
# The dtypes a frame may carry; anything else is refused before allocation.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class BadFrame(ValueError):
    """A frame from a peer that cannot be decoded into a message; it is never applied."""


def encode(msg: Message) -> bytes:
    """Message -> frame bytes. Sparse indices travel as int32, as the size model assumes."""
    payload = msg.payload
    tensors: list[torch.Tensor] = []
    body: dict[str, Any]
    if isinstance(payload, Dense):
        body = {"kind": "dense"}
        tensors = [payload.values]
    elif isinstance(payload, Sparse):
        body = {"kind": "sparse", "numel": payload.numel}
        tensors = [payload.indices.to(torch.int32), payload.values]
    elif isinstance(payload, Quantized):
        body = {
            "kind": "quantized",
            "numel": payload.numel,
            "bits": payload.bits,
            "group": payload.group,
            "count": payload.codes.numel(),
        }
        packed = pack_codes(payload.codes, payload.bits)
        tensors = [payload.indices.to(torch.int32), packed, payload.scales]
    elif isinstance(payload, Scalar):
        body = {"kind": "scalar", "value": payload.value}
    else:
        body = {"kind": "control", "control": payload.kind, "data": payload.data}
    tensors = [t.detach().contiguous().cpu() for t in tensors]
    header = {
        "src": msg.src,
        "dst": msg.dst,
        "tag": msg.tag,
        "sent_at": msg.sent_at,
        "meta": msg.meta,
        "payload": body,
        "tensors": [[_DTYPE_NAMES[t.dtype], list(t.shape)] for t in tensors],
    }
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    head += b" " * (-(_LEN.size + len(head)) % _ALIGN)  # JSON allows trailing spaces
    parts = [_LEN.pack(len(head)), head]
    parts.extend(t.numpy().tobytes() for t in tensors)
    return b"".join(parts)


def decode(frame: bytes | bytearray | memoryview, max_bytes: int) -> Message:
    """Frame bytes -> Message, or BadFrame saying what is wrong with it."""
    view = memoryview(frame)
    if len(view) > max_bytes:
        raise BadFrame(f"frame of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < _LEN.size:
        raise BadFrame("frame shorter than its length prefix")
    (head_len,) = _LEN.unpack(view[: _LEN.size])
    if head_len > MAX_HEADER_BYTES or _LEN.size + head_len > len(view):
        raise BadFrame(f"header length {head_len} does not fit the frame")
    try:
        header = json.loads(bytes(view[_LEN.size : _LEN.size + head_len]))
        src, dst, tag = int(header["src"]), int(header["dst"]), str(header["tag"])
        sent_at = float(header["sent_at"])
        meta = {str(k): float(v) for k, v in dict(header["meta"]).items()}
        body = dict(header["payload"])
        specs = [(str(d), [int(s) for s in shape]) for d, shape in header["tensors"]]
    except (ValueError, KeyError, TypeError) as err:
        raise BadFrame(f"malformed header: {err}") from None
    tensors = _read_tensors(view[_LEN.size + head_len :], specs)
    return Message(src, dst, tag, _payload(body, tensors), sent_at, meta)


def _read_tensors(data: memoryview, specs: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
    out = []
    offset = 0
    for dtype_name, shape in specs:
        if dtype_name not in _DTYPES or any(s < 0 for s in shape):
            raise BadFrame(f"tensor spec {dtype_name}{shape} not allowed")
        dtype = _DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(data):
            raise BadFrame("tensor data shorter than the header declares")
        out.append(_tensor_at(data[offset : offset + nbytes], dtype, shape))
        offset += nbytes
    if offset != len(data):
        raise BadFrame(f"{len(data) - offset} stray bytes after the tensors")
    return out


def _tensor_at(chunk: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor stored in `chunk`: a view of it when the buffer is writable (the tensor
    may then be modified in place) and aligned for `dtype`, else a copy."""
    if len(chunk) == 0:
        return torch.empty(shape, dtype=dtype)
    if chunk.readonly:
        return torch.frombuffer(bytearray(chunk), dtype=dtype).reshape(shape)
    raw = torch.frombuffer(chunk, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()  # misaligned: a fresh allocation is aligned
    return raw.view(dtype).reshape(shape)


def _payload(body: dict[str, Any], tensors: list[torch.Tensor]) -> Payload:
    kind = body.get("kind")
    try:
        if kind == "dense" and len(tensors) == 1:
            return Dense(tensors[0])
        if kind == "sparse" and len(tensors) == 2:
            return Sparse(tensors[0].to(torch.int64), tensors[1], int(body["numel"]))
        if kind == "quantized" and len(tensors) == 3:
            bits, count = int(body["bits"]), int(body["count"])
            if bits not in QUANT_BITS or not 0 <= count <= tensors[1].numel() * (8 // bits):
                raise ValueError(f"bits={bits}, count={count}")
            codes = unpack_codes(tensors[1].to(torch.uint8), bits, count)
            indices = tensors[0].to(torch.int64)
            return Quantized(
                indices, codes, tensors[2], int(body["numel"]), bits, int(body["group"])
            )
        if kind == "scalar" and not tensors:
            return Scalar(float(body["value"]))
        if kind == "control" and not tensors:
            return Control(str(body["control"]), dict(body["data"]))
    except (KeyError, TypeError, ValueError) as err:
        raise BadFrame(f"malformed {kind} payload: {err}") from None
    raise BadFrame(f"payload kind {kind!r} with {len(tensors)} tensors is not a message")


def decode_from(
    frame: bytes | bytearray | memoryview, *, peer: int, me: int, max_bytes: int
) -> Message:
    """`decode`, and refuse a frame that names another sender or receiver than the link it
    came over (a peer must not speak for another)."""
    msg = decode(frame, max_bytes)
    if msg.src != peer or msg.dst != me:
        raise BadFrame(f"frame claims {msg.src}->{msg.dst}")
    return msg


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits each -> bytes holding 8 // bits codes, lowest bits first."""
    per = 8 // bits
    padded = torch.zeros(-(-codes.numel() // per) * per, dtype=torch.int32)
    padded[: codes.numel()] = codes.to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).view(-1, 1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)
