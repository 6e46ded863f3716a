"""Latency model of selective query (Kag et al., ICLR '23): every input runs the edge model
and the router; the share not covered by the edge also pays the uplink and the cloud model:
latency = edge compute + (1 - coverage) * (uplink + cloud compute)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlion.hybrid.config import LatencyConfig

_FLOP_BATCH = 4  # per-sample counts are exact integer divisions of a small batch


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one inference forward pass per sample, counted by torch's FlopCounterMode."""
    inputs = torch.zeros((_FLOP_BATCH, *input_shape))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return int(counter.get_total_flops()) // _FLOP_BATCH


def uplink_seconds(payload_bytes: float, bandwidth_mbps: float, latency_ms: float) -> float:
    """Time to ship one query: network latency plus payload over the uplink bandwidth."""
    return latency_ms / 1e3 + payload_bytes * 8 / (bandwidth_mbps * 1e6)


def expected_latency(edge_s: float, uplink_s: float, cloud_s: float, coverage: float) -> float:
    """Mean latency per input when a share `coverage` is answered on the edge."""
    return edge_s + (1.0 - coverage) * (uplink_s + cloud_s)


@dataclass(frozen=True)
class LatencyModel:
    """Per-input times in seconds."""

    edge_s: float  # edge model + router: paid by every input of the hybrid
    edge_model_s: float  # edge model alone: the edge-only baseline
    uplink_s: float  # one query over the uplink
    cloud_s: float  # cloud model plus serving overhead
    knn_s: float = 0.0  # kNN router alone (it runs beside the edge model instead of the router)

    def hybrid(self, coverage: float) -> float:
        return expected_latency(self.edge_s, self.uplink_s, self.cloud_s, coverage)

    def cloud_only(self) -> float:
        """No edge compute: every input goes straight to the cloud."""
        return self.uplink_s + self.cloud_s

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def build_latency_model(
    cfg: LatencyConfig,
    *,
    edge_flops: int,
    router_flops: int,
    cloud_flops: int,
    input_values: int,
    knn_flops: int = 0,
) -> LatencyModel:
    """Times from FLOP counts and the config's device capacities and link."""
    payload = (
        cfg.payload_bytes if cfg.payload_bytes is not None else input_values * (cfg.bytes_per_value)
    )
    edge_model_s = edge_flops / (cfg.edge_gflops * 1e9)
    return LatencyModel(
        edge_s=edge_model_s + router_flops / (cfg.edge_gflops * 1e9),
        edge_model_s=edge_model_s,
        uplink_s=uplink_seconds(payload, cfg.uplink_mbps, cfg.uplink_latency_ms),
        cloud_s=cloud_flops / (cfg.cloud_gflops * 1e9) + cfg.cloud_overhead_ms / 1e3,
        knn_s=knn_flops / (cfg.edge_gflops * 1e9),
    )
