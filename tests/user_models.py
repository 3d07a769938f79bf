"""Model builders a user might write, importable by tests as ``tests.user_models:<name>``."""

from __future__ import annotations

import torch
from torch import nn


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BN and an identity/1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = _BasicBlock(width, width, 1)
        self.layer2 = _BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return ResNetCNN(num_classes, in_channels)


def resnet_cnn_shaped(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A builder that needs both keywords the loader can pass."""
    return ResNetCNN(num_classes, in_channels=input_shape[0])


def fixed_cnn() -> nn.Module:
    """Takes no arguments: always 10 classes, one channel."""
    return ResNetCNN(10, 1)


def raises() -> nn.Module:
    raise RuntimeError("the builder's own bug")


def not_a_module() -> dict:
    return {"weights": [1, 2, 3]}


NOT_CALLABLE = 3
