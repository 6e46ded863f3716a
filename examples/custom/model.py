"""The user's own model: a small ResNet-style CNN with BatchNorm.

dlion calls `small_resnet(width=..., num_classes=...)` (config `model.name:
"model:small_resnet"`); `num_classes` is filled in by dlion from the data.
"""

from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.skip(x)).relu()


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.layers = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


def small_resnet(num_classes: int, width: int = 16) -> SmallResNet:
    return SmallResNet(num_classes, width)
