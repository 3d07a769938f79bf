"""A plain ResNet-style CNN for 28x28 grey-scale digits: the "user's own model" of
`bench/compress.py`, handed to `nas-run compress` as builder + state dict::

    nas-run compress --model bench/resnet_cnn.py:resnet_cnn --weights cnn.safetensors \
        --dataset mnist5k --out DIR

Basic blocks of He et al. 2016 ("Deep Residual Learning for Image Recognition"): two 3x3
conv-BN layers with an identity shortcut, or a 1x1 strided conv-BN projection where the width or
resolution changes. Widths 32-64-128 on 14x14 / 7x7 / 4x4 maps: about 0.3 M parameters and
10 M MACs, so ONNX Runtime latency at batch 1 is mostly compute, not call overhead, and the
residual adds give structured pruning coupled channels to handle (DepGraph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "resnet_cnn"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet_cnn(
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 28, 28),
    widths: Sequence[int] = (32, 64, 128),
) -> nn.Module:
    """Stem (3x3, stride 2) -> one basic block per width (the first at stride 1, then stride 2)
    -> global average pool -> linear classifier."""
    cin = int(input_shape[0])
    layers: list[nn.Module] = [
        nn.Conv2d(cin, widths[0], 3, 2, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    prev = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(prev, w, stride=1 if i == 0 else 2))
        prev = w
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(prev, num_classes),
    )
