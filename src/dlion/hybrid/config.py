"""Typed config of a hybrid edge/cloud run (selective query, Kag et al., ICLR '23): data,
models, router, training, latency model; YAML files or presets, `--set a.b=v` overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from dlion.core.config import (
    apply_overrides,
    format_validation_error,
    parse_yaml_mapping,
    read_text_file,
)
from dlion.core.errors import ConfigError
from dlion.hybrid.spec import ModelSpec, Strict


class HybridDataConfig(Strict):
    name: Literal["digits", "mnist1d", "synthetic", "mnist-idx", "cifar10", "npz"] = Field(
        "digits", description="Dataset, as for `dlion train` (see dlion.data.load_dataset)."
    )
    path: str | None = Field(None, description="File or directory for user data formats.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Test share for datasets without a test split."
    )
    num_samples: int | None = Field(
        None, ge=20, description="Generated datasets (mnist1d, synthetic): sample count."
    )
    val_fraction: float = Field(
        0.25,
        gt=0,
        lt=0.5,
        description="Share of the training split held out for threshold calibration; 0.25 "
        "makes it about as large as the test split. Quantiles of a few hundred scores are "
        "only good to a few points: coverage on test follows the calibration that closely.",
    )
    router_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Share of the training split held out to train the router on, so its "
        "proxy labels see the models' unseen-data mistakes. 0 (as in the paper) trains it on "
        "the models' own training data: on digits and mnist1d the extra training data helps "
        "the models more than the honest labels help the router.",
    )


def _edge_default() -> ModelSpec:
    # A 2x average pool turns 8x8 digits into 4x4 (and 40-long mnist1d into 20), so the edge
    # sees a coarse input and is clearly weaker than the cloud model.
    return ModelSpec(name="mlp", hidden=[32], downsample=2)


def _cloud_default() -> ModelSpec:
    return ModelSpec(name="cnn", hidden=[64], channels=[16, 32], downsample=1)


class RouterConfig(Strict):
    design: Literal["paper", "gain", "stacked"] = Field(
        "stacked",
        description="'stacked' (the default; dlion.hybrid.stacked): entropy plus a ridge "
        "correction from the edge's confidence, the fold edges' disagreement and its class, "
        "fitted on the validation split, its size chosen by cross-validation (inf = entropy "
        "itself); the only design that beat entropy thresholding at every coverage on digits "
        "and mnist1d (RESULTS.md section 4). 'paper': the ICLR '23 router on penultimate "
        "features, proxy BCE and the coverage penalty, trained on the models' own training "
        "data, with train.rounds alternating rounds. 'gain' (dlion.hybrid.gain): two heads "
        "estimate P(edge right) and P(cloud right) from the input and the edge's softmax, "
        "trained on cross-fitted labels; it trailed entropy more than 'paper' did. 'gain' and "
        "'stacked' need train.rounds=0 (their default).",
    )
    stack_lambdas: list[float] = Field(
        default_factory=lambda: [1.0, 0.1, 0.01, 0.001],
        min_length=1,
        description="router.design=stacked: ridge penalties tried (with inf, plain entropy) "
        "by cross-validation on the validation split; a decade apart, from 'barely off "
        "entropy' to 'nearly unpenalised' on a few hundred inputs.",
    )
    folds: int = Field(
        3,
        ge=2,
        description="Cross-fitting folds for the kNN (and gain) router's labels; each trains "
        "an extra edge and cloud on the other folds (3: training costs 3x as much again). "
        "The stacked router runs these fold edges beside the edge.",
    )
    knn_ks: list[int] = Field(
        default_factory=lambda: [5, 10, 20, 50, 100],
        min_length=1,
        description="k-nearest-neighbour router: the k tried; the best by cross-validation "
        "on the router's training set is kept (a tuned kNN is the baseline to beat).",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [32], min_length=1, description="Router MLP hidden widths."
    )
    top_k: int = Field(
        3,
        ge=2,
        description="Margins p(1) - p(j) for j = 2..top_k of the edge's sorted softmax are "
        "router inputs, next to the entropy and the penultimate features.",
    )
    train_coverage: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Coverage the penalty aims at during training: the router is charged "
        "when its mean keep-probability falls below it (it sends more than 1 - this).",
    )
    coverage_penalty: float = Field(
        1.0, ge=0, description="Weight of the coverage penalty (0 = plain proxy BCE)."
    )
    epochs: int = Field(60, ge=1, description="Router epochs per (re)training.")
    lr: float = Field(0.003, gt=0, description="Router Adam learning rate.")
    weight_decay: float = Field(
        1e-3, ge=0, description="Router L2 penalty: its training split is small."
    )
    default_coverage: float = Field(
        0.8, gt=0, le=1, description="Coverage `dlion hybrid route` uses without --coverage."
    )


class TrainConfig(Strict):
    batch_size: int = Field(64, ge=1, description="Mini-batch for every model.")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the edge and cloud.")
    weight_decay: float = Field(0.0, ge=0, description="Adam L2 penalty, edge and cloud.")
    edge_epochs: int = Field(15, ge=1, description="Edge epochs before the first router.")
    cloud_epochs: int = Field(
        10, ge=1, description="Cloud epochs; 10 already puts the CNN well above the edge."
    )
    rounds: int = Field(
        0,
        ge=0,
        description="Alternating rounds (router.design=paper only): each re-trains the router "
        "on the current edge, then fine-tunes the edge on the inputs the router keeps; a final "
        "router follows. Unset, it is 1 with router.design=paper (the paper's scheme) and 0 "
        "with the designs that are fitted once.",
    )
    round_edge_epochs: int = Field(3, ge=1, description="Edge fine-tune epochs per round.")
    edge_focus: float = Field(
        0.5,
        ge=0,
        le=1,
        description="In a round, an input's edge loss weight is (1 - focus) + focus * "
        "keep-probability: the edge spends its capacity on what it will answer.",
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads while training.")


class LatencyConfig(Strict):
    edge_gflops: float = Field(
        0.05,
        gt=0,
        description="Edge device capacity for this model (GFLOP/s); a microcontroller "
        "manages tens of MFLOP/s on small dense layers.",
    )
    uplink_mbps: float = Field(1.0, gt=0, description="Edge-to-cloud bandwidth (Mbit/s).")
    uplink_latency_ms: float = Field(
        20.0, ge=0, description="Round-trip network latency of one query (ms)."
    )
    bytes_per_value: float = Field(
        1.0, gt=0, description="Payload bytes per input value (1 = 8-bit samples)."
    )
    payload_bytes: int | None = Field(
        None, ge=1, description="Bytes sent per query; default input size x bytes_per_value."
    )
    cloud_gflops: float = Field(
        100.0, gt=0, description="Cloud capacity for one query of the cloud model (GFLOP/s)."
    )
    cloud_overhead_ms: float = Field(
        2.0, ge=0, description="Fixed serving cost per cloud query (ms): queueing, decoding."
    )


class HybridConfig(Strict):
    name: str = Field("hybrid", description="Run name, used in titles and default paths.")
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seeds the data split, model inits and shuffling."
    )
    data: HybridDataConfig = Field(default_factory=HybridDataConfig)
    edge: ModelSpec = Field(default_factory=_edge_default)
    cloud: ModelSpec = Field(default_factory=_cloud_default)
    router: RouterConfig = Field(default_factory=RouterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    coverages: list[float] = Field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9],
        min_length=1,
        description="Target coverages (fraction answered on the edge) `eval` reports.",
    )

    @model_validator(mode="before")
    @classmethod
    def _rounds_follow_design(cls, data: Any) -> Any:
        """An unset train.rounds is 1 for router.design=paper, 0 for the others."""
        if not isinstance(data, dict):
            return data
        router, train = data.get("router"), data.get("train")
        train = {} if train is None else train
        if not isinstance(train, dict) or "rounds" in train:
            return data
        design = router.get("design", "stacked") if isinstance(router, dict) else "stacked"
        return {**data, "train": {**train, "rounds": 1 if design == "paper" else 0}}

    @model_validator(mode="after")
    def _coverages_in_range(self) -> HybridConfig:
        for i, c in enumerate(self.coverages):
            if not 0 < c <= 1:
                raise ValueError(f"coverages.{i}: coverage must be in (0, 1], got {c}")
        if self.train.rounds and self.router.design != "paper":
            raise ValueError(
                "train.rounds: alternating rounds need router.design=paper (the gain router is "
                "trained once on cross-fitted labels); set train.rounds=0"
            )
        if self.router.design == "stacked" and self.data.router_fraction > 0:
            raise ValueError(
                "data.router_fraction: router.design=stacked uses the cross-fitting fold edges "
                "of the training split (and the validation split for its fit); set it to 0"
            )
        if any(lam < 0 for lam in self.router.stack_lambdas):
            raise ValueError(
                f"router.stack_lambdas: every penalty must be >= 0, got {self.router.stack_lambdas}"
            )
        if any(k < 1 for k in self.router.knn_ks):
            raise ValueError(f"router.knn_ks: every k must be >= 1, got {self.router.knn_ks}")
        return self


# Presets: `dlion hybrid train digits` or `... mnist1d`. Kept in Python (not YAML files) so
# they ship with the package without packaging changes.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"name": "digits", "data": {"name": "digits"}},
    "mnist1d": {
        "name": "mnist1d",
        "data": {"name": "mnist1d"},
        # mnist1d is harder: the edge needs more epochs to stop improving.
        "train": {"edge_epochs": 30},
    },
}


def load_hybrid_config(source: str, overrides: list[str] | None = None) -> HybridConfig:
    """A validated config from a YAML path or a preset name, with `a.b=v` overrides."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        raw = parse_yaml_mapping(read_text_file(path, "config"), source)
    elif source in PRESETS:
        raw = PRESETS[source]
    else:
        raise ConfigError(f"{source}: not a config file or a preset ({', '.join(sorted(PRESETS))})")
    return hybrid_config_from_dict(apply_overrides(raw, overrides or []), source)


def hybrid_config_from_dict(raw: dict[str, Any], origin: str = "config") -> HybridConfig:
    try:
        cfg = HybridConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {format_validation_error(err)}") from None
    # Imported here: the model registry imports torch, which config parsing does not need.
    from dlion.hybrid.models import check_model_name

    check_model_name(cfg.edge.name, f"{origin}: edge.name")
    check_model_name(cfg.cloud.name, f"{origin}: cloud.name")
    return cfg


def config_hash(cfg: HybridConfig) -> str:
    """A short content hash of a resolved config; saved weights carry it."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
