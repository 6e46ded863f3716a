"""Model zoo (mlp, cnn) and the user's own builders ("pkg.module:fn"), deterministic
construction, and per-sample training FLOP counts."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlion.core.errors import ConfigError
from dlion.core.usercode import accepts, call_user, is_reference, load_callable

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn")

# Small enough to be cheap, large enough that per-sample counts are exact integer divisions.
_FLOP_BATCH = 4


def _check_positive_ints(
    field: str, values: Sequence[int], *, allow_empty: bool
) -> tuple[int, ...]:
    """Return `values` as a tuple of ints, or raise ConfigError naming `field`."""
    if isinstance(values, str | bytes):
        raise ConfigError(f"{field}: expected a list of positive integers, got {values!r}")
    try:
        items = tuple(values)
    except TypeError:
        raise ConfigError(
            f"{field}: expected a list of positive integers, got {values!r}"
        ) from None
    if not items and not allow_empty:
        raise ConfigError(f"{field}: must not be empty")
    for item in items:
        # bool is an int subclass, but True as a layer width is surely a mistake.
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ConfigError(f"{field}: expected positive integers, got {list(items)!r}")
    return items


def _build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]
) -> nn.Module:
    in_features = 1
    for dim in input_shape:
        in_features *= dim
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _build_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...],
    channels: tuple[int, ...],
) -> nn.Module:
    if len(input_shape) == 3:
        conv_cls: type[nn.Conv1d] | type[nn.Conv2d] = nn.Conv2d
        pool_cls: type[nn.MaxPool1d] | type[nn.MaxPool2d] = nn.MaxPool2d
        spatial = list(input_shape[1:])
    elif len(input_shape) == 2:
        conv_cls = nn.Conv1d
        pool_cls = nn.MaxPool1d
        spatial = [input_shape[1]]
    else:
        raise ConfigError(
            f"model.input_shape: cnn needs (C, H, W) or (C, L) input, got {input_shape}; "
            "use model.name 'mlp' for flat inputs"
        )
    if not hidden:
        raise ConfigError("model.hidden: cnn needs at least one hidden width for its dense layer")

    layers: list[nn.Module] = []
    in_ch = input_shape[0]
    for out_ch in channels:
        # padding=1 with a 3-wide kernel keeps the spatial size, so only pooling shrinks it.
        layers += [conv_cls(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
        in_ch = out_ch
        # Pool only while the result keeps at least 2 positions per axis; tiny inputs such
        # as 8x8 digits would otherwise collapse to 1x1 and lose all spatial structure.
        if min(spatial) // 2 >= 2:
            layers.append(pool_cls(2))
            spatial = [size // 2 for size in spatial]
    flat = in_ch
    for size in spatial:
        flat *= size
    layers += [
        nn.Flatten(),
        nn.Linear(flat, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], num_classes),
    ]
    return nn.Sequential(*layers)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128, 64),
    channels: Sequence[int] = (16, 32),
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (no batch axis), initialised from `seed`.

    `name` is a built-in (MODEL_NAMES) or "pkg.module:fn", the user's builder, called with
    `options` as keywords plus `input_shape` and `num_classes` when it accepts them and
    `options` does not give them. The global torch RNG state is left untouched, and equal
    arguments give bit-identical parameters (for a builder that draws from torch's RNG).
    """
    if is_reference(name):
        return _build_user_model(name, input_shape, num_classes, seed, options or {})
    if name not in MODEL_NAMES:
        raise ConfigError(
            f"model.name: unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})"
        )
    shape = _check_positive_ints("model.input_shape", input_shape, allow_empty=False)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"model.num_classes: expected a positive integer, got {num_classes!r}")
    hidden_t = _check_positive_ints("model.hidden", hidden, allow_empty=name == "mlp")
    channels_t = _check_positive_ints("model.channels", channels, allow_empty=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"model.seed: expected an integer, got {seed!r}")

    # fork_rng restores the global CPU RNG on exit, so seeding here cannot disturb the
    # caller's data shuffling or other randomness. devices=[] avoids touching CUDA RNGs.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = _build_mlp(shape, num_classes, hidden_t)
        else:
            model = _build_cnn(shape, num_classes, hidden_t, channels_t)
    return model


def _build_user_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    options: dict[str, Any],
) -> nn.Module:
    builder = load_callable(name, "model.name")
    kwargs = dict(options)
    if "input_shape" not in kwargs and accepts(builder, "input_shape"):
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" not in kwargs and accepts(builder, "num_classes"):
        kwargs["num_classes"] = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = call_user(builder, "model", **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name: {name!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.name: {name!r} returned a model with no trainable parameters")
    return model


def train_flops_per_sample(
    model: nn.Module, input_shape: tuple[int, ...], sample: torch.Tensor | None = None
) -> int:
    """FLOPs of one forward + backward pass, per sample.

    Counted by torch's FlopCounterMode on a copy of `model`, so the caller's parameters,
    gradients and buffers are never touched. `sample`: a few real inputs (batch axis first)
    to count on; by default random inputs of `input_shape`. The loss's own FLOPs are not
    counted (FlopCounterMode counts matrix products and convolutions), so backward runs
    from the sum of the outputs, whatever the loss.
    """
    shape = _check_positive_ints("model.input_shape", input_shape, allow_empty=False)
    # A private copy: backward would otherwise write .grad on the caller's parameters.
    probe = copy.deepcopy(model)
    for param in probe.parameters():
        param.grad = None
    try:
        param_ref = next(probe.parameters())
        device, dtype = param_ref.device, param_ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32

    if sample is None:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn((_FLOP_BATCH, *shape), generator=generator)
        inputs = inputs.to(device=device, dtype=dtype)
    else:
        inputs = sample.to(device=device)
    probe.train()
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        outputs = probe(inputs)
        if not isinstance(outputs, torch.Tensor):
            raise ConfigError("model: the model must return a tensor")
        loss = outputs.float().sum()
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops()) // len(inputs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in `model` (trainable or not)."""
    return sum(param.numel() for param in model.parameters())
