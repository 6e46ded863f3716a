"""Model zoo (mlp, cnn), deterministic construction, and per-sample training FLOP counts."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlion.errors import ConfigError

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
) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (no batch axis), initialised from `seed`.

    The global torch RNG state is left untouched, and equal arguments give bit-identical
    parameters.
    """
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


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward + backward pass of cross-entropy loss, per sample.

    Counted by torch's FlopCounterMode on a copy of `model`, so the caller's parameters,
    gradients and buffers are never touched.
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

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((_FLOP_BATCH, *shape), generator=generator).to(device=device, dtype=dtype)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        logits = probe(inputs)
        targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = nn.functional.cross_entropy(logits, targets)
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops()) // _FLOP_BATCH


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in `model` (trainable or not)."""
    return sum(param.numel() for param in model.parameters())
