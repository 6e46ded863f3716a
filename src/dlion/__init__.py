"""dlion: decentralized deep learning across heterogeneous micro-clouds.

The Python API (imported on first use, so `import dlion` stays light):
- `dlion.run(config, overrides, out=..., engine=...)` trains and returns the summary,
  the evaluation points and the trained model (api.py);
- `dlion.load_model(run_dir)` returns a run's saved `nn.Module` (training/model_io.py);
- `dlion.register_strategy(name, worker, options_model)` adds a strategy
  (strategies/__init__.py; `DLION_PLUGINS` names modules that do so).
"""

from typing import Any

__version__ = "0.1.0"

_API = {
    "run": "dlion.api",
    "RunOutput": "dlion.api",
    "load_model": "dlion.training.model_io",
    "register_strategy": "dlion.core.registry",
}

__all__ = ["RunOutput", "__version__", "load_model", "register_strategy", "run"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dlion' has no attribute {name!r}")
