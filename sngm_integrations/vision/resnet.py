"""ResNet-20-style networks for small images (He et al., 2016, the CIFAR variant).

Three stages of `depth` basic blocks with `width`, 2x and 4x channels. For 28x28
Fashion-MNIST the stem keeps full resolution, the stages run at 28, 14 and 7 pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ResNet", "resnet20"]


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: `6 * depth + 2` layers, three stages, global pooling."""

    def __init__(
        self, depth: int = 3, width: int = 16, in_channels: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(_BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        logits: Tensor = self.head(pooled)
        return logits


def resnet20(width: int = 16, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-20 (0.27M parameters at width 16) for 1-channel 28x28 inputs by default."""
    return ResNet(depth=3, width=width, in_channels=in_channels, num_classes=num_classes)
