"""Tests for dlion.training.models: shapes, deterministic init, FLOP counting,
trainability, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dlion.core.errors import ConfigError
from dlion.training.models import MODEL_NAMES, build_model, count_parameters, train_flops_per_sample

CNN_SHAPES: list[tuple[int, ...]] = [(1, 8, 8), (1, 40), (1, 28, 28), (3, 32, 32)]
MLP_SHAPES: list[tuple[int, ...]] = [*CNN_SHAPES, (64,), (40,)]


def _linear_train_flops(widths: list[int]) -> int:
    """Hand count of per-sample training FLOPs for an MLP with layer widths `widths`.

    For a Linear layer in -> out, FlopCounterMode counts per sample:
      forward   addmm            2 * in * out
      backward  grad of weight   2 * in * out
      backward  grad of input    2 * in * out, except for the first layer, whose input
                                 (the data) does not require grad
    Bias grads (sums), ReLU, flatten and cross-entropy are not counted.
    """
    total = 0
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        passes = 2 if index == 0 else 3
        total += passes * 2 * fan_in * fan_out
    return total


def test_model_names() -> None:
    assert MODEL_NAMES == ("mlp", "cnn")


@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_mlp_output_shape(shape: tuple[int, ...]) -> None:
    model = build_model("mlp", shape, 10)
    logits = model(torch.zeros(5, *shape))
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("shape", CNN_SHAPES)
def test_cnn_output_shape(shape: tuple[int, ...]) -> None:
    model = build_model("cnn", shape, 7)
    logits = model(torch.zeros(3, *shape))
    assert logits.shape == (3, 7)


def test_cnn_uses_1d_layers_for_sequences() -> None:
    model = build_model("cnn", (1, 40), 10)
    kinds = {type(module) for module in model.modules()}
    assert nn.Conv1d in kinds and nn.MaxPool1d in kinds
    assert nn.Conv2d not in kinds


def test_cnn_pools_only_while_spatial_size_allows() -> None:
    # 8x8 with three convs: 8 -> 4 -> 2, then no pool (it would leave 1x1).
    model = build_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_layer_sizes() -> None:
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 10)]
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_gives_identical_parameters(name: str) -> None:
    first = build_model(name, (1, 8, 8), 10, seed=3)
    second = build_model(name, (1, 8, 8), 10, seed=3)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_different_seed_gives_different_parameters(name: str) -> None:
    first = build_model(name, (1, 8, 8), 10, seed=0)
    second = build_model(name, (1, 8, 8), 10, seed=1)
    assert any(
        not torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_does_not_touch_global_rng(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    build_model(name, (1, 8, 8), 10, seed=5)
    assert torch.equal(before, torch.get_rng_state())


def test_mlp_flops_match_hand_count() -> None:
    model = build_model("mlp", (1, 8, 8), 10, hidden=(128, 64))
    # 2*2*(64*128) + 3*2*(128*64) + 3*2*(64*10) = 32768 + 49152 + 3840 = 85760
    expected = _linear_train_flops([64, 128, 64, 10])
    assert expected == 2 * 2 * 64 * 128 + 3 * 2 * 128 * 64 + 3 * 2 * 64 * 10
    assert train_flops_per_sample(model, (1, 8, 8)) == expected == 85760


def test_cnn_flops_match_hand_count() -> None:
    model = build_model("cnn", (1, 8, 8), 10, hidden=(128,), channels=(16, 32))
    # Conv 3x3, padding 1: forward 2 * H*W * C_in * C_out * 9 per sample; backward adds
    # the weight grad (same count) and, except for the first conv, the input grad.
    conv1 = 2 * 8 * 8 * 1 * 16 * 9
    conv2 = 2 * 4 * 4 * 16 * 32 * 9
    fc1 = 2 * (32 * 2 * 2) * 128
    fc2 = 2 * 128 * 10
    expected = 2 * conv1 + 3 * (conv2 + fc1 + fc2)
    assert train_flops_per_sample(model, (1, 8, 8)) == expected


def test_flops_independent_of_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import dlion.training.models as models_module

    model = build_model("mlp", (1, 8, 8), 10)
    counts = set()
    for batch in (1, 4, 7):
        monkeypatch.setattr(models_module, "_FLOP_BATCH", batch)
        counts.add(train_flops_per_sample(model, (1, 8, 8)))
    assert len(counts) == 1


@pytest.mark.parametrize(("name", "shape"), [("mlp", (1, 8, 8)), ("cnn", (1, 40))])
def test_flop_count_leaves_model_untouched(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    before = [p.detach().clone() for p in model.parameters()]
    assert train_flops_per_sample(model, shape) > 0
    for param, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, saved)
        assert param.grad is None


def test_flop_count_works_under_no_grad() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    with torch.no_grad():
        flops = train_flops_per_sample(model, (1, 8, 8))
    assert flops == 85760


def test_tiny_mlp_is_trainable() -> None:
    generator = torch.Generator().manual_seed(0)
    # Two Gaussian blobs in 4-D, well separated along every axis.
    inputs = torch.randn(64, 4, generator=generator)
    targets = torch.arange(64) % 2
    inputs = inputs + (targets.float().unsqueeze(1) * 2 - 1) * 3.0
    model = build_model("mlp", (4,), 2, hidden=(8,), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        initial = loss_fn(model(inputs), targets).item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_fn(model(inputs), targets).item()
        accuracy = (model(inputs).argmax(dim=1) == targets).float().mean().item()
    assert final < initial * 0.5
    assert accuracy > 0.95


def test_unknown_model_name() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.name: unknown model 'foo' \(choose from mlp, cnn\)"
    ):
        build_model("foo", (1, 8, 8), 10)


def test_cnn_rejects_flat_input() -> None:
    with pytest.raises(ConfigError, match=r"model\.input_shape.*\(C, H, W\) or \(C, L\).*mlp"):
        build_model("cnn", (64,), 10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": 0}, "model.num_classes"),
        ({"input_shape": (1, 0, 8)}, "model.input_shape"),
        ({"hidden": (128, -1)}, "model.hidden"),
        ({"channels": ()}, "model.channels"),
        ({"channels": "16"}, "model.channels"),
    ],
)
def test_bad_parameters_name_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_model("cnn", **args)  # type: ignore[arg-type]


def test_mlp_allows_no_hidden_layers() -> None:
    model = build_model("mlp", (40,), 10, hidden=())
    assert count_parameters(model) == 40 * 10 + 10
