"""Shared test helpers: small configs and registering throwaway strategies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict

from dlion.context import WorkerContext
from dlion.core.config import ExperimentConfig, config_from_dict
from dlion.engines.sim import RunResult, run_sim
from dlion.strategies import REGISTRY, StrategySpec


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Vector work free (issue 16 part 4 off): for tests that pin virtual times or regimes
# computed from gradients and messages alone; tests/test_vector_cost.py pins the charges.
FREE_VECTORS: dict[str, Any] = {"charge_vector_work": False}


def small_config(
    *,
    workers: list[dict[str, Any]] | None = None,
    sites: list[dict[str, Any]] | None = None,
    links: list[dict[str, Any]] | None = None,
    strategy: str = "dlion",
    options: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """A digits config with a small MLP; cluster defaults to 2 workers in one site."""
    raw: dict[str, Any] = {
        "name": "test",
        "cluster": {
            "sites": sites or [{"name": "a"}],
            "workers": workers or [{"site": "a", "capacity_gflops": 1.0, "count": 2}],
            "links": links or [],
        },
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [32]},
        "strategy": {"name": strategy, "options": options or {}},
        "train": {"max_time": 5.0, "batch_per_worker": 16, "lr": 0.05, **(train or {})},
        "evaluation": {"every_s": 0.5, **(evaluation or {})},
        "engine": engine or {},
    }
    return config_from_dict(raw)


@contextmanager
def registered(
    name: str, worker: Callable[[WorkerContext, Any], Awaitable[None]]
) -> Iterator[None]:
    """Register a throwaway strategy for the duration of a test."""
    REGISTRY[name] = StrategySpec(name, "test strategy", NoOptions, worker)
    try:
        yield
    finally:
        del REGISTRY[name]


def run_counting(
    cfg: ExperimentConfig,
    worker: Callable[[WorkerContext, Any], Awaitable[None]],
    options: Any,
    die: frozenset[int] = frozenset(),
) -> tuple[RunResult, dict[int, int]]:
    """Run `worker` under a test name; return the result and each rank's iteration count.
    Ranks in `die` stop at once (a crashed worker that never sends)."""
    counts: dict[int, int] = {}

    async def counting(ctx: WorkerContext, _: Any) -> None:
        try:
            if ctx.rank not in die:
                await worker(ctx, options)
        finally:
            counts[ctx.rank] = ctx.iteration

    with registered("t-counting", counting):
        renamed = cfg.strategy.model_copy(update={"name": "t-counting", "options": {}})
        result = run_sim(cfg.model_copy(update={"strategy": renamed}), progress=False)
    return result, counts
