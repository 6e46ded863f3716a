"""Sim checkpoints and exact resume by verified deterministic replay.

A strategy's state lives in its coroutine's locals (DLion's per-link residuals, Ako's
accumulators, pending receives) and in messages and flows in flight on the virtual
network; none of it can be serialized without rewriting every strategy. The sim is
bit-deterministic for a config and seed, so resume instead *replays*: it re-runs the
configured experiment from the start, and at the checkpoint's evaluation point checks
that the replay's state equals the checkpoint bit for bit (every replica's parameters,
momentum, batch generator and permutation, the strategy state kept with `ctx.keep_state`
such as DLion's residuals, every worker's `ctx.rng` state and counters, membership, and the
metrics history). Then it cuts metrics.jsonl back to that point and
continues, so the resumed run's metrics.jsonl and summary.json equal an uninterrupted
run's. If the replay diverges (another torch build, another machine, an edited history)
the resume is refused and nothing is written. Replay re-spends the compute up to the
checkpoint: sim resume buys exactness and verification, not saved time.

Checkpoints are taken at evaluation points (between events, when no coroutine runs), the
step being the evaluation index; `checkpoint.every_s` picks the first point at or after
each multiple.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol

import torch

from dlion.context import WorkerContext
from dlion.core.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_hash,
    file_sha256,
    load_latest,
    save_checkpoint,
)
from dlion.core.config import ExperimentConfig, write_config
from dlion.core.outdir import first_difference
from dlion.report import EvalPoint, MetricsLog


class _SimEngine(Protocol):
    """What a checkpoint reads from the sim engine (engines/sim.py) and restores into it;
    a protocol, so this module does not import the engine that imports it."""

    @property
    def contexts(self) -> Sequence[WorkerContext]: ...  # read only: the engine's are SimContexts

    log: MetricsLog
    running: set[int]
    believed: dict[int, int]
    epoch: int
    incarnation: list[int]
    retired_bytes: int
    retired_rejected: int


# Fields a resumed run may change: where the run stops, and how it checkpoints. They do
# not change the trajectory up to the checkpoint (and the replay check would notice if one
# did, e.g. a random trace drawn up to a different horizon).
RESUMABLE_FIELDS = (
    "description",
    "train.max_time",
    "train.stop_at_target",
    "train.max_iterations",
    "checkpoint",
)


def experiment_hash(cfg: ExperimentConfig) -> str:
    return config_hash(cfg.model_dump(mode="json"), RESUMABLE_FIELDS)


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def _normal(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj, allow_nan=False))


def worker_snapshot(ctx: WorkerContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One worker's tensors (its replica's, then its strategy state's under "strategy.")
    and counters, as both engines checkpoint them."""
    tensors, cursor = ctx.replica.snapshot()
    tensors.update({f"strategy.{k}": v for k, v in ctx.strategy_state().items()})
    counters = {
        "rank": ctx.rank,
        "iteration": ctx.iteration,
        "cursor": cursor,
        "rng": ctx.rng.getstate(),
        "bytes_sent": ctx.bytes_sent,
        "messages_sent": ctx.messages_sent,
        "rejected": ctx.rejected,
    }
    return tensors, counters


def snapshot(
    engine: _SimEngine, points: list[EvalPoint]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sim's state at an evaluation point: tensors and JSON state."""
    tensors: dict[str, torch.Tensor] = {}
    workers = []
    for ctx in engine.contexts:
        own, worker = worker_snapshot(ctx)
        tensors.update({f"rank{ctx.rank}.{key}": value for key, value in own.items()})
        workers.append({**worker, "epoch": ctx.epoch})
    history = "".join(json.dumps(e) + "\n" for e in engine.log.events).encode()
    state = {
        "t": points[-1].t,
        "eval_index": len(points) - 1,
        "workers": workers,
        "running": sorted(engine.running),
        "believed": {str(r): s for r, s in sorted(engine.believed.items())},
        "epoch": engine.epoch,
        "incarnation": list(engine.incarnation),
        "retired_bytes": engine.retired_bytes,
        "retired_rejected": engine.retired_rejected,
        "metrics_bytes": len(history),
        "metrics_sha256": sha256(history).hexdigest(),
    }
    return tensors, _normal(state)


class SimCheckpointer:
    """Writes a run's checkpoints at evaluation points and, on resume, verifies the replay
    against the checkpoint before the run's directory is touched."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: Path | None,
        *,
        resume: bool = False,
        stop_at: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.every_s = cfg.checkpoint.every_s
        self.stop_at = stop_at
        self.hash = experiment_hash(cfg)
        self.next_due = self.every_s if self.every_s is not None else math.inf
        self.pending: Checkpoint | None = None  # the checkpoint a replay must reach
        self.halted_at: float | None = None
        self.written: list[Path] = []
        if (stop_at is not None or resume) and out_dir is None:
            raise ValueError("stop_at and resume need an output directory")
        if out_dir is None:  # nowhere to write checkpoints (e.g. an in-memory probe run)
            self.every_s = None
            self.next_due = math.inf
        if resume and out_dir is not None:
            self.pending = self._load(out_dir)

    def _load(self, out_dir: Path) -> Checkpoint:
        """The latest checkpoint, verified on disk; reads only."""
        ckpt = load_latest(checkpoint_root(out_dir), self.hash)
        state = ckpt.state
        t, nbytes, digest = state.get("t"), state.get("metrics_bytes"), state.get("metrics_sha256")
        if not isinstance(t, int | float) or not isinstance(nbytes, int) or ckpt.step < 0:
            raise CheckpointError(f"{ckpt.path}: bad time or metrics entry")
        if t >= self.cfg.train.max_time:
            raise CheckpointError(
                f"{ckpt.path}: the run already reached t={t:g} s >= "
                f"train.max_time={self.cfg.train.max_time:g}; raise train.max_time to continue it"
            )
        metrics = out_dir / "metrics.jsonl"
        if not metrics.is_file() or metrics.stat().st_size < nbytes:
            raise CheckpointError(f"{metrics}: missing or shorter than the checkpoint's history")
        if file_sha256(metrics, nbytes) != digest:
            raise CheckpointError(f"{metrics}: history up to the checkpoint was modified")
        return ckpt

    def after_eval(self, engine: _SimEngine, points: list[EvalPoint]) -> bool:
        """Called right after each evaluation point is logged (no coroutine is running).
        Returns True when the run must halt here (`stop_at` reached)."""
        t, step = points[-1].t, len(points) - 1
        if self.pending is not None:
            if step == self.pending.step:
                self._verify_and_continue(engine, points)
            return False
        if t >= self.next_due - 1e-9 or (self.stop_at is not None and t >= self.stop_at):
            self._write(engine, points)
            if self.every_s is not None:
                self.next_due = (math.floor(t / self.every_s + 1e-9) + 1) * self.every_s
        if self.stop_at is not None and t >= self.stop_at:
            self.halted_at = t
            return True
        return False

    def finished(self, points: list[EvalPoint]) -> None:
        """Called when the run ends: a replay that never reached its checkpoint is refused."""
        if self.pending is not None:
            raise CheckpointError(
                f"{self.pending.path}: the replay ended at t={points[-1].t:g} s, before the "
                f"checkpoint's t={self.pending.state['t']:g} s; nothing was written"
            )

    def _write(self, engine: _SimEngine, points: list[EvalPoint]) -> None:
        if self.out_dir is None:
            raise ValueError("checkpoints need an output directory")
        tensors, state = snapshot(engine, points)
        path = save_checkpoint(
            checkpoint_root(self.out_dir),
            len(points) - 1,
            tensors,
            state,
            config_hash=self.hash,
            keep=self.cfg.checkpoint.keep,
        )
        self.written.append(path)

    def _verify_and_continue(self, engine: _SimEngine, points: list[EvalPoint]) -> None:
        ckpt, out_dir = self.pending, self.out_dir
        if ckpt is None or out_dir is None:
            raise ValueError("no checkpoint to verify")
        tensors, state = snapshot(engine, points)
        where = first_difference(ckpt.state, state, whole="state")
        if where:
            raise CheckpointError(
                f"{ckpt.path}: the replay differs from the checkpoint at {where} "
                "(another config, code or machine); nothing was written"
            )
        if set(tensors) != set(ckpt.tensors):
            raise CheckpointError(f"{ckpt.path}: tensor names differ from the replay's")
        for key in sorted(tensors):
            a, b = tensors[key], ckpt.tensors[key]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                raise CheckpointError(
                    f"{ckpt.path}: the replay's {key} differs from the checkpoint "
                    "(another config, code or machine); nothing was written"
                )
        # Verified: from here on the run owns its directory again.
        write_config(out_dir, self.cfg)
        engine.log.continue_file(out_dir / "metrics.jsonl", state["metrics_bytes"])
        self.pending = None
        if self.every_s is not None:
            self.next_due = (math.floor(points[-1].t / self.every_s + 1e-9) + 1) * self.every_s
