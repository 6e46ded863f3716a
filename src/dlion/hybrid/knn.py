"""k-nearest-neighbour router: the baseline a learned router must beat (PAPERS.md section 7;
a tuned kNN router is what recent routing studies ask every learned router to beat).

Rule: the router's inputs are standardised with the statistics of its memory (the router's
training set, the same features and honest targets as the gain router, `gain.py`); an
input's send score is the inverse-distance-weighted mean, over its k nearest memory entries
(Euclidean), of their observed gain `cloud right - edge right` (in {-1, 0, 1}). Weighting by
1 / (distance + EPS) makes the scores continuous, but a neighbourhood whose gains are all 0
still scores exactly 0: such ties are broken by the edge's softmax entropy (TIE_BREAK x
entropy is added, far below the 1/k step between neighbourhoods), so thresholds can hit a
coverage.
k is tuned: each candidate is scored by cross-validation on the memory (mean routed accuracy
over coverages 0.5-0.9 on the held-out fold) and the best, smallest on ties, is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlion.hybrid.calibrate import send_top_fraction

EPS = 1e-6  # distance floor: an exact duplicate gets a large but finite weight
TIE_BREAK = 1e-4  # x entropy (at most log(classes) nats): orders tied scores only
TUNE_COVERAGES = (0.5, 0.6, 0.7, 0.8, 0.9)
_CHUNK = 512  # queries per distance matrix


def knn_scores(
    queries: torch.Tensor, memory: torch.Tensor, targets: torch.Tensor, k: int
) -> torch.Tensor:
    """Inverse-distance-weighted mean target of each query's k nearest memory rows."""
    k = min(k, len(memory))
    out = []
    for chunk in torch.split(queries, _CHUNK) if len(queries) else [queries]:
        dist, idx = torch.cdist(chunk, memory).topk(k, dim=1, largest=False)
        weights = 1.0 / (dist + EPS)
        out.append((weights * targets[idx]).sum(dim=1) / weights.sum(dim=1))
    return torch.cat(out)


def routed_accuracy(
    scores: torch.Tensor, edge_correct: torch.Tensor, cloud_correct: torch.Tensor
) -> float:
    """Mean over TUNE_COVERAGES of the accuracy when the highest scores are sent."""
    accs = []
    for c in TUNE_COVERAGES:
        keep = send_top_fraction(scores, c)
        accs.append(float(torch.where(keep, edge_correct, cloud_correct).float().mean()))
    return sum(accs) / len(accs)


def tune_k(
    inputs: torch.Tensor,
    edge_correct: torch.Tensor,
    cloud_correct: torch.Tensor,
    folds: torch.Tensor,
    ks: Sequence[int],
) -> tuple[int, dict[int, float]]:
    """The k with the best cross-validated routed accuracy (smallest on ties), and each k's
    score. `folds` gives each row's fold; rows of a fold are scored against the others."""
    gain = cloud_correct.float() - edge_correct.float()
    results: dict[int, float] = {}
    for k in ks:
        total = 0.0
        fold_values = sorted(set(folds.tolist()))
        for f in fold_values:
            held = folds == f
            mean, std = _stats(inputs[~held])
            scores = knn_scores(
                (inputs[held] - mean) / std, (inputs[~held] - mean) / std, gain[~held], k
            )
            total += routed_accuracy(scores, edge_correct[held], cloud_correct[held])
        results[k] = total / len(fold_values)
    best = max(sorted(results), key=lambda k: (results[k], -k))
    return best, results


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)


class KnnRouter(nn.Module):
    """The memory (standardised inputs and gains) and k as buffers, so the router is saved
    with the other weights as safetensors."""

    # Buffers (register_buffer below), declared for the type checker.
    mean: torch.Tensor
    std: torch.Tensor
    memory: torch.Tensor
    targets: torch.Tensor
    k: torch.Tensor

    def __init__(self, in_features: int, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.register_buffer("memory", torch.zeros(size, in_features))
        self.register_buffer("targets", torch.zeros(size))
        self.register_buffer("k", torch.ones((), dtype=torch.int64))

    def fit(
        self,
        inputs: torch.Tensor,
        edge_correct: torch.Tensor,
        cloud_correct: torch.Tensor,
        k: int,
    ) -> None:
        mean, std = _stats(inputs)
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.memory.copy_((inputs - mean) / std)
        self.targets.copy_(cloud_correct.float() - edge_correct.float())
        self.k.fill_(k)

    def forward(self, inputs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Send scores of `inputs` (gain features); `entropy` of the edge breaks ties."""
        queries = (inputs - self.mean) / self.std
        return knn_scores(queries, self.memory, self.targets, int(self.k)) + TIE_BREAK * entropy
