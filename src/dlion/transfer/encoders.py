"""Per-modality encoders onto a shared latent, and classifier heads (RecycleML, EdgeSys '18).

A time series `(channels, length)` gets a 1-D CNN, a feature vector `(features,)` an MLP; both
end in a linear layer of width `latent_dim`. That layer is what RecycleML transfers: the target
modality's encoder is trained to reproduce the source encoder's output on synchronized pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dlion.core.errors import DataError
from dlion.transfer.config import ModelSection, TransferConfig


class Standardize(nn.Module):
    """(x - mean) / std with per-channel (time series) or per-feature statistics as buffers,
    so the saved weights carry the normalization they were trained with."""

    # Buffers (register_buffer below), declared for the type checker.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def input_stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a modality, shaped to broadcast over a batch; constant inputs get std 1."""
    axes = (0, 2) if x.ndim == 3 else (0,)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    std = np.where(std > 1e-6, std, 1.0)
    # Drop the batch axis: the buffers hold one sample's shape.
    return torch.as_tensor(mean[0], dtype=torch.float32), torch.as_tensor(
        std[0], dtype=torch.float32
    )


class ConvEncoder(nn.Module):
    """1-D CNN: [conv, ReLU, max-pool 2] per layer, global average pool, linear to the latent."""

    def __init__(
        self, in_channels: int, channels: Sequence[int], kernel_size: int, latent_dim: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            layers += [
                nn.Conv1d(prev, width, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
                nn.MaxPool1d(2, ceil_mode=True),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(prev, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Averaging over time makes the code independent of where in the window a rhythm sits.
        return self.out(self.features(x).mean(dim=2))


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_encoder(
    sample_shape: tuple[int, ...], cfg: ModelSection, stats: tuple[torch.Tensor, torch.Tensor]
) -> nn.Sequential:
    """Standardize, then a CNN for `(channels, length)` or an MLP for `(features,)`."""
    if len(sample_shape) == 2:
        core: nn.Module = ConvEncoder(
            sample_shape[0], cfg.conv_channels, cfg.kernel_size, cfg.latent_dim
        )
    elif len(sample_shape) == 1:
        core = mlp([sample_shape[0], *cfg.mlp_hidden, cfg.latent_dim])
    else:
        raise DataError(f"no encoder for samples of shape {sample_shape}")
    return nn.Sequential(Standardize(*stats), core)


def build_head(latent_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Classifier on the latent: linear when `hidden` is 0, else one hidden ReLU layer."""
    return mlp([latent_dim, num_classes] if hidden == 0 else [latent_dim, hidden, num_classes])


class Classifier(nn.Module):
    """An encoder and a head; `encoder(x)` is the latent layer that transfer works on."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def few_label_hidden(cfg: TransferConfig) -> int:
    """Hidden width of the few-label head (0: linear); a copied source head keeps its own."""
    return 0 if cfg.labels.head == "linear" else cfg.model.head_hidden
