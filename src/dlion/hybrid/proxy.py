"""Proxy supervision and router inputs for selective query (Kag et al., ICLR '23).

Proxy label per input: "send to cloud" (1) only if the edge model is wrong and the cloud model
right; "keep on edge" (0) if the edge is right or the cloud is also wrong (sending would not
help). Router inputs: the edge's penultimate features, its softmax entropy and top-k margins.
"""

from __future__ import annotations

import torch

from dlion.core.errors import ConfigError


def proxy_labels(edge_correct: torch.Tensor, cloud_correct: torch.Tensor) -> torch.Tensor:
    """1.0 (send) where the edge is wrong and the cloud right, else 0.0 (keep); float32."""
    if edge_correct.shape != cloud_correct.shape:
        raise ValueError(f"shapes differ: {tuple(edge_correct.shape)} vs {cloud_correct.shape}")
    send = ~edge_correct.bool() & cloud_correct.bool()
    return send.to(torch.float32)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of `probs` (n, classes); 0 log 0 counts as 0."""
    logs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logs).sum(dim=1)


def top_k_margins(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(n, top_k - 1): p(1) - p(j) for j = 2..top_k, with p sorted in decreasing order."""
    if not 2 <= top_k <= probs.shape[1]:
        raise ConfigError(
            f"router.top_k: must be between 2 and the class count {probs.shape[1]}, got {top_k}"
        )
    top = probs.topk(top_k, dim=1).values
    return top[:, :1] - top[:, 1:]


def router_features(features: torch.Tensor, logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Router input per input: [penultimate features, entropy, top-k margins]."""
    probs = torch.softmax(logits, dim=1)
    flat = features.reshape(features.shape[0], -1)
    return torch.cat([flat, entropy(probs)[:, None], top_k_margins(probs, top_k)], dim=1)


def oracle_scores(edge_correct: torch.Tensor, cloud_correct: torch.Tensor) -> torch.Tensor:
    """Send scores of the oracle router, which knows both models' correctness: first the
    inputs the cloud fixes (+1), then those where sending changes nothing (0), last those the
    cloud would break (-1). Sending the highest scores first maximises accuracy."""
    return cloud_correct.to(torch.float32) - edge_correct.to(torch.float32)
