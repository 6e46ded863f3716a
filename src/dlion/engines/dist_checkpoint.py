"""Dist checkpoints: each worker saves its own replica state; `--resume` is an elastic
restart of every worker from its latest checkpoint.

A worker writes DIR/checkpoints/rank-<r>/<step>/ every `checkpoint.every_s` wall seconds
(on its event loop, between strategy steps, so the snapshot is consistent): parameters,
momentum, the batch generator and permutation, the strategy state it keeps with
`ctx.keep_state` (DLion's per-link residuals) in safetensors, and the iteration, cursor,
`ctx.rng` state and counters in JSON. Real state is saved: a resume does not recompute.

Resume (`dlion train CONFIG --engine dist --resume DIR`): the launcher first verifies
every rank's latest checkpoint (hash, size, config; one-line CheckpointError and nothing
launched or written otherwise); then every worker restores its own replica, RNG and kept
strategy state (handed back through `ctx.restored_state`) and starts from the highest
checkpointed iteration of the job, so iteration-tagged (bulk-synchronous) strategies agree
on where they are. Not restored: state a strategy does not keep (other strategies'
coroutine locals: Ako's accumulators, queues), messages in flight, and the wall clock (the
resumed run's time and metrics start at 0; the previous metrics.jsonl is kept as
metrics.before-resume-<n>.jsonl). Replicas of a bulk-synchronous strategy checkpointed a
few iterations apart stay that far apart. All ranks' checkpoints must be visible to the
launcher (one host, or a shared directory).
"""

from __future__ import annotations

import time
from pathlib import Path

from dlion.context import WorkerContext
from dlion.core.checkpoint import Checkpoint, CheckpointError, load_latest, save_checkpoint
from dlion.core.config import ExperimentConfig
from dlion.engines.sim_checkpoint import experiment_hash, worker_snapshot


def worker_root(out_dir: Path, rank: int) -> Path:
    return out_dir / "checkpoints" / f"rank-{rank}"


def _check_state(ckpt: Checkpoint, rank: int) -> None:
    s = ckpt.state
    ok = (
        s.get("rank") == rank
        and isinstance(s.get("iteration"), int)
        and isinstance(s.get("cursor"), int)
        and isinstance(s.get("rng"), list)
    )
    if not ok:
        raise CheckpointError(f"{ckpt.path}: bad worker state for rank {rank}")


def verify_resume(cfg: ExperimentConfig, out_dir: Path, size: int) -> int:
    """Check every rank's latest checkpoint; return the iteration the job resumes from.
    Reads only."""
    digest = experiment_hash(cfg)
    iterations = []
    for rank in range(size):
        ckpt = load_latest(worker_root(out_dir, rank), digest)
        _check_state(ckpt, rank)
        iterations.append(ckpt.state["iteration"])
    return max(iterations)


def keep_previous_metrics(out_dir: Path) -> Path | None:
    """Move the interrupted run's metrics.jsonl aside (a resumed dist run starts a new
    time axis); returns where it went."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    n = 1
    while (out_dir / f"metrics.before-resume-{n}.jsonl").exists():
        n += 1
    target = out_dir / f"metrics.before-resume-{n}.jsonl"
    metrics.rename(target)
    return target


class WorkerCheckpointer:
    """One worker's periodic checkpoints and its restore on resume."""

    def __init__(self, cfg: ExperimentConfig, rank: int, out_dir: Path | None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.every_s = cfg.checkpoint.every_s
        self.root = None if out_dir is None else worker_root(out_dir, rank)
        self.hash = experiment_hash(cfg)
        self.step = 0
        self._last = time.monotonic()

    def due(self) -> bool:
        """Time for a checkpoint (called from the monitor thread). Claims the slot, so a
        loop busy with a long step is not handed several saves at once."""
        if self.every_s is None or self.root is None:
            return False
        if time.monotonic() - self._last < self.every_s:
            return False
        self._last = time.monotonic()
        return True

    def save(self, ctx: WorkerContext) -> Path | None:
        """Write this worker's state; on the event loop, with no strategy step running."""
        if self.root is None:
            return None
        tensors, state = worker_snapshot(ctx)
        state["t"] = ctx.now()
        path = save_checkpoint(
            self.root,
            self.step,
            tensors,
            state,
            config_hash=self.hash,
            keep=self.cfg.checkpoint.keep,
        )
        self.step += 1
        return path

    def restore(self, ctx: WorkerContext, out_dir: Path, size: int) -> Checkpoint:
        """Adopt this rank's latest checkpoint, starting at the job's resume iteration."""
        start = verify_resume(self.cfg, out_dir, size)
        ckpt = load_latest(worker_root(out_dir, self.rank), self.hash)
        _check_state(ckpt, self.rank)
        try:
            ctx.replica.restore(ckpt.tensors, ckpt.state["cursor"])
            version, internal, gauss = ckpt.state["rng"]
            ctx.rng.setstate((version, tuple(internal), gauss))
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{ckpt.path}: does not fit this replica ({exc})") from None
        ctx.restore_state(
            {
                k.removeprefix("strategy."): v
                for k, v in ckpt.tensors.items()
                if k.startswith("strategy.")
            }
        )
        ctx.iteration = start
        self.step = ckpt.step + 1
        return ckpt
