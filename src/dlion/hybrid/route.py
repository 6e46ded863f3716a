"""Route new inputs with a saved selective-query run (Kag et al., ICLR '23): the edge answers
what the router keeps at the calibrated threshold; the rest is sent to the cloud model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlion.core.errors import DataError
from dlion.data.readers import load_npz_arrays, validate_arrays
from dlion.hybrid.calibrate import check_coverage, keep_mask
from dlion.hybrid.inference import edge_scores, predict
from dlion.hybrid.store import HybridRun


@dataclass(frozen=True)
class Routed:
    keep: torch.Tensor  # bool (n,): answered on the edge
    prediction: torch.Tensor  # int64 (n,): the edge's answer, or the cloud's for sent inputs
    coverage: float  # requested
    threshold: float  # router send-score threshold from the validation calibration
    latency_s: float  # expected latency per input at the achieved coverage

    @property
    def sent(self) -> torch.Tensor:
        """Indices of the inputs sent to the cloud."""
        return torch.nonzero(~self.keep).flatten()


def read_inputs(
    path: Path, input_shape: tuple[int, ...], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs `x` (n, *input_shape) and optional labels `y` from an npz file, validated."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # an npz is a zip archive
            raise DataError(f"{path}: not an npz archive (write it with numpy.savez(path, x=...))")
    arrays = load_npz_arrays(path)
    if "x" not in arrays:
        raise DataError(f"{path}: missing array 'x' (found {sorted(arrays)})")
    x, y = arrays["x"], arrays.get("y")
    count = x.shape[0] if x.ndim >= 1 else 0
    labels = validate_arrays(x, y if y is not None else np.zeros(count, np.int64), str(path))
    if tuple(x.shape[1:]) != input_shape:
        raise DataError(
            f"{path}: 'x' has shape {tuple(x.shape)}; this run needs (n, "
            f"{', '.join(str(d) for d in input_shape)})"
        )
    if y is not None and labels.max() >= num_classes:
        raise DataError(f"{path}: 'y' has label {labels.max()}; this run has {num_classes} classes")
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return inputs, torch.from_numpy(labels) if y is not None else None


def route(run: HybridRun, x: torch.Tensor, coverage: float) -> Routed:
    """Decide edge or cloud for each input; only the sent inputs run the cloud model."""
    coverage = check_coverage(coverage, "--coverage")
    threshold = run.calibration.threshold("router", coverage)
    scored = edge_scores(run.models, x)
    keep = keep_mask(scored.scores["router"], threshold)
    prediction = scored.edge_pred.clone()
    if (~keep).any():
        prediction[~keep] = predict(run.models.cloud, x[~keep])
    achieved = float(keep.float().mean()) if len(keep) else 1.0
    return Routed(keep, prediction, coverage, threshold, run.latency.hybrid(achieved))
