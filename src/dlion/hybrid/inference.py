"""Run the selective-query models (Kag et al., ICLR '23) on inputs: edge and cloud
predictions, and the send scores of every routing method (higher = more worth sending)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlion.hybrid.gain import gain_features, gain_score
from dlion.hybrid.knn import KnnRouter
from dlion.hybrid.models import SplitModel
from dlion.hybrid.proxy import entropy, router_features
from dlion.hybrid.router import Router
from dlion.hybrid.stacked import StackedRouter

_CHUNK = 1024  # inputs per forward pass: bounds memory on large input files

# Routing methods that need only the edge's outputs, calibrated on validation scores.
METHODS: tuple[str, ...] = ("router", "knn", "entropy", "max_softmax")


@dataclass
class HybridModels:
    edge: SplitModel
    cloud: SplitModel
    router: Router | StackedRouter
    knn: KnnRouter  # k-nearest-neighbour baseline on the gain router's features
    top_k: int  # router feature setting the router was trained with
    design: str  # router.design: "paper", "gain" or "stacked"


@dataclass(frozen=True)
class EdgeScores:
    """Per input: the edge's prediction and each method's send score."""

    edge_pred: torch.Tensor  # int64 (n,)
    scores: dict[str, torch.Tensor]  # method -> float32 (n,)


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(x, _CHUNK)) if len(x) else [x]


@torch.no_grad()
def edge_outputs(edge: SplitModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of the edge model."""
    edge.eval()
    parts = [edge.features_and_logits(chunk) for chunk in _chunks(x)]
    features = torch.cat([f.reshape(f.shape[0], -1) for f, _ in parts])
    return features, torch.cat([logits for _, logits in parts])


@torch.no_grad()
def predict(model: SplitModel, x: torch.Tensor) -> torch.Tensor:
    """Class predictions of a model (the cloud, or the edge alone)."""
    model.eval()
    return torch.cat([model(chunk).argmax(dim=1) for chunk in _chunks(x)])


@torch.no_grad()
def edge_scores(models: HybridModels, x: torch.Tensor) -> EdgeScores:
    """What the edge device computes for each input: its prediction and the send scores of
    the router (its logit), entropy thresholding and max-softmax thresholding."""
    features, logits = edge_outputs(models.edge, x)
    probs = torch.softmax(logits, dim=1)
    models.router.eval()
    knn_inputs = gain_features(x, logits, models.top_k)
    if isinstance(models.router, StackedRouter):
        router = models.router(x, logits)
    elif models.design == "gain":
        router = gain_score(models.router(knn_inputs))
    else:
        router = models.router(router_features(features, logits, models.top_k))
    return EdgeScores(
        edge_pred=logits.argmax(dim=1),
        scores={
            "router": router,
            "knn": models.knn(knn_inputs, entropy(probs)),
            "entropy": entropy(probs),
            "max_softmax": -probs.max(dim=1).values,
        },
    )
