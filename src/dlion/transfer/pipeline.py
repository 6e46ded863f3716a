"""The RecycleML pipeline (EdgeSys '18): reuse a trained sensor model for a new modality.

1. Train the source-modality model (encoder + head) on labeled source data.
2. On unlabeled synchronized pairs, train the target encoder to regress onto the source
   encoder's latent layer (MSE), with early stopping on a held-out share of the pairs.
3. Zero-label transfer: target encoder + the source head, no target labels at all.
4. Few-label transfer: freeze the target encoder, fine-tune a copy of the transferred head
   (or train a new head) on k target labels; keep it only if it beats the zero-label model
   on held-out labels (dlion.transfer.select), otherwise keep the zero-label model.
5. Baseline: train the same target architecture from scratch on the same k labels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlion.core.errors import ConfigError, DataError
from dlion.report import write_json_atomic
from dlion.transfer.config import LabelsSection, RegressionSection, TransferConfig
from dlion.transfer.data import MultimodalData, generate_synthetic, read_multimodal_npz
from dlion.transfer.encoders import (
    Classifier,
    build_encoder,
    build_head,
    few_label_hidden,
    input_stats,
)
from dlion.transfer.progress import StageBar, Stages
from dlion.transfer.select import FEW_LABEL, Choice, choose_head, validation_folds
from dlion.transfer.weights import write_run

SUMMARY = "summary.json"

Tick = Callable[[], None]


def _quiet_tick() -> None:
    return None


def derive_seed(*parts: int) -> int:
    """A 31-bit seed for one stage, so that stages never share a random stream."""
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- data


def load_data(cfg: TransferConfig) -> tuple[MultimodalData, MultimodalData | None]:
    """The labeled set (the file or the synthetic set) and the optional extra unlabeled pairs."""
    d = cfg.data
    if d.path is None:
        data = generate_synthetic(d.synthetic, cfg.seed)
        missing = [m for m in (d.source, d.target) if m not in data.modalities]
        if missing:
            raise ConfigError(
                f"data.source/target: the synthetic set has modalities "
                f"{sorted(data.modalities)}, not {missing[0]!r}"
            )
        return data, None
    data = read_multimodal_npz(d.path, (d.source, d.target), labels_required=True)
    if d.unlabeled_path is None:
        return data, None
    extra = read_multimodal_npz(d.unlabeled_path, (d.source, d.target))
    for name in (d.source, d.target):
        if extra.modalities[name].shape[1:] != data.modalities[name].shape[1:]:
            raise DataError(
                f"{d.unlabeled_path}: 'modality_{name}' samples have shape "
                f"{extra.modalities[name].shape[1:]} but {d.path} has "
                f"{data.modalities[name].shape[1:]}"
            )
    return data, extra


def split_roles(n: int, cfg: TransferConfig) -> dict[str, np.ndarray]:
    """Disjoint random index sets for the roles source / pairs / pool / test."""
    fractions = cfg.data.split
    order = np.random.default_rng(derive_seed(cfg.seed, 1)).permutation(n)
    roles: dict[str, np.ndarray] = {}
    start = 0
    for role in ("source", "pairs", "target_pool", "test"):
        size = int(getattr(fractions, role) * n)
        if size < 1:
            raise ConfigError(
                f"data.split.{role}: {getattr(fractions, role):g} of {n} samples is empty; "
                "raise the fraction or use more data"
            )
        roles[role] = order[start : start + size]
        start += size
    largest = max(cfg.labels.ks)
    if len(roles["target_pool"]) < largest:
        raise ConfigError(
            f"labels.ks: k={largest} needs {largest} target samples but data.split.target_pool "
            f"gives {len(roles['target_pool'])} of {n}; raise the fraction or lower ks"
        )
    return roles


def balanced_draw(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of k samples, spread over the classes as evenly as the data allows."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Round-robin over classes in a random order: k=10 with 8 classes gives 2 classes 2 each.
    order = rng.permutation(len(by_class))
    picked: list[int] = []
    depth = 0
    while len(picked) < k:
        progressed = False
        for c in order:
            if depth < len(by_class[c]) and len(picked) < k:
                picked.append(int(by_class[c][depth]))
                progressed = True
        if not progressed:
            raise DataError(f"cannot draw {k} labeled samples from {len(labels)}")
        depth += 1
    return np.asarray(picked, dtype=np.int64)


# ----------------------------------------------------------------------------- training


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled minibatch indices, reshuffled every epoch."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def train_supervised(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    tick: Tick = _quiet_tick,
) -> float:
    """Adam on cross-entropy for `steps` minibatch steps; returns the last batch's loss."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    batches = _batches(len(x), batch_size, torch.Generator().manual_seed(seed))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = next(batches)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        tick()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def predict_latent(encoder: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 1024]).argmax(dim=1) for i in range(0, len(x), 1024)])
    return float((pred == y).float().mean())


@torch.no_grad()
def mse(encoder: nn.Module, x: torch.Tensor, z: torch.Tensor) -> float:
    return float(nn.functional.mse_loss(predict_latent(encoder, x), z))


@dataclass(frozen=True)
class RegressionResult:
    """History of the latent regression; the encoder holds the weights of `best_epoch`."""

    initial_val_mse: float  # before any training
    train_mse: list[float]  # mean minibatch MSE of each epoch
    val_mse: list[float]  # validation MSE after each epoch
    best_epoch: int  # 1-based epoch whose weights were restored
    stopped_early: bool  # True when patience ran out before max_epochs

    @property
    def best_val_mse(self) -> float:
        return self.val_mse[self.best_epoch - 1]


def regress_latent(
    encoder: nn.Module,
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    x_val: torch.Tensor,
    z_val: torch.Tensor,
    cfg: RegressionSection,
    *,
    seed: int,
    bar: StageBar | None = None,
) -> RegressionResult:
    """Train `encoder` so that encoder(x) ~ z (MSE); stop when the validation MSE has not
    improved by `min_delta` (relative) for `patience` epochs, and restore the best epoch."""
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    initial = mse(encoder, x_val, z_val)
    best, best_epoch, best_state = initial, 0, copy.deepcopy(encoder.state_dict())
    train_hist: list[float] = []
    val_hist: list[float] = []
    since_best = 0
    for epoch in range(1, cfg.max_epochs + 1):
        encoder.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(x_train), generator=generator).split(cfg.batch_size):
            loss = nn.functional.mse_loss(encoder(x_train[idx]), z_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_hist.append(total / count)
        val_hist.append(mse(encoder, x_val, z_val))
        if val_hist[-1] < best * (1 - cfg.min_delta):
            best, best_epoch, since_best = val_hist[-1], epoch, 0
            best_state = copy.deepcopy(encoder.state_dict())
        else:
            since_best += 1
        if bar is not None:
            bar.tick()
            bar.note(f"val MSE {val_hist[-1]:.4f} (best {best:.4f} @ {best_epoch})")
        if since_best >= cfg.patience:
            break
    if best_epoch == 0:
        raise DataError(
            "latent regression never improved on its starting point; "
            "check that the two modalities are synchronized"
        )
    encoder.load_state_dict(best_state)
    encoder.eval()
    return RegressionResult(
        initial_val_mse=initial,
        train_mse=train_hist,
        val_mse=val_hist,
        best_epoch=best_epoch,
        stopped_early=len(val_hist) < cfg.max_epochs,
    )


def fit_head(
    head: nn.Module,
    features: torch.Tensor,
    y: torch.Tensor,
    cfg: LabelsSection,
    *,
    seed: int,
) -> None:
    """Full-batch Adam on the head alone, on precomputed (frozen-encoder) features."""
    torch.manual_seed(seed)
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    for _ in range(cfg.head_steps):
        loss = nn.functional.cross_entropy(head(features), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def few_label_head(
    cfg: TransferConfig,
    k: int,
    encoder: nn.Module,
    source_head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
) -> tuple[nn.Module, nn.Module, Choice | None]:
    """(kept head, candidate fitted on all k labels, the keep-the-better Choice or None when
    labels.keep_better is off) for one label budget."""
    lab = cfg.labels
    encoder.requires_grad_(False)
    encoder.eval()
    with torch.no_grad():
        features = encoder(x)

    def make_candidate() -> nn.Module:
        torch.manual_seed(derive_seed(cfg.seed, 7, k))
        if lab.head == "source":
            return copy.deepcopy(source_head)
        return build_head(cfg.model.latent_dim, few_label_hidden(cfg), num_classes)

    def fit(head: nn.Module, f: torch.Tensor, labels: torch.Tensor) -> None:
        fit_head(head, f, labels, lab, seed=derive_seed(cfg.seed, 8, k))

    if not lab.keep_better:
        head = make_candidate()
        fit(head, features, y)
        return head, head, None
    folds, scheme = validation_folds(
        k,
        holdout_min_k=lab.holdout_min_k,
        holdout_fraction=lab.holdout_fraction,
        cv_folds=lab.cv_folds,
        seed=derive_seed(cfg.seed, 12, k),
    )
    zero = copy.deepcopy(source_head)
    return choose_head(k, features, y, zero, make_candidate, fit, folds, scheme)


def kept_messages(summary: dict[str, Any]) -> list[str]:
    """One line per k: which model the keep-the-better rule kept, and why."""
    lines = []
    for c in summary.get("few_label_kept", []):
        kept = "few-label head" if c["kept"] == FEW_LABEL else "zero-label model"
        lines.append(f"k={c['k']}: kept the {kept}: {c['reason']}")
    return lines


# ----------------------------------------------------------------------------- the run


def scratch_steps(lab: LabelsSection, k: int) -> int:
    """Steps for the scratch model on k labels: a floor for small k, whole epochs for large k
    (a fixed step count would under-train scratch exactly where it should catch up)."""
    return max(lab.scratch_steps, lab.scratch_epochs * math.ceil(k / lab.scratch_batch_size))


def labels_to_match(ks: list[int], accs: list[float], target: float) -> float | None:
    """Labels at which the scratch curve reaches `target`: the first k that does, with the
    crossing interpolated linearly in log k from the k before it; None if none does."""
    for i, (k, acc) in enumerate(zip(ks, accs, strict=True)):
        if acc >= target:
            if i == 0:
                return float(k)
            k0, a0 = ks[i - 1], accs[i - 1]
            frac = (target - a0) / (acc - a0)
            return float(math.exp(math.log(k0) + frac * (math.log(k) - math.log(k0))))
    return None


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x))


def run_transfer(
    cfg: TransferConfig,
    *,
    out_dir: Path | None = None,
    stages: Stages | None = None,
    data: tuple[MultimodalData, MultimodalData | None] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (and writes weights + JSON to `out_dir`)."""
    stages = stages or Stages(enabled=False)
    labeled, extra = data if data is not None else load_data(cfg)
    src, tgt = cfg.data.source, cfg.data.target
    if labeled.labels is None:
        raise DataError("the labeled set has no 'labels'; the pipeline needs them")
    roles = split_roles(len(labeled), cfg)
    num_classes = int(labeled.labels.max()) + 1
    y = _tensor(labeled.labels)
    xs = _tensor(labeled.modalities[src])
    xt = _tensor(labeled.modalities[tgt])
    test = _tensor(roles["test"])
    counts = np.bincount(labeled.labels[roles["test"]], minlength=num_classes)
    chance = float(counts.max() / counts.sum())

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # 1. Source model on labeled source data.
        train_idx = _tensor(roles["source"])
        torch.manual_seed(derive_seed(cfg.seed, 2))
        source = Classifier(
            build_encoder(tuple(xs.shape[1:]), cfg.model, input_stats(xs[train_idx].numpy())),
            build_head(cfg.model.latent_dim, cfg.model.head_hidden, num_classes),
        )
        st = cfg.source_train
        steps = st.epochs * math.ceil(len(train_idx) / st.batch_size)
        with stages.stage(f"source model ({src})", steps) as bar:
            train_supervised(
                source,
                xs[train_idx],
                y[train_idx],
                steps=steps,
                batch_size=st.batch_size,
                lr=st.lr,
                weight_decay=st.weight_decay,
                seed=derive_seed(cfg.seed, 3),
                tick=bar.tick,
            )
            source_acc = accuracy(source, xs[test], y[test])
            bar.note(f"test acc {source_acc:.3f}")

        # 2. Latent regression on unlabeled pairs (labels of this role are never read).
        pair_s, pair_t = xs[_tensor(roles["pairs"])], xt[_tensor(roles["pairs"])]
        if extra is not None:
            pair_s = torch.cat([pair_s, _tensor(extra.modalities[src])])
            pair_t = torch.cat([pair_t, _tensor(extra.modalities[tgt])])
        latent = predict_latent(source.encoder, pair_s)
        order = torch.randperm(
            len(pair_t), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 11))
        )
        n_val = max(1, int(cfg.regression.val_fraction * len(order)))
        val, fit = order[:n_val], order[n_val:]
        if len(fit) == 0:
            raise ConfigError("regression.val_fraction: leaves no pairs to train on")
        target_stats = input_stats(pair_t.numpy())
        torch.manual_seed(derive_seed(cfg.seed, 4))
        target_encoder = build_encoder(tuple(xt.shape[1:]), cfg.model, target_stats)
        with stages.stage(f"latent regression ({tgt})", cfg.regression.max_epochs) as bar:
            reg = regress_latent(
                target_encoder,
                pair_t[fit],
                latent[fit],
                pair_t[val],
                latent[val],
                cfg.regression,
                seed=derive_seed(cfg.seed, 5),
                bar=bar,
            )
            bar.finish()

        # 3. Zero-label: the transferred encoder under the source head, unchanged.
        zero_label = accuracy(Classifier(target_encoder, source.head), xt[test], y[test])

        # 4./5. Few-label heads and the scratch baseline on the same k labels.
        lab = cfg.labels
        pool = roles["target_pool"]
        few: list[float] = []
        candidate_acc: list[float] = []
        choices: list[Choice] = []
        scratch: list[float] = []
        heads: dict[str, torch.Tensor] = {}
        total = sum(scratch_steps(lab, k) for k in lab.ks)
        with stages.stage(f"few-label vs scratch ({tgt})", total) as bar:
            for k in lab.ks:
                rng = np.random.default_rng(derive_seed(cfg.seed, 6, k))
                idx = _tensor(pool[balanced_draw(labeled.labels[pool], k, rng)])
                head, candidate, choice = few_label_head(
                    cfg, k, target_encoder, source.head, xt[idx], y[idx], num_classes
                )
                few.append(accuracy(Classifier(target_encoder, head), xt[test], y[test]))
                candidate_acc.append(
                    accuracy(Classifier(target_encoder, candidate), xt[test], y[test])
                )
                if choice is not None:
                    choices.append(choice)
                heads.update({f"k{k}.{name}": t for name, t in head.state_dict().items()})

                torch.manual_seed(derive_seed(cfg.seed, 9, k))
                # Same architecture as the transferred model; its input statistics come from
                # the unlabeled target recordings, which scratch may use as well (no labels).
                model = Classifier(
                    build_encoder(tuple(xt.shape[1:]), cfg.model, target_stats),
                    build_head(cfg.model.latent_dim, cfg.model.head_hidden, num_classes),
                )
                train_supervised(
                    model,
                    xt[idx],
                    y[idx],
                    steps=scratch_steps(lab, k),
                    batch_size=lab.scratch_batch_size,
                    lr=lab.scratch_lr,
                    weight_decay=lab.scratch_weight_decay,
                    seed=derive_seed(cfg.seed, 10, k),
                    tick=bar.tick,
                )
                scratch.append(accuracy(model, xt[test], y[test]))
                bar.note(f"k={k}: transfer {few[-1]:.3f}, scratch {scratch[-1]:.3f}")
    finally:
        torch.set_num_threads(threads)

    few_at_match = few[lab.ks.index(lab.match_k)]
    crossover = next((k for k, f, s in zip(lab.ks, few, scratch, strict=True) if s >= f), None)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "seed": cfg.seed,
        "source": src,
        "target": tgt,
        "num_classes": num_classes,
        "samples": {role: len(idx) for role, idx in roles.items()}
        | {"extra_unlabeled_pairs": 0 if extra is None else len(extra)},
        "chance_acc": chance,
        "source_acc": source_acc,
        "zero_label_acc": zero_label,
        "ks": list(lab.ks),
        "few_label_acc": few,
        # The fine-tuned head on all k labels, whether the rule kept it or not.
        "few_label_candidate_acc": candidate_acc,
        "few_label_kept": [c.to_json() for c in choices],
        "scratch_acc": scratch,
        "match_k": lab.match_k,
        "scratch_labels_to_match": labels_to_match(lab.ks, scratch, few_at_match),
        "scratch_catches_up_at_k": crossover,
        "regression": {
            "initial_val_mse": reg.initial_val_mse,
            "best_val_mse": reg.best_val_mse,
            "best_epoch": reg.best_epoch,
            "epochs_run": len(reg.val_mse),
            "stopped_early": reg.stopped_early,
            "val_mse": reg.val_mse,
            "train_mse": reg.train_mse,
        },
    }
    if out_dir is not None:
        write_run(out_dir, cfg, source, target_encoder, heads, xs.shape[1:], xt.shape[1:])
        write_json_atomic(out_dir / SUMMARY, summary)
    return summary
