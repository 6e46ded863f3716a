"""The stacked router: entropy thresholding plus a learned linear correction, trained on the
deployed edge's outputs on held-out data, and only as large as cross-validation allows.

Rule (issue 21; RESULTS.md section 4 explains why the other learned routers trailed entropy):
- features per input (`stack_features`), all from the edge device's own outputs:
  0. H(p), the entropy of the deployed edge's softmax p (the base score, never penalised);
  1. 1 - max p;  2. the top-2 margin p(1) - p(2);
  3. H(p_bar), the entropy of the mean softmax p_bar of the deployed edge and the
     cross-fitting fold edges (the `router.folds` extra edges the kNN's labels need anyway;
     they ship with the router and run beside the edge);
  4. 1 - p_bar(y_hat), the ensemble's doubt about the deployed edge's class y_hat;
  5. the share of fold edges that disagree with y_hat;
  6.. one-hot of y_hat (classes the cloud fixes more often than others);
  disagreement between independently trained models is a better error signal than one
  model's entropy (deep ensembles, Lakshminarayanan et al., NeurIPS '17);
- target: the benefit of sending, `cloud right - edge right` in {-1, 0, 1}, observed on the
  validation split, which neither the deployed models nor the fold edges were trained on: the
  router is fitted on the distribution it is applied to (the cross-fitted labels of the kNN
  come from fold models that are less confident than the deployed edge);
- model: ridge regression on standardised features, score = the fitted expected benefit.
  The intercept and the entropy weight are free; the other weights pay LAMBDA * n * |w|^2
  (`fit_stacked`). LAMBDA = inf drops them: the score is a + b * H(p), entropy
  thresholding itself (b > 0 wherever the edge errs more when less certain);
- LAMBDA is chosen from `router.stack_lambdas` (inf always included) by repeated K-fold
  cross-validation on the validation split (`CV_FOLDS` folds x `CV_REPEATS` shuffles),
  scored by the mean routed accuracy at coverages 0.5-0.9 of the held-out folds
  (`knn.routed_accuracy`); ties go to the larger LAMBDA (closer to entropy). So the learned
  part is used only where it predicts the benefit better than entropy on held-out data.
The router's scores depend only on the inputs and the fitted weights, never on the labels of
the inputs it scores. Thresholds are calibrated on the same validation scores as for every
method: calibration uses only the scores' quantiles, not the labels.
Measured (RESULTS.md section 4, 3 seeds): it beats entropy at every coverage 0.5-0.9 on
digits and mnist1d at exact coverage and closes 0.53 / 0.43 of the oracle gap (entropy 0.44
/ 0.39); it costs `router.folds` (3) extra edge forwards per input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dlion.hybrid.knn import routed_accuracy
from dlion.hybrid.models import SplitModel
from dlion.hybrid.proxy import entropy

CV_FOLDS = 5  # folds of the validation split per shuffle
CV_REPEATS = 5  # shuffles: one 5-fold split of a few hundred inputs is noisy
CV_SEED = 0  # the shuffles are fixed, so the choice is reproducible
BASE_FEATURES = 6  # features 0..5 above; the one-hot of the edge's class follows


def stack_features(edge_logits: torch.Tensor, fold_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Features (n, 6 + classes) from the deployed edge's logits (n, classes) and each fold
    edge's logits on the same inputs; float64, column 0 is the entropy of the edge."""
    p = torch.softmax(edge_logits.double(), dim=1)
    pred = p.argmax(dim=1)
    top = p.topk(2, dim=1).values
    members = [p, *(torch.softmax(f.double(), dim=1) for f in fold_logits)]
    p_bar = torch.stack(members).mean(dim=0)
    if fold_logits:
        fold_preds = torch.stack([f.argmax(dim=1) for f in fold_logits])
        disagree = (fold_preds != pred[None]).double().mean(dim=0)
    else:
        disagree = torch.zeros(len(p), dtype=torch.float64)
    columns = [
        entropy(p),
        1 - top[:, 0],
        top[:, 0] - top[:, 1],
        entropy(p_bar),
        1 - p_bar.gather(1, pred[:, None])[:, 0],
        disagree,
    ]
    one_hot = nn.functional.one_hot(pred, p.shape[1]).double()
    return torch.cat([torch.stack(columns, dim=1), one_hot], dim=1)


def fit_stacked(
    features: torch.Tensor, benefit: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge fit of `benefit` (n,) on standardised `features` (n, d): returns (mean, std,
    weights) with weights[0] the intercept, weights[1] the entropy's (column 0, free) and
    weights[2:] the penalised rest; lam = inf fits the intercept and entropy only (the rest 0).
    Minimises |benefit - Z w|^2 + lam * n * |w[2:]|^2 with Z = [1, (features - mean) / std]."""
    if lam < 0 or math.isnan(lam):
        raise ValueError(f"lambda must be >= 0 or inf, got {lam}")
    x = features.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0).nan_to_num(1.0).clamp_min(1e-6)  # constant columns (one class) stay 0
    z = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), (x - mean) / std], dim=1)
    t = benefit.double()
    free = 2  # intercept and entropy
    weights = torch.zeros(z.shape[1], dtype=torch.float64)
    if math.isinf(lam):
        weights[:free] = torch.linalg.lstsq(z[:, :free], t[:, None]).solution[:, 0]
        return mean, std, weights
    penalty = torch.full((z.shape[1],), lam * len(x), dtype=torch.float64)
    penalty[:free] = 0.0
    # A tiny ridge on the free weights keeps the system solvable when entropy is constant.
    gram = z.T @ z + torch.diag(penalty + 1e-9)
    weights = torch.linalg.solve(gram, z.T @ t)
    return mean, std, weights


def stacked_scores(
    features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Send scores (n,) float32: the fitted expected benefit of sending each input."""
    z = (features.double() - mean) / std
    return (weights[0] + z @ weights[1:]).float()


def cv_fold_ids(n: int, folds: int, repeat: int) -> torch.Tensor:
    """Fold of each of n inputs for shuffle `repeat`: position i of a seeded permutation goes
    to fold i mod folds."""
    generator = torch.Generator().manual_seed(CV_SEED + repeat)
    ids = torch.empty(n, dtype=torch.int64)
    ids[torch.randperm(n, generator=generator)] = torch.arange(n) % folds
    return ids


def choose_lambda(
    features: torch.Tensor,
    edge_correct: torch.Tensor,
    cloud_correct: torch.Tensor,
    lambdas: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """The lambda (inf always a candidate) with the best cross-validated routed accuracy, the
    largest on ties, and each candidate's score."""
    n = len(features)
    folds = min(CV_FOLDS, n)
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 inputs, got {n}")
    benefit = cloud_correct.double() - edge_correct.double()
    candidates = sorted({math.inf, *lambdas}, reverse=True)
    results: dict[float, float] = {}
    for lam in candidates:
        total = 0.0
        for repeat in range(CV_REPEATS):
            ids = cv_fold_ids(n, folds, repeat)
            for f in range(folds):
                held = ids == f
                mean, std, w = fit_stacked(features[~held], benefit[~held], lam)
                scores = stacked_scores(features[held], mean, std, w)
                total += routed_accuracy(scores, edge_correct[held], cloud_correct[held])
        results[lam] = total / (CV_REPEATS * folds)
    # Rounded so that float noise between equal rankings does not pick a smaller lambda.
    best = max(candidates, key=lambda lam: (round(results[lam], 9), lam))
    return best, results


class StackedRouter(nn.Module):
    """The fold edges, the standardisation and the ridge weights (buffers, saved as
    safetensors with the run; the chosen lambda goes to run.json's info).
    forward(x, edge_logits) -> send scores (n,)."""

    # Buffers (register_buffer below), declared for the type checker.
    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor

    def __init__(self, fold_edges: Sequence[SplitModel], num_classes: int) -> None:
        super().__init__()
        self.fold_edges = nn.ModuleList(fold_edges)
        d = BASE_FEATURES + num_classes
        self.register_buffer("mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("std", torch.ones(d, dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(d + 1, dtype=torch.float64))

    @torch.no_grad()
    def fold_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for edge in self.fold_edges:
            edge.eval()
            outs.append(edge(x))
        return outs

    def set_fit(self, mean: torch.Tensor, std: torch.Tensor, weights: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.weights.copy_(weights)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, edge_logits: torch.Tensor) -> torch.Tensor:
        features = stack_features(edge_logits, self.fold_logits(x))
        return stacked_scores(features, self.mean, self.std, self.weights)
