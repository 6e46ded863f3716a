"""Checks a job must pass before any process of it starts, beyond the config itself
(whose strategy options `load_config` validates through the registry).
"""

from __future__ import annotations

from dlion.core.errors import ConfigError


def check_world_size(world: int, workers: int) -> None:
    """Under torchrun every rank plays one `cluster.workers` entry: the counts must match."""
    if world != workers:
        raise ConfigError(
            f"torchrun started {world} processes (WORLD_SIZE={world}) but the config "
            f"describes {workers} workers (cluster.workers): use --nnodes x --nproc-per-node "
            f"= {workers}"
        )
