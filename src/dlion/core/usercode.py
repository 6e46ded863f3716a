"""Import the user's code named in a config as "pkg.module:attr", the way Python would.

The current directory and `PYTHONPATH` are searched, in every process that needs it (the
sim, the dist launcher and each worker, torchrun ranks), so a config naming
"my_models:resnet" works wherever the user runs `dlion` from. Failures are ConfigErrors
naming the config field and the cause, never a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from dlion.core.errors import ConfigError


def is_reference(name: str) -> bool:
    """True for "pkg.module:attr" (a user's callable), False for a built-in name."""
    return ":" in name


def load_object(reference: str, field: str) -> Any:
    """The object `reference` ("pkg.module:attr.sub") names; ConfigError naming `field`."""
    module_name, _, attr_path = reference.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"{field}: expected 'package.module:name', got {reference!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # Console scripts do not put the working directory on the path; `python -m` does.
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{field}: cannot import {module_name!r} ({exc}); run from the directory that "
            "holds it or add it to PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(
            f"{field}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj


def load_callable(reference: str, field: str) -> Callable[..., Any]:
    obj = load_object(reference, field)
    if not callable(obj):
        raise ConfigError(f"{field}: {reference!r} is not callable")
    return obj


def call_user(fn: Callable[..., Any], field: str, *args: Any, **kwargs: Any) -> Any:
    """Call the user's `fn`; an exception becomes a one-line ConfigError naming `field`."""
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{field}: calling {_name(fn)} failed: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{field}: {_name(fn)} raised {type(exc).__name__}: {exc}") from None


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """True when `fn` takes a keyword argument `name` (or **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return params[name].kind is not inspect.Parameter.POSITIONAL_ONLY
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"
