"""The Python API: train from a program as `dlion train` does from the shell.

import dlion
out = dlion.run("examples/custom/config.yaml", ["train.seed=1"], out="runs/mine")
out.summary["tta_s"], out.points[-1].mean_acc, out.model  # the trained nn.Module
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dlion.core.config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from dlion.report import EvalPoint


@dataclass(frozen=True)
class RunOutput:
    summary: dict[str, Any]  # what summary.json holds
    points: list[EvalPoint]  # every evaluation (time, mean and worst replica metric, ...)
    model: nn.Module | None  # the saved replica (output.save_model), None when off
    out_dir: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | None = None,
    *,
    out: str | Path | None = None,
    engine: str | None = None,
    progress: bool = False,
    force: bool = False,
) -> RunOutput:
    """Run one training job. `config`: a YAML path, a shipped scenario name, a dict as the
    YAML would hold, or an ExperimentConfig; `overrides`: "a.b=value" strings as `--set`
    takes; `out`: the output directory (default: a temporary one, removed afterwards, with
    the model still returned), under the same policy as `dlion train --out` (an earlier
    output is replaced only with `force`, the user's files never); `engine`: sim or dist
    (default: the config's)."""
    extra = list(overrides or [])
    if engine is not None:
        extra.insert(0, f"engine.name={engine}")
    cfg = _resolve(config, extra)
    from dlion.core.registry import check_options

    # A typo in strategy options: one ConfigError before anything runs (a loaded file is
    # checked by load_config; a dict or config object here).
    check_options(cfg.strategy.name, cfg.strategy.options)
    if out is not None:
        from dlion.core.outdir import open_output

        output = open_output(Path(out), command="train", force=force, option="out")
        with output.writing() as work:
            result = _run_in(cfg, work, progress)
        return RunOutput(result.summary, result.points, result.model, Path(out), result.events)
    with tempfile.TemporaryDirectory(prefix="dlion-run-") as tmp:
        result = _run_in(cfg, Path(tmp), progress)
        return RunOutput(result.summary, result.points, result.model, None, result.events)


def _resolve(
    config: str | Path | dict[str, Any] | ExperimentConfig, overrides: list[str]
) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        raw = config.model_dump(mode="json")
        return config_from_dict(apply_overrides(raw, overrides), config.name)
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(config, overrides), "config")
    return load_config(str(config), overrides)


def _run_in(cfg: ExperimentConfig, out_dir: Path, progress: bool) -> RunOutput:
    from dlion.training.model_io import MODEL_FILE, load_model

    if cfg.engine.name == "dist":
        from dlion.engines.launcher import run_dist

        result = run_dist(cfg, out_dir=out_dir, progress=progress)
    else:
        from dlion.engines.sim import run_sim

        result = run_sim(cfg, out_dir=out_dir, progress=progress)
    model = load_model(out_dir) if (out_dir / MODEL_FILE).is_file() else None
    return RunOutput(result.summary, result.points, model, out_dir, result.events)
