"""Checks a config must pass before any process of a job starts.

The engines import no strategy (DESIGN.md), so the launcher cannot check
`strategy.options` itself; the entry points (`dlion train`, `python -m dlion.worker`
under torchrun) call `check_strategy` right after loading the config. A typo in an
option is then one line and exit 2 in about a second, not a failure inside every worker
after the job has started.
"""

from __future__ import annotations

from dlion.config import ExperimentConfig
from dlion.errors import ConfigError


def check_strategy(cfg: ExperimentConfig) -> None:
    """The strategy exists (plugins from DLION_PLUGINS loaded) and its options validate;
    ConfigError naming the field otherwise."""
    from dlion.registry import get_strategy, parse_options

    parse_options(get_strategy(cfg.strategy.name), cfg.strategy.options)


def check_world_size(world: int, workers: int) -> None:
    """Under torchrun every rank plays one `cluster.workers` entry: the counts must match."""
    if world != workers:
        raise ConfigError(
            f"torchrun started {world} processes (WORLD_SIZE={world}) but the config "
            f"describes {workers} workers (cluster.workers): use --nnodes x --nproc-per-node "
            f"= {workers}"
        )
