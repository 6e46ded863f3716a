"""SparseLoCo: local steps with error-feedback chunked top-k and 2-bit values (2025).

../shared/PAPERS.md, section 7.

Rule. Like DiLoCo, every member starts a round from the shared global model theta and
runs `H` inner steps with the replica's configured optimizer (`train.optimizer`). Its
pseudo-gradient Delta_i = theta - theta_i goes into an error-feedback buffer
    e_i <- beta e_i + Delta_i                    (beta = `beta`, 0.95)
and what it sends is a compressed copy of e_i (`compress`): the buffer is cut into
chunks of about `chunk` entries (4096 in the paper, 64 x 64 blocks), in each chunk the
k = round(`density` * chunk length) entries of largest magnitude are kept (density 1-3%
in the paper; 2% by default), and each kept value is sent in `bits` bits (2): uniform
symmetric levels {-1, -1/3, 1/3, 1} times the chunk's scale (its largest kept magnitude),
rounded to the nearest level. What was sent, as the receivers decode it, is subtracted:
    e_i <- e_i - decode(c_i)
so both the unsent entries and the quantization error stay in the buffer (no outer
momentum: the error buffer replaces it). The compressed updates are exchanged with a ring
all-gather (each payload relayed unchanged, so every member decodes the same bytes) and
the mean is applied, weighted by the members' batches:
    theta <- theta - outer_lr * sum_i (b_i / B) decode(c_i)      (outer_lr 1.0)
Every member applies the same vector to the same theta, so the global model stays
identical everywhere. Wire size per payload: 4-byte indices, `bits` per value, one
float32 scale per chunk (`Quantized`); the paper codes indices more tightly (12 bits in a
4096-chunk), so our sizes are an upper bound on its.

Buffers (BatchNorm running statistics and other float buffers): averaged (weighted
b_i / G) by a dense all-reduce after the gather, when the model has any.

Membership changes: as DiLoCo (`diloco.adopt_leader`): a changed epoch or a failed
collective discards the round, everyone returns to the leader's global model. The error
buffer is this worker's own; a discarded round leaves it as it was before the round (the
entries it had sent are put back). A joiner starts with an empty buffer. Checkpoints
carry the global model and the error buffer.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dlion.comm.collectives import ring_allgather, ring_allreduce
from dlion.comm.messages import QUANT_BITS, Quantized
from dlion.context import WorkerContext
from dlion.strategies.diloco import initial_state, rounds

SUMMARY = "SparseLoCo: H inner steps, error-feedback chunked top-k with 2-bit values, mean applied"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    H: int = Field(20, ge=1, description="Inner steps per round (one exchange per round).")
    beta: float = Field(0.95, ge=0, le=1, description="Error-feedback decay (paper: 0.95).")
    density: float = Field(
        0.02, gt=0, le=1, description="Share of each chunk sent (top-k; paper: 1-3%)."
    )
    chunk: int = Field(4096, ge=1, description="Entries per top-k chunk (paper: 4096).")
    bits: int = Field(2, description="Bits per sent value (1, 2, 4 or 8; paper: 2).")
    outer_lr: float = Field(1.0, gt=0, description="Step size of the averaged sparse update.")

    @field_validator("bits")
    @classmethod
    def _packable(cls, bits: int) -> int:
        if bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {bits}")
        return bits


# ------------------------------------------------------------------ pure functions (tested)


def chunk_bounds(numel: int, chunk: int) -> list[tuple[int, int]]:
    """ceil(numel / chunk) chunks of nearly equal length (they differ by at most one)."""
    n = max(1, math.ceil(numel / chunk))
    base, extra = divmod(numel, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def quantize(values: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Nearest of the 2**bits uniform levels over [-scale, scale], as uint8 codes."""
    top = 2**bits - 1
    if scale <= 0:
        return torch.full(values.shape, (top + 1) // 2, dtype=torch.uint8)
    codes = torch.round((values / scale + 1.0) * (top / 2.0)).clamp(0, top)
    return codes.to(torch.uint8)


def compress(e: torch.Tensor, density: float, chunk: int, bits: int) -> Quantized:
    """Chunked top-k of `e` with `bits`-bit values: per chunk the k = max(1, round(density *
    shortest chunk)) largest magnitudes, indices ascending, scale = largest kept magnitude."""
    bounds = chunk_bounds(e.numel(), chunk)
    shortest = min(end - start for start, end in bounds)
    k = min(shortest, max(1, round(density * shortest)))
    indices, codes, scales = [], [], []
    for start, end in bounds:
        part = e[start:end]
        local = torch.topk(part.abs(), k, sorted=False).indices.sort().values
        kept = part[local]
        scale = float(kept.abs().max()) if k else 0.0
        indices.append(local + start)
        codes.append(quantize(kept, scale, bits))
        scales.append(scale)
    return Quantized(
        torch.cat(indices),
        torch.cat(codes),
        torch.tensor(scales, dtype=torch.float32),
        e.numel(),
        bits,
        k,
    )


def error_feedback_step(
    e: torch.Tensor, delta: torch.Tensor, beta: float, density: float, chunk: int, bits: int
) -> tuple[Quantized, torch.Tensor]:
    """e' = beta e + delta; send c = compress(e'); keep e' - decode(c). Returns (c, kept)."""
    accumulated = beta * e + delta
    sent = compress(accumulated, density, chunk, bits)
    return sent, accumulated - sent.to_dense(e.numel())


def mean_update(received: dict[int, tuple[Quantized, int]]) -> torch.Tensor:
    """sum_i (b_i / B) decode(c_i) over {rank: (payload, batch)}, summed in rank order."""
    total_samples = sum(b for _, b in received.values())
    first = next(iter(received.values()))[0]
    out = torch.zeros(first.numel)
    for rank in sorted(received):
        payload, samples = received[rank]
        out += payload.to_dense(first.numel) * (samples / total_samples)
    return out


# ------------------------------------------------------------------ the worker


async def worker(ctx: WorkerContext, opt: Options) -> None:
    numel = ctx.replica.numel
    state = initial_state(ctx, "sparseloco.global", momentum=False)
    error = torch.zeros(numel)
    restored = ctx.restored_state("sparseloco.error")
    if restored is not None and restored.numel() == numel:
        error = restored.to(torch.float32).clone()
    ctx.keep_state("sparseloco.error", lambda: error)

    async def exchange(epoch: int, members: list[int], batch: int, tag: str) -> None:
        nonlocal error
        chunks = len(chunk_bounds(numel, opt.chunk))
        # Delta, the decayed buffer and its remainder (axpy), the chunked top-k, the
        # quantization of what is kept.
        async with ctx.charged("axpy", 4 * numel, 4):
            delta = state.model[:numel] - ctx.replica.flat
        async with ctx.charged("topk", numel, chunks):
            sent, kept = error_feedback_step(
                error, delta, opt.beta, opt.density, opt.chunk, opt.bits
            )
        await ctx.charge("quant", sent.codes.numel(), chunks)
        # A failed collective discards the round; the error buffer stays as before it.
        got = await ring_allgather(
            ctx, sent, {"samples": float(batch)}, tag, ranks=members, epoch=epoch, numel=numel
        )
        buffers = ctx.replica.buffers
        if buffers.numel():
            weighted = buffers * (batch / ctx.global_batch)
            buffers = await ring_allreduce(ctx, weighted, f"{tag}b", ranks=members, epoch=epoch)
        error = kept
        received = {
            r: (p, int(meta.get("samples", 0)))
            for r, (p, meta) in got.items()
            if isinstance(p, Quantized) and meta.get("samples", 0) > 0
        }
        if len(received) < len(got):
            ctx.record("rejected", tag=tag, why="not a quantized update with its batch")
        async with ctx.charged("sum", numel * len(received)):
            update = mean_update(received)
        async with ctx.charged("axpy", 2 * numel, 2):
            theta = state.model[:numel] - opt.outer_lr * update
            state.model = torch.cat([theta, buffers])
        state.step += 1
        async with ctx.charged("axpy", numel):
            ctx.replica.set_model_state(state.model)

    await rounds(ctx, "sparseloco", "sl", state, opt.H, exchange)
