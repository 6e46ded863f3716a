"""Measured latency of selective query (Kag et al., ICLR '23) on this machine's CPU, beside
the FLOP-based model of latency.py: the edge model, each router and the cloud model are run
on one input at a time (an edge device answers inputs as they come) and timed, and the whole
routed pipeline is run input by input over a test set: edge, send score, and the cloud model
only for the inputs sent. Everything runs on the same CPU, so "cloud" here is the cloud
model's compute on this CPU; the uplink is not measured (no network) and is added from the
latency model where a figure includes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.utils import benchmark

from dlion.hybrid.gain import gain_features, gain_score
from dlion.hybrid.inference import HybridModels
from dlion.hybrid.proxy import entropy, router_features
from dlion.hybrid.stacked import StackedRouter

MIN_RUN_TIME_S = 0.2  # per timed component: enough blocks for a stable median

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def scorer(models: HybridModels, method: str) -> Scorer:
    """The send score of `method` from (input, edge features, edge logits), computing only
    what that method needs."""

    def router(x: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if isinstance(models.router, StackedRouter):
            return models.router(x, logits)
        if models.design == "gain":
            return gain_score(models.router(gain_features(x, logits, models.top_k)))
        return models.router(router_features(features, logits, models.top_k))

    def knn(x: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        return models.knn(gain_features(x, logits, models.top_k), entropy(probs))

    def entropy_score(
        x: torch.Tensor, features: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        return entropy(torch.softmax(logits, dim=1))

    scorers: dict[str, Scorer] = {"router": router, "knn": knn, "entropy": entropy_score}
    if method not in scorers:
        raise ValueError(f"no measured scorer for {method!r} (have {', '.join(scorers)})")
    return scorers[method]


def _median_s(fn: Callable[[], object]) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return float(timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S).median)


@dataclass(frozen=True)
class MeasuredComponents:
    """Median seconds per input (batch of one) of each part, on this CPU."""

    edge_s: float  # edge model forward (features and logits)
    router_s: float  # router on top of the edge's outputs
    knn_s: float  # kNN router on top of the edge's outputs
    entropy_s: float  # entropy of the edge's softmax
    cloud_s: float  # cloud model forward

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def measure_components(models: HybridModels, x: torch.Tensor) -> MeasuredComponents:
    """Time each part on the first input of `x`."""
    for m in (models.edge, models.cloud, models.router, models.knn):
        m.eval()
    one = x[:1]
    features, logits = models.edge.features_and_logits(one)
    parts = {}
    for name in ("router", "knn", "entropy"):
        score = scorer(models, name)
        parts[name] = _median_s(partial(score, one, features, logits))
    return MeasuredComponents(
        edge_s=_median_s(lambda: models.edge.features_and_logits(one)),
        router_s=parts["router"],
        knn_s=parts["knn"],
        entropy_s=parts["entropy"],
        cloud_s=_median_s(lambda: models.cloud(one)),
    )


@dataclass(frozen=True)
class EndToEnd:
    """One routed pass over a test set, one input at a time, on this CPU."""

    method: str
    threshold: float
    coverage: float  # share answered on the edge in this pass
    accuracy: float
    hybrid_s: float  # mean seconds per input: edge + score (+ cloud model if sent)
    cloud_only_s: float  # mean seconds per input of the cloud model alone, same inputs


@torch.no_grad()
def measure_end_to_end(
    models: HybridModels,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    threshold: float,
    repeats: int = 3,
) -> EndToEnd:
    """Route every input of `x` alone (edge, score, cloud if score > threshold) and time it;
    the fastest of `repeats` passes (the one least disturbed by other work on the host)."""
    score = scorer(models, method)
    inputs = [x[i : i + 1] for i in range(len(x))]
    best_hybrid = best_cloud = float("inf")
    kept = correct = 0
    for _ in range(repeats):
        kept = correct = 0
        start = time.perf_counter()
        for i, one in enumerate(inputs):
            features, logits = models.edge.features_and_logits(one)
            if float(score(one, features, logits)[0]) <= threshold:
                pred = int(logits.argmax(dim=1)[0])
                kept += 1
            else:
                pred = int(models.cloud(one).argmax(dim=1)[0])
            correct += pred == int(y[i])
        best_hybrid = min(best_hybrid, time.perf_counter() - start)
        start = time.perf_counter()
        for one in inputs:
            int(models.cloud(one).argmax(dim=1)[0])
        best_cloud = min(best_cloud, time.perf_counter() - start)
    n = max(len(inputs), 1)
    return EndToEnd(method, threshold, kept / n, correct / n, best_hybrid / n, best_cloud / n)
