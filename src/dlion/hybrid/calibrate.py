"""Threshold calibration for selective query (Kag et al., ICLR '23): pick the send-score
threshold on a validation split so that a target share of inputs stays on the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlion.core.errors import BadInput


def check_coverage(coverage: float, field: str = "coverage") -> float:
    """`coverage` as a float in (0, 1], or BadInput naming `field`."""
    if isinstance(coverage, bool) or not isinstance(coverage, int | float):
        raise BadInput(f"{field}: expected a number in (0, 1], got {coverage!r}")
    if not math.isfinite(coverage) or not 0 < coverage <= 1:
        raise BadInput(
            f"{field}: coverage must be in (0, 1] (the fraction kept on the edge), got {coverage}"
        )
    return float(coverage)


def threshold_for_coverage(val_scores: torch.Tensor, coverage: float) -> float:
    """Threshold t such that `score <= t` keeps round(coverage * n) of the validation scores
    on the edge: the midpoint between the last kept and the first sent sorted score (ties at
    the boundary are all kept). Coverage 1 keeps everything (t = +inf)."""
    coverage = check_coverage(coverage)
    ordered = torch.sort(val_scores.detach().to(torch.float64).flatten()).values
    n = ordered.numel()
    if n == 0:
        raise BadInput("calibration: no validation scores")
    kept = min(n, round(coverage * n))
    if kept == n:
        return math.inf
    if kept == 0:
        return -math.inf
    return float((ordered[kept - 1] + ordered[kept]) / 2)


def keep_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where an input stays on the edge (its send score is at most the threshold)."""
    # float64 so a float32 score equal to a neighbour of the midpoint is not rounded onto it.
    return scores.detach().to(torch.float64) <= threshold


def send_top_fraction(scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """Keep mask that sends exactly the round((1 - coverage) * n) highest scores; ties are
    broken by input order (stable sort). Used for the oracle and the threshold sweep, which
    also takes coverage 0 (send everything)."""
    if not 0 <= coverage <= 1:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    n = scores.numel()
    sent = n - min(n, round(coverage * n))
    order = torch.sort(scores.detach().flatten(), descending=True, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:sent]] = False
    return keep


@dataclass(frozen=True)
class Calibration:
    """Validation send scores of each routing method; the threshold for any target coverage
    derives from them, so `eval` can ask for coverages the training run never saw."""

    val_scores: dict[str, torch.Tensor]  # method -> float32 (n_val,)

    def threshold(self, method: str, coverage: float) -> float:
        if method not in self.val_scores:
            known = ", ".join(self.val_scores)
            raise BadInput(f"calibration: no scores for method {method!r} (have {known})")
        return threshold_for_coverage(self.val_scores[method], coverage)

    def to_json(self) -> dict[str, list[float]]:
        return {method: scores.tolist() for method, scores in self.val_scores.items()}

    @classmethod
    def from_json(cls, data: object, where: str) -> Calibration:
        """Validate a parsed calibration.json: {method: [finite numbers, ...]}."""
        if not isinstance(data, dict) or not data:
            raise BadInput(f"{where}: expected an object of score lists")
        out: dict[str, torch.Tensor] = {}
        for method, values in data.items():
            numbers = isinstance(values, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            )
            if not numbers or not values:
                raise BadInput(f"{where}: {method!r} must be a non-empty list of numbers")
            scores = torch.tensor(values, dtype=torch.float32)
            if not torch.isfinite(scores).all():
                raise BadInput(f"{where}: {method!r} holds NaN or Inf")
            out[str(method)] = scores
        return cls(out)
