"""Training for selective query (Kag et al., ICLR '23): the cloud model, the edge model, then
alternating rounds of router training on proxy labels and edge fine-tuning on the inputs the
router keeps; finally threshold calibration scores on a validation split."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import train_test_split
from torch import nn

from dlion.core.errors import DataError, DlionError
from dlion.data import load_dataset
from dlion.hybrid.calibrate import Calibration
from dlion.hybrid.config import HybridConfig, TrainConfig
from dlion.hybrid.gain import fold_ids, gain_features, gain_loss
from dlion.hybrid.inference import HybridModels, edge_outputs, edge_scores, predict
from dlion.hybrid.knn import tune_k
from dlion.hybrid.latency import build_latency_model, forward_flops
from dlion.hybrid.models import SplitModel
from dlion.hybrid.proxy import proxy_labels, router_features
from dlion.hybrid.router import Router, router_loss
from dlion.hybrid.stacked import StackedRouter, choose_lambda, fit_stacked, stack_features
from dlion.hybrid.store import HybridRun, build_models, fold_seed_offsets

Batch = tuple[torch.Tensor, torch.Tensor]

# Offsets of cfg.seed for each random stream, so no two consumers share one.
_SHUFFLE_CLOUD, _SHUFFLE_EDGE, _SHUFFLE_ROUTER, _SPLIT, _FOLDS = 11, 12, 13, 14, 15


@dataclass(frozen=True)
class Splits:
    """fit trains edge and cloud; router trains the router (fit itself when router_fraction
    is 0); val calibrates thresholds; test is the dataset's test split, only for eval."""

    fit: Batch
    router: Batch
    val: Batch
    test: Batch
    input_shape: tuple[int, ...]
    num_classes: int


def _split_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) index arrays; stratified when every class can appear on both sides."""
    idx = np.arange(len(y))
    try:
        rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        try:
            rest, held = train_test_split(idx, test_size=fraction, random_state=seed)
        except ValueError as exc:
            raise DataError(
                f"data: cannot hold out {fraction} of {len(y)} samples: {exc}"
            ) from None
    return np.sort(rest), np.sort(held)


def load_splits(cfg: HybridConfig) -> Splits:
    d = cfg.data
    ds = load_dataset(
        d.name,
        path=d.path,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        num_samples=d.num_samples,
    )
    x, y = ds.x_train, ds.y_train
    rest, val = _split_indices(y.numpy(), d.val_fraction, cfg.seed + _SPLIT)
    if d.router_fraction > 0:
        share = d.router_fraction / (1 - d.val_fraction)  # of what is left after val
        fit_pos, router_pos = _split_indices(y[rest].numpy(), share, cfg.seed + _SPLIT)
        fit, router = rest[fit_pos], rest[router_pos]
    else:
        fit = router = rest
    return Splits(
        fit=(x[fit], y[fit]),
        router=(x[router], y[router]),
        val=(x[val], y[val]),
        test=(ds.x_test, ds.y_test),
        input_shape=ds.input_shape,
        num_classes=ds.num_classes,
    )


# ----------------------------------------------------------------------------- progress


class _Bar:
    """A rich bar over training epochs (all phases); silent when disabled."""

    def __init__(self, description: str, total: int, enabled: bool, console: Console | None):
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epochs  {task.fields[phase]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._progress.add_task(description, total=total, phase="")

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def ticker(self, phase: str) -> Callable[[float], None]:
        def tick(loss: float) -> None:
            if self._progress is not None:
                self._progress.update(self._task, advance=1, phase=f"{phase} loss {loss:.3f}")

        return tick


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- training


def _check_finite(loss: float, lr_field: str) -> None:
    # A diverged model would be saved with NaN weights that no later command can load.
    if not math.isfinite(loss):
        raise DlionError(f"training diverged (loss {loss}); lower {lr_field}")


def fit_classifier(
    model: nn.Module,
    data: Batch,
    *,
    epochs: int,
    train: TrainConfig,
    seed: int,
    weights: torch.Tensor | None = None,
    on_epoch: Callable[[float], None] = lambda loss: None,
) -> float:
    """Adam on (optionally per-input weighted) cross-entropy; returns the last epoch's loss."""
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(x), train.batch_size):
            idx = order[start : start + train.batch_size]
            losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
            if weights is None:
                loss = losses.mean()
            else:
                w = weights[idx]
                loss = (w * losses).sum() / w.sum().clamp_min(1e-12)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        mean_loss = total / max(count, 1)
        _check_finite(mean_loss, "train.lr")
        on_epoch(mean_loss)
    return mean_loss


def train_router(
    edge: SplitModel,
    data: Batch,
    cloud_correct: torch.Tensor,
    cfg: HybridConfig,
    seed: int,
    on_epoch: Callable[[float], None] = lambda loss: None,
) -> tuple[Router, float]:
    """A fresh router fitted to proxy labels of the current edge; returns it and the share of
    "send" labels."""
    x, y = data
    features, logits = edge_outputs(edge, x)
    inputs = router_features(features, logits, cfg.router.top_k)
    proxy = proxy_labels(logits.argmax(dim=1) == y, cloud_correct)
    router = Router(inputs.shape[1], cfg.router.hidden, cfg.seed + 2)
    router.fit_standardisation(inputs)
    rc = cfg.router
    opt = torch.optim.Adam(router.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    router.train()
    for _ in range(rc.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            loss = router_loss(
                router(inputs[idx]), proxy[idx], rc.train_coverage, rc.coverage_penalty
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        _check_finite(total, "router.lr")
        on_epoch(total / max(len(x), 1))
    router.eval()
    return router, float(proxy.mean())


@torch.no_grad()
def keep_probabilities(models: HybridModels, x: torch.Tensor) -> torch.Tensor:
    """The router's probability of keeping each input on the edge."""
    return torch.sigmoid(-edge_scores(models, x).scores["router"])


def _accuracy(model: SplitModel, data: Batch) -> float:
    x, y = data
    return float((predict(model, x) == y).float().mean())


@dataclass(frozen=True)
class RouterData:
    """What the gain and kNN routers learn from: inputs and both models' correctness."""

    inputs: torch.Tensor  # gain_features of the router split (n, d)
    edge_correct: torch.Tensor  # bool (n,)
    cloud_correct: torch.Tensor  # bool (n,)
    folds: torch.Tensor  # int64 (n,): cross-fitting fold, reused to tune the kNN's k
    fold_edges: list[SplitModel]  # the cross-fitting edges (empty with a held-out router split)


def _fit_models(models: HybridModels, data: Batch, cfg: HybridConfig, bar: _Bar, tag: str) -> None:
    t = cfg.train
    fit_classifier(
        models.cloud,
        data,
        epochs=t.cloud_epochs,
        train=t,
        seed=cfg.seed + _SHUFFLE_CLOUD,
        on_epoch=bar.ticker(f"cloud{tag}"),
    )
    fit_classifier(
        models.edge,
        data,
        epochs=t.edge_epochs,
        train=t,
        seed=cfg.seed + _SHUFFLE_EDGE,
        on_epoch=bar.ticker(f"edge{tag}"),
    )


def router_data(cfg: HybridConfig, splits: Splits, models: HybridModels, bar: _Bar) -> RouterData:
    """Router inputs with honest correctness labels. With a held-out router split the final
    models label it; otherwise (router_fraction 0, the router split is the models' own
    training data) each of `router.folds` folds is labelled by an edge and a cloud trained
    on the other folds (cross-fitting, gain.py). The gain router and the kNN baseline learn
    from these; the paper design's router keeps its in-sample proxy labels."""
    x, y = splits.router
    folds = fold_ids(len(y), cfg.router.folds, cfg.seed + _FOLDS)
    top_k = cfg.router.top_k
    if cfg.data.router_fraction > 0:
        _, logits = edge_outputs(models.edge, x)
        edge_correct = logits.argmax(dim=1) == y
        cloud_correct = predict(models.cloud, x) == y
        return RouterData(gain_features(x, logits, top_k), edge_correct, cloud_correct, folds, [])
    logits = torch.empty(len(y), splits.num_classes)
    cloud_correct = torch.empty(len(y), dtype=torch.bool)
    fold_edges = []
    for f, offset in enumerate(fold_seed_offsets(cfg.router.folds)):
        held = folds == f
        fold_models = build_models(cfg, splits.input_shape, splits.num_classes, seed_offset=offset)
        _fit_models(fold_models, (x[~held], y[~held]), cfg, bar, f" fold {f + 1}")
        logits[held] = edge_outputs(fold_models.edge, x[held])[1]
        cloud_correct[held] = predict(fold_models.cloud, x[held]) == y[held]
        fold_edges.append(fold_models.edge)
    edge_correct = logits.argmax(dim=1) == y
    return RouterData(
        gain_features(x, logits, top_k), edge_correct, cloud_correct, folds, fold_edges
    )


def train_gain_router(
    data: RouterData,
    cfg: HybridConfig,
    seed: int,
    on_epoch: Callable[[float], None] = lambda loss: None,
) -> Router:
    """The gain router (gain.py): two logits, BCE on edge and cloud correctness."""
    rc = cfg.router
    router = Router(data.inputs.shape[1], rc.hidden, cfg.seed + 2, outputs=2)
    router.fit_standardisation(data.inputs)
    opt = torch.optim.Adam(router.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.inputs)
    router.train()
    for _ in range(rc.epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            loss = gain_loss(
                router(data.inputs[idx]), data.edge_correct[idx], data.cloud_correct[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        _check_finite(total, "router.lr")
        on_epoch(total / max(n, 1))
    router.eval()
    return router


def train_stacked_router(
    models: HybridModels, fold_edges: list[SplitModel], val: Batch, cfg: HybridConfig
) -> tuple[StackedRouter, dict[str, object]]:
    """The stacked router (stacked.py): features of the deployed edge and the fold edges on
    the validation split, the benefit `cloud right - edge right` of the deployed models as
    target, lambda by cross-validation there. Returns the router and what was chosen."""
    x, y = val
    _, logits = edge_outputs(models.edge, x)
    router = StackedRouter(fold_edges, logits.shape[1])
    features = stack_features(logits, router.fold_logits(x))
    edge_correct = logits.argmax(dim=1) == y
    cloud_correct = predict(models.cloud, x) == y
    lam, cv = choose_lambda(features, edge_correct, cloud_correct, cfg.router.stack_lambdas)
    mean, std, weights = fit_stacked(features, cloud_correct.double() - edge_correct.double(), lam)
    router.set_fit(mean, std, weights)
    router.eval()
    info: dict[str, object] = {
        "lambda": "inf" if math.isinf(lam) else lam,
        "cv_routed_acc": {("inf" if math.isinf(k) else str(k)): v for k, v in cv.items()},
        "weights": weights.tolist(),
    }
    return router, info


def train_hybrid(
    cfg: HybridConfig, *, progress: bool = True, console: Console | None = None
) -> HybridRun:
    """Train cloud, edge and router for `cfg`; returns the calibrated run (not yet saved)."""
    splits = load_splits(cfg)
    knn_size = len(splits.router[1])
    models = build_models(cfg, splits.input_shape, splits.num_classes, knn_size)
    t, r = cfg.train, cfg.router
    total = t.cloud_epochs + t.edge_epochs + t.rounds * (r.epochs + t.round_edge_epochs)
    total += r.epochs
    if cfg.data.router_fraction == 0:
        total += r.folds * (t.cloud_epochs + t.edge_epochs)
    history: list[dict[str, float]] = []
    stacked_info: dict[str, object] = {}
    with torch_threads(t.threads), _Bar(cfg.name, total, progress, console) as bar:
        _fit_models(models, splits.fit, cfg, bar, "")
        data = router_data(cfg, splits, models, bar)
        best_k, knn_cv = tune_k(
            data.inputs, data.edge_correct, data.cloud_correct, data.folds, r.knn_ks
        )
        models.knn.fit(data.inputs, data.edge_correct, data.cloud_correct, best_k)
        knn_info = {"k": best_k, "cv_routed_acc": {str(k): v for k, v in knn_cv.items()}}
        x_r, y_r = splits.router
        cloud_correct = predict(models.cloud, x_r) == y_r
        if r.design == "stacked":
            models.router, stacked_info = train_stacked_router(
                models, data.fold_edges, splits.val, cfg
            )
        if r.design == "gain":
            models.router = train_gain_router(
                data, cfg, cfg.seed + _SHUFFLE_ROUTER, bar.ticker("gain router")
            )
            history.append(
                {
                    "round": 0,
                    "edge_val_acc": _accuracy(models.edge, splits.val),
                    "router_edge_right_rate": float(data.edge_correct.float().mean()),
                    "router_cloud_right_rate": float(data.cloud_correct.float().mean()),
                }
            )
        for round_ in range(t.rounds + 1 if r.design == "paper" else 0):
            models.router, send_rate = train_router(
                models.edge,
                splits.router,
                cloud_correct,
                cfg,
                cfg.seed + _SHUFFLE_ROUTER + round_,
                bar.ticker(f"router {round_ + 1}"),
            )
            history.append(
                {
                    "round": round_,
                    "edge_val_acc": _accuracy(models.edge, splits.val),
                    "proxy_send_rate": send_rate,
                }
            )
            if round_ == t.rounds:
                break  # the last router matches the final edge
            keep = keep_probabilities(models, splits.fit[0])
            fit_classifier(
                models.edge,
                splits.fit,
                epochs=t.round_edge_epochs,
                train=t,
                seed=cfg.seed + _SHUFFLE_EDGE + 100 * (round_ + 1),
                weights=(1 - t.edge_focus) + t.edge_focus * keep,
                on_epoch=bar.ticker(f"edge round {round_ + 1}"),
            )
        calibration = Calibration(edge_scores(models, splits.val[0]).scores)
    router_in = models.router.mean.numel()
    knn_rows, knn_dim = models.knn.memory.shape
    if isinstance(models.router, StackedRouter):
        # The fold edges run beside the edge; the features and the linear score are a few
        # operations per class, negligible next to them.
        fold = models.router.fold_edges
        router_flops = sum(forward_flops(e, splits.input_shape) for e in fold) + 2 * router_in
    else:
        router_flops = forward_flops(models.router, (router_in,))
    flops = {
        "edge": forward_flops(models.edge, splits.input_shape),
        "router": router_flops,
        "cloud": forward_flops(models.cloud, splits.input_shape),
        # A distance to every memory row: a subtract, a multiply and an add per value.
        "knn": 3 * knn_rows * knn_dim,
    }
    input_values = int(np.prod(splits.input_shape))
    latency = build_latency_model(
        cfg.latency,
        edge_flops=flops["edge"],
        router_flops=flops["router"],
        cloud_flops=flops["cloud"],
        input_values=input_values,
        knn_flops=flops["knn"],
    )
    info = {
        "splits": {k: len(getattr(splits, k)[1]) for k in ("fit", "router", "val", "test")},
        "flops": flops,
        "val_acc": {
            "edge": _accuracy(models.edge, splits.val),
            "cloud": _accuracy(models.cloud, splits.val),
        },
        "rounds": history,
        "knn": knn_info,
    }
    if stacked_info:
        info["stacked"] = stacked_info
    return HybridRun(
        cfg, models, calibration, latency, splits.input_shape, splits.num_classes, info
    )
