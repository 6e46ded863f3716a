"""The wire format between dist workers: exact round trips, and nothing but BadFrame for
any malformed frame a peer could send."""

from __future__ import annotations

import contextlib
import json
import random
import struct

import pytest
import torch

from dlion.comm.codec import BadFrame, decode, encode
from dlion.comm.messages import Control, Dense, Message, Scalar, Sparse, dense_values

LIMIT = 1 << 20


def _roundtrip(msg: Message) -> Message:
    return decode(encode(msg), LIMIT)


def test_dense_roundtrip_is_exact() -> None:
    values = torch.randn(1000)
    got = _roundtrip(Message(1, 2, "g/3", Dense(values), 1.25, {"speed": 3.5}))
    assert (got.src, got.dst, got.tag, got.sent_at, got.meta) == (1, 2, "g/3", 1.25, {"speed": 3.5})
    assert torch.equal(got.payload.values, values)  # type: ignore[union-attr]


def test_sparse_indices_travel_as_int32_and_come_back_int64() -> None:
    idx = torch.tensor([0, 7, 99], dtype=torch.int64)
    frame = encode(Message(0, 1, "s", Sparse(idx, torch.tensor([1.0, -2.0, 3.0]), 100), 0.0))
    got = decode(frame, LIMIT).payload
    assert isinstance(got, Sparse)
    assert got.indices.dtype == torch.int64 and torch.equal(got.indices, idx)
    assert got.numel == 100
    # 3 indices x 4 bytes + 3 values x 4 bytes after the header: the size model's 8 B/entry.
    head_len = struct.unpack(">I", frame[:4])[0]
    assert len(frame) - 4 - head_len == 24


def test_scalar_and_control_roundtrip() -> None:
    assert _roundtrip(Message(0, 1, "x", Scalar(2.5), 0.0)).payload == Scalar(2.5)
    ctrl = Control("state", {"seq": 3})
    assert _roundtrip(Message(0, 1, "c", ctrl, 0.0)).payload == ctrl


def _frame(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + data


GOOD = {
    "src": 0,
    "dst": 1,
    "tag": "t",
    "sent_at": 0.0,
    "meta": {},
    "payload": {"kind": "dense"},
    "tensors": [["float32", [2]]],
}


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"", "shorter than its length prefix"),
        (struct.pack(">I", 10**6) + b"{}", "does not fit"),
        (_frame(GOOD, b"\0" * 4), "shorter than the header declares"),
        (_frame(GOOD, b"\0" * 12), "stray bytes"),
        (_frame({**GOOD, "tensors": [["object", [2]]]}, b"\0" * 8), "not allowed"),
        (_frame({**GOOD, "tensors": [["float32", [-1]]]}), "not allowed"),
        (_frame({**GOOD, "payload": {"kind": "pickle"}}, b"\0" * 8), "is not a message"),
        (_frame({k: v for k, v in GOOD.items() if k != "tag"}, b"\0" * 8), "malformed header"),
        (struct.pack(">I", 3) + b"{{{", "malformed header"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(frame: bytes, why: str) -> None:
    with pytest.raises(BadFrame, match=why):
        decode(frame, LIMIT)


def test_frames_over_the_limit_are_refused_before_parsing() -> None:
    frame = encode(Message(0, 1, "big", Dense(torch.zeros(1000)), 0.0))
    with pytest.raises(BadFrame, match="exceeds the limit"):
        decode(frame, 1000)


def test_a_huge_declared_shape_is_refused_without_allocating_it() -> None:
    frame = _frame({**GOOD, "tensors": [["float32", [10**12]]]}, b"\0" * 8)
    with pytest.raises(BadFrame, match="shorter than the header declares"):
        decode(frame, LIMIT)


def test_random_corruption_only_ever_raises_badframe() -> None:
    rng = random.Random(0)
    frame = bytearray(encode(Message(0, 1, "g", Dense(torch.randn(16)), 0.0, {"a": 1.0})))
    for _ in range(500):
        broken = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            broken[rng.randrange(len(broken))] = rng.randrange(256)
        cut = rng.randint(0, len(broken))
        with contextlib.suppress(BadFrame):  # anything else escaping fails the test
            decode(bytes(broken[: cut if rng.random() < 0.3 else len(broken)]), LIMIT)


def test_a_writable_frame_is_decoded_without_copying_and_a_read_only_one_is_copied() -> None:
    values = torch.arange(6, dtype=torch.float32)
    frame = encode(Message(0, 1, "g", Dense(values), 0.0, {"speed": 2.0}))
    buffer = bytearray(frame)
    viewed = decode(memoryview(buffer), max_bytes=1 << 20)
    copied = decode(frame, max_bytes=1 << 20)
    assert torch.equal(viewed.payload.values, values)  # type: ignore[union-attr]
    assert torch.equal(copied.payload.values, values)  # type: ignore[union-attr]
    buffer[-4:] = bytes(4)  # the last value's bytes, zeroed in the frame buffer
    assert viewed.payload.values[-1].item() == 0.0  # type: ignore[union-attr]
    assert copied.payload.values[-1].item() == 5.0  # type: ignore[union-attr]


def test_an_empty_sparse_payload_round_trips() -> None:
    empty = Sparse(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 10)
    frame = bytearray(encode(Message(0, 1, "g", empty, 0.0)))
    got = decode(memoryview(frame), max_bytes=1 << 20).payload
    assert isinstance(got, Sparse) and got.indices.numel() == 0 and got.numel == 10


def test_dense_values_refuses_any_other_payload() -> None:
    """A Dense-protocol step (ring and sharded all-reduce, Gaia, AD-PSGD, the FL server) reads
    the tensor through dense_values: a Sparse of one entry used to broadcast into the sum
    silently, and a Quantized gave its `values` method instead of a tensor."""
    values = torch.tensor([1.0, 2.0])
    assert dense_values(Message(0, 1, "t", Dense(values), 0.0)) is values
    sparse = Sparse(torch.tensor([3]), torch.tensor([5.0]), 8)
    with pytest.raises(TypeError, match="'t' from rank 0: expected a Dense payload, got Sparse"):
        dense_values(Message(0, 1, "t", sparse, 0.0))
    with pytest.raises(TypeError, match="got Scalar"):
        dense_values(Message(2, 1, "t", Scalar(1.0), 0.0))
