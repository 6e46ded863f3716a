"""Evaluation of selective query (Kag et al., ICLR '23) on labelled inputs: accuracy, cloud
share and expected latency per target coverage for the router and the baselines (edge-only,
cloud-only, entropy and max-softmax thresholding, the oracle router), and the threshold-sweep
accuracy/latency curves."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dlion.hybrid.calibrate import check_coverage, keep_mask, send_top_fraction
from dlion.hybrid.inference import METHODS, edge_scores, predict
from dlion.hybrid.latency import expected_latency
from dlion.hybrid.proxy import oracle_scores
from dlion.hybrid.store import HybridRun

ORACLE = "oracle"
EDGE_ONLY = "edge-only"
CLOUD_ONLY = "cloud-only"
SWEEP_STEPS = 100  # the curves have a point every 1% of coverage
NO_EXCESS_LOSS = 0.005  # "no excess loss": within 0.5 accuracy points of cloud-only


@dataclass(frozen=True)
class Point:
    """One operating point of one method on the evaluated inputs."""

    method: str
    target: float | None  # requested coverage; None for edge-only and cloud-only
    coverage: float  # achieved share answered on the edge
    accuracy: float
    cloud_fraction: float  # 1 - coverage
    latency_s: float  # expected latency per input


@dataclass(frozen=True)
class NoLossPoint:
    """The lowest-latency point of a curve within NO_EXCESS_LOSS of cloud-only accuracy."""

    method: str
    coverage: float
    accuracy: float
    latency_s: float
    latency_reduction: float  # 1 - latency / cloud-only latency (negative: slower)


@dataclass(frozen=True)
class Evaluation:
    points: list[Point]  # edge-only, cloud-only, then per target: METHODS + oracle
    curves: dict[str, list[Point]]  # method -> threshold sweep on these inputs
    no_loss: list[NoLossPoint]
    n: int

    def point(self, method: str, target: float | None) -> Point:
        for p in self.points:
            if p.method == method and p.target == target:
                return p
        raise KeyError((method, target))

    def to_json(self) -> dict[str, object]:
        return {
            "n": self.n,
            "points": [asdict(p) for p in self.points],
            "curves": {m: [asdict(p) for p in ps] for m, ps in self.curves.items()},
            "no_loss": [asdict(p) for p in self.no_loss],
        }


def _point(
    run: HybridRun,
    method: str,
    target: float | None,
    keep: torch.Tensor,
    edge_correct: torch.Tensor,
    cloud_correct: torch.Tensor,
) -> Point:
    correct = torch.where(keep, edge_correct, cloud_correct)
    coverage = float(keep.float().mean())
    lat = run.latency
    # Thresholding needs no router on the edge; the oracle stands in for a router.
    edge_s = lat.edge_s if method in (ORACLE, "router") else lat.edge_model_s
    if method == "knn":
        edge_s = lat.edge_model_s + lat.knn_s
    latency_s = expected_latency(edge_s, lat.uplink_s, lat.cloud_s, coverage)
    return Point(method, target, coverage, float(correct.float().mean()), 1 - coverage, latency_s)


def random_accuracy(edge_accuracy: float, cloud_accuracy: float, coverage: float) -> float:
    """Expected accuracy of routing at random with a share `coverage` kept on the edge."""
    return coverage * edge_accuracy + (1 - coverage) * cloud_accuracy


def gap_closed(accuracy: float, random: float, oracle: float) -> float | None:
    """Share of the gap between random routing and the oracle, at the same coverage, that a
    router closes (RouteLLM's performance-gap-recovered with the oracle as the strong end and
    random routing as the weak end); None when the oracle is no better than random."""
    if oracle - random <= 1e-12:
        return None
    return (accuracy - random) / (oracle - random)


def no_loss_point(curve: list[Point], cloud_accuracy: float, cloud_latency: float) -> NoLossPoint:
    """Largest-coverage (so lowest-latency) point with accuracy >= cloud-only - 0.5 points.
    A sweep's coverage-0 point sends everything and so always qualifies."""
    good = [p for p in curve if p.accuracy >= cloud_accuracy - NO_EXCESS_LOSS - 1e-12]
    if not good:
        raise ValueError("no point of the curve is within the loss budget; sweep from 0")
    best = max(good, key=lambda p: (p.coverage, p.accuracy))
    reduction = 1 - best.latency_s / cloud_latency
    return NoLossPoint(best.method, best.coverage, best.accuracy, best.latency_s, reduction)


def evaluate(
    run: HybridRun, x: torch.Tensor, y: torch.Tensor, coverages: list[float]
) -> Evaluation:
    """Every method at every target coverage (thresholds from the validation calibration;
    the oracle, which knows the labels, sends exactly the requested share), plus curves."""
    targets = [check_coverage(c) for c in coverages]
    scored = edge_scores(run.models, x)
    edge_correct = scored.edge_pred == y
    cloud_correct = predict(run.models.cloud, x) == y
    scores = dict(scored.scores)
    scores[ORACLE] = oracle_scores(edge_correct, cloud_correct)
    lat = run.latency
    cloud_acc = float(cloud_correct.float().mean())
    points = [
        Point(EDGE_ONLY, None, 1.0, float(edge_correct.float().mean()), 0.0, lat.edge_model_s),
        Point(CLOUD_ONLY, None, 0.0, cloud_acc, 1.0, lat.cloud_only()),
    ]
    for target in targets:
        for method in METHODS:
            keep = keep_mask(scores[method], run.calibration.threshold(method, target))
            points.append(_point(run, method, target, keep, edge_correct, cloud_correct))
        keep = send_top_fraction(scores[ORACLE], target)
        points.append(_point(run, ORACLE, target, keep, edge_correct, cloud_correct))
    curves: dict[str, list[Point]] = {}
    for method in (*METHODS, ORACLE):
        curves[method] = [
            _point(
                run,
                method,
                step / SWEEP_STEPS,
                send_top_fraction(scores[method], step / SWEEP_STEPS),
                edge_correct,
                cloud_correct,
            )
            for step in range(SWEEP_STEPS + 1)
        ]
    no_loss = [no_loss_point(curves[m], cloud_acc, lat.cloud_only()) for m in curves]
    return Evaluation(points, curves, no_loss, len(y))
