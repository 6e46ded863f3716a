"""Edge and cloud classifiers for selective query (Kag et al., ICLR '23): a registry of model
builders by name, an input downsampler, and a split into features (body) and logits (head)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from dlion.core.errors import ConfigError, DlionError
from dlion.hybrid.spec import ModelSpec
from dlion.training.models import build_model

# builder(input_shape, num_classes, spec, seed) -> an nn.Sequential ending in nn.Linear, or a
# SplitModel. input_shape is what the model sees, after the spec's downsampling.
Builder = Callable[[tuple[int, ...], int, ModelSpec, int], nn.Module]


class Downsample(nn.Module):
    """Average-pool (C, L) or (C, H, W) inputs by `factor` per spatial axis (1 = identity)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        if x.dim() == 3:
            return nn.functional.avg_pool1d(x, self.factor)
        return nn.functional.avg_pool2d(x, self.factor)


def downsampled_shape(input_shape: tuple[int, ...], factor: int, field: str) -> tuple[int, ...]:
    """The per-sample shape after `Downsample(factor)`, or a ConfigError naming `field`."""
    if factor == 1:
        return input_shape
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"{field}: downsampling needs (C, L) or (C, H, W) inputs, got {input_shape}; "
            "set it to 1"
        )
    spatial = [size // factor for size in input_shape[1:]]
    if min(spatial) < 1:
        raise ConfigError(f"{field}: {factor} is larger than the input {input_shape}")
    return (input_shape[0], *spatial)


class SplitModel(nn.Module):
    """A classifier as body (input -> penultimate features) and head (features -> logits)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def split_sequential(model: nn.Module, field: str) -> SplitModel:
    """Split an nn.Sequential whose last layer is nn.Linear into body and head."""
    if isinstance(model, SplitModel):
        return model
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise ConfigError(
            f"{field}: the builder must return a SplitModel or an nn.Sequential ending in "
            f"nn.Linear, got {type(model).__name__}"
        )
    return SplitModel(nn.Sequential(*list(model)[:-1]), model[-1])


def _mlp(input_shape: tuple[int, ...], num_classes: int, spec: ModelSpec, seed: int) -> nn.Module:
    return build_model("mlp", input_shape, num_classes, hidden=spec.hidden, seed=seed)


def _cnn(input_shape: tuple[int, ...], num_classes: int, spec: ModelSpec, seed: int) -> nn.Module:
    return build_model(
        "cnn", input_shape, num_classes, hidden=spec.hidden, channels=spec.channels, seed=seed
    )


REGISTRY: dict[str, Builder] = {"mlp": _mlp, "cnn": _cnn}


def register_model(name: str, builder: Builder) -> None:
    """Make `builder` available as `edge.name` / `cloud.name` = `name`."""
    REGISTRY[name] = builder


def resolve_builder(name: str, field: str) -> Builder:
    """A registered builder, or `package.module:function` imported from the environment."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(
            f"{field}: unknown model {name!r} (registered: {known}; or 'package.module:builder')"
        )
    module_name, attr = name.split(":", 1)
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot import {name!r}: {exc}") from None
    if not callable(builder):
        raise ConfigError(f"{field}: {name!r} is not callable")
    return builder


def check_model_name(name: str, field: str) -> None:
    """Raise a ConfigError naming `field` when `name` resolves to no builder."""
    resolve_builder(name, field)


def build_hybrid_model(
    spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, seed: int, field: str
) -> SplitModel:
    """The model of `spec` for full-resolution inputs of `input_shape`; downsampling is its
    first layer, so edge and cloud take the same inputs and the payload is the raw input."""
    inner = downsampled_shape(input_shape, spec.downsample, f"{field}.downsample")
    builder = resolve_builder(spec.name, f"{field}.name")
    try:
        net = builder(inner, num_classes, spec, seed)
    except DlionError:
        raise
    except Exception as exc:  # a user's builder failed: name it, exit 2
        raise ConfigError(f"{field}.name: builder {spec.name!r} failed: {exc}") from None
    split = split_sequential(net, f"{field}.name")
    return SplitModel(nn.Sequential(Downsample(spec.downsample), split.body), split.head)


def feature_dim(model: SplitModel, input_shape: tuple[int, ...]) -> int:
    """Width of the model's penultimate features, from one forward pass on zeros."""
    with torch.no_grad():
        features = model.body(torch.zeros((1, *input_shape)))
    return int(features.reshape(1, -1).shape[1])
