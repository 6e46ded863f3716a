"""Streaming DiLoCo with low-bit outer gradients (issue 16 part 3): one exchange by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dlion.comm.codec import decode, encode
from dlion.comm.messages import Message, Quantized, tensor_problem
from dlion.context import WorkerContext
from dlion.core.errors import ConfigError
from dlion.core.registry import get_strategy, parse_options
from dlion.engines.sim import run_sim
from dlion.strategies.streaming_diloco import quantize_dense, quantized_sum
from helpers import FREE_VECTORS, registered, small_config

V0 = [0.3, -0.6, 0.0, 0.15]
V1 = [1.0, 0.5, -0.2, 0.1]
# 4 bits: 16 levels (2c / 15 - 1) s, c = round((v / s + 1) 7.5), chunks of 2 entries.
# V0: chunk (0.3, -0.6), s 0.6: c 11.25 -> 11 -> 0.28, c 0 -> -0.6;
#     chunk (0.0, 0.15), s 0.15: c 7.5 -> 8 (half to even) -> 0.01, c 15 -> 0.15.
# V1: chunk (1.0, 0.5), s 1.0: c 15 -> 1.0, c 11.25 -> 11 -> 7/15;
#     chunk (-0.2, 0.1), s 0.2: c 0 -> -0.2, c 11.25 -> 11 -> 1.4/15.
D0 = [0.28, -0.6, 0.01, 0.15]
D1 = [1.0, 7 / 15, -0.2, 1.4 / 15]


def test_quantize_dense_by_hand() -> None:
    q = quantize_dense(torch.tensor(V0), bits=4, chunk=2)
    assert q.dense and q.indices.numel() == 0
    assert q.codes.tolist() == [11, 0, 8, 15]
    assert q.scales.tolist() == pytest.approx([0.6, 0.15])
    assert q.to_dense(4).tolist() == pytest.approx(D0, abs=1e-7)
    # 4 entries x 4 bits = 2 bytes, two float32 scales, no index bytes.
    assert q.nbytes == 2 + 2 * 4
    assert tensor_problem(q, 4) is None
    back = decode(encode(Message(0, 1, "x", q, 0.0, {})), 1 << 20).payload
    assert isinstance(back, Quantized) and back.to_dense(4).tolist() == q.to_dense(4).tolist()


def test_a_zero_chunk_decodes_to_zero_and_a_short_last_chunk_is_padded() -> None:
    q = quantize_dense(torch.tensor([0.0, 0.0, 2.0]), bits=2, chunk=2)
    assert q.scales.tolist() == [0.0, 2.0]
    assert q.to_dense(3).tolist() == [0.0, 0.0, 2.0]


def test_one_quantized_exchange_by_hand() -> None:
    got: dict[int, list[float]] = {}
    sent: dict[int, int] = {}

    async def worker(ctx: WorkerContext, _: Any) -> None:
        vector = torch.tensor(V0 if ctx.rank == 0 else V1)
        total = await quantized_sum(ctx, vector, "q", ranks=[0, 1], epoch=None, bits=4, chunk=2)
        got[ctx.rank] = total.tolist()
        sent[ctx.rank] = ctx.bytes_sent

    with registered("t-qsum", worker):
        run_sim(small_config(strategy="t-qsum", engine=FREE_VECTORS), progress=False)
    expected = [a + b for a, b in zip(D0, D1, strict=True)]
    assert got[0] == pytest.approx(expected, abs=1e-6)
    assert got[0] == got[1]  # bit-identical at every member
    assert sent == {0: 10 + 64, 1: 10 + 64}  # one 10-byte payload each, plus its header


def test_streaming_diloco_with_4_bits_trains_and_sends_fewer_bytes() -> None:
    summaries = {}
    for bits in (None, 4):
        cfg = small_config(
            strategy="streaming-diloco",
            options={"H": 4, "fragments": 2, "tau": 1, "bits": bits},
            train={"max_time": 1.0, "stop_at_target": False, "optimizer": {"name": "adamw"}},
        )
        summaries[bits] = run_sim(cfg, progress=False).summary
    assert summaries[4]["final_acc"] > 0.5
    assert summaries[4]["bytes_sent"] < 0.5 * summaries[None]["bytes_sent"]


def test_bad_bits_are_refused() -> None:
    with pytest.raises(ConfigError, match="bits must be one of 1, 2, 4, 8"):
        parse_options(get_strategy("streaming-diloco"), {"bits": 3, "H": 4})
