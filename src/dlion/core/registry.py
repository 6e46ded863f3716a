"""The registry of training strategies and FL algorithms, by name: what the CLI, config
loading and the engines look them up in. It imports no algorithm (nor anything that
imports the config, so config loading can use it): the built-ins register themselves
when `dlion.strategies` (or `dlion.fl`) is imported, which the first lookup does (so the
engines' import graph holds no algorithm, and a new strategy touches no engine).
Options are validated when a config is loaded (`check_options`, `check_fl_options`).

Plugins: `register_strategy` adds a strategy from the user's code; modules named in the
`DLION_PLUGINS` environment variable (comma-separated, importable from the current
directory or PYTHONPATH) are imported before the registry is first read, in the CLI, the
sim and every dist worker or torchrun rank (they inherit the environment), so a plugin
module only has to call `register_strategy` at import.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from dlion.core.errors import ConfigError

# The packages whose import registers the built-in strategies (strategies/__init__.py)
# and FL algorithms (fl/__init__.py).
BUILTIN_PACKAGE = "dlion.strategies"
FL_PACKAGE = "dlion.fl"

# A strategy: `async def worker(ctx: WorkerContext, options)` (context.py).
Worker = Callable[[Any, Any], Awaitable[None]]


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str
    options_model: type[BaseModel]
    worker: Worker


REGISTRY: dict[str, StrategySpec] = {}
BUILTIN: set[str] = set()
_plugins_loaded: set[str] = set()


def register_builtin(spec: StrategySpec) -> None:
    """Called by dlion.strategies for each algorithm it ships."""
    REGISTRY[spec.name] = spec
    BUILTIN.add(spec.name)


def load_builtins() -> None:
    importlib.import_module(BUILTIN_PACKAGE)


def register_strategy(
    name: str,
    worker: Worker,
    options_model: type[BaseModel] | None = None,
    summary: str = "",
) -> StrategySpec:
    """Register a strategy (an `async def worker(ctx, options)` on the context API) under
    `name`; `options_model` validates `strategy.options` (default: no options). A plugin
    may re-register its own name; built-in names are refused."""
    load_builtins()
    if not name or not isinstance(name, str):
        raise ConfigError(f"register_strategy: a strategy needs a non-empty name, got {name!r}")
    if name in BUILTIN:
        raise ConfigError(f"register_strategy: {name!r} is a built-in strategy")
    if not callable(worker):
        raise ConfigError(f"register_strategy: worker of {name!r} is not callable")
    model = options_model or _NoOptions
    spec = StrategySpec(
        name, summary or (worker.__doc__ or "").strip().split("\n")[0], model, worker
    )
    REGISTRY[name] = spec
    return spec


class _NoOptions(BaseModel):
    model_config = {"extra": "forbid"}


def load_plugins() -> None:
    """Import the modules named in DLION_PLUGINS (once each)."""
    names = [n.strip() for n in os.environ.get("DLION_PLUGINS", "").split(",") if n.strip()]
    cwd = os.getcwd()
    if names and cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for module in names:
        if module in _plugins_loaded:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                f"DLION_PLUGINS: importing {module!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        _plugins_loaded.add(module)


def get_strategy(name: str) -> StrategySpec:
    load_builtins()
    load_plugins()
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (choose from {known})")
    return REGISTRY[name]


def parse_options(spec: StrategySpec, options: dict[str, Any]) -> BaseModel:
    """Validate `strategy.options` against the strategy's own model; errors name the field."""
    return _validate(spec.options_model, options, "strategy.options", f"strategy {spec.name}")


def check_options(name: str, options: dict[str, Any]) -> None:
    """Config loading: strategy `name` exists (plugins loaded) and `options` validate;
    ConfigError naming the field otherwise."""
    parse_options(get_strategy(name), options)


def _validate(model: type[BaseModel], options: dict[str, Any], field: str, what: str) -> BaseModel:
    try:
        return model.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{field}.{loc}: {msg} ({what})") from None


# ============================================================================ FL algorithms


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    summary: str
    options_model: type[BaseModel]
    factory: Callable[[Any, int], Any]  # (options, number of clients) -> fl.base.Algorithm
    fixed: dict[str, Any] = field(default_factory=dict)  # options a variant pins (ablations)


FL_ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register_fl_builtin(spec: AlgorithmSpec) -> None:
    """Called by dlion.fl for each algorithm it ships."""
    FL_ALGORITHMS[spec.name] = spec


def get_fl_algorithm(name: str) -> AlgorithmSpec:
    importlib.import_module(FL_PACKAGE)
    if name not in FL_ALGORITHMS:
        known = ", ".join(FL_ALGORITHMS)
        raise ConfigError(f"algorithm.name: unknown FL algorithm {name!r} (choose from {known})")
    return FL_ALGORITHMS[name]


def parse_fl_options(spec: AlgorithmSpec, options: dict[str, Any]) -> BaseModel:
    """Validate `algorithm.options` (a variant's pinned options may not be set otherwise)."""
    clash = sorted(k for k in spec.fixed if k in options and options[k] != spec.fixed[k])
    if clash:
        raise ConfigError(
            f"algorithm.options.{clash[0]}: {spec.name} fixes it to {spec.fixed[clash[0]]}"
        )
    merged = {**options, **spec.fixed}
    return _validate(spec.options_model, merged, "algorithm.options", f"algorithm {spec.name}")


def check_fl_options(name: str, options: dict[str, Any]) -> None:
    """Config loading: FL algorithm `name` exists and `options` validate."""
    parse_fl_options(get_fl_algorithm(name), options)
