"""The selective-query router (Kag et al., ICLR '23): a small MLP on router features that
outputs a send-to-cloud logit, trained on proxy labels with a coverage penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Router(nn.Module):
    """Standardise the inputs (statistics kept as buffers, so they are saved with the
    weights), then an MLP to `outputs` logits. One logit (the paper's router): higher means
    "send to the cloud", returned as (n,). Two (the gain router, `gain.py`): (n, 2)."""

    # Buffers (register_buffer below), declared for the type checker.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, in_features: int, hidden: Sequence[int], seed: int, outputs: int = 1
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        layers: list[nn.Module] = []
        width = in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for out in hidden:
                layers += [nn.Linear(width, out), nn.ReLU()]
                width = out
            layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def fit_standardisation(self, inputs: torch.Tensor) -> None:
        """Set the input mean/std from the router's training inputs."""
        self.mean.copy_(inputs.mean(dim=0))
        # Constant inputs (a dead ReLU unit) would divide by zero.
        self.std.copy_(inputs.std(dim=0).clamp_min(1e-6))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.net((inputs - self.mean) / self.std)
        return out.squeeze(1) if out.shape[1] == 1 else out


def router_loss(
    send_logits: torch.Tensor,
    proxy: torch.Tensor,
    train_coverage: float,
    coverage_penalty: float,
) -> torch.Tensor:
    """Binary cross-entropy on the proxy labels plus
    coverage_penalty * max(0, train_coverage - mean keep-probability)^2:
    the router is charged when, on this batch, it would send more than 1 - train_coverage."""
    bce = nn.functional.binary_cross_entropy_with_logits(send_logits, proxy)
    keep_rate = torch.sigmoid(-send_logits).mean()
    shortfall = torch.clamp(train_coverage - keep_rate, min=0.0)
    return bce + coverage_penalty * shortfall**2
