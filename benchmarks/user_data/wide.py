"""A user dataset for the memory benchmark: `n` samples of `features` floats (seeded), as
a map-style Dataset with `targets`, and the same arrays as an npz file for the built-in
path. Used by benchmarks/RESULTS.md section 10 (peak memory of user data)."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import Dataset


class Wide(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, n: int, features: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 10, (n,), generator=g)
        self.x = torch.randn(n, features, generator=g) + self.targets[:, None].float() * 0.1

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.targets[i])

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(self.x[i], int(self.targets[i])) for i in idx]


def wide(n: int = 20000, features: int = 784) -> tuple[Wide, Wide]:
    return Wide(n, features, 1), Wide(max(1, n // 10), features, 2)


if __name__ == "__main__":  # python wide.py N FEATURES OUT.npz: the same data as a file
    n, features, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    train, test = wide(n, features)
    np.savez(
        out,
        x=train.x.numpy(),
        y=train.targets.numpy(),
        x_test=test.x.numpy(),
        y_test=test.targets.numpy(),
    )
