"""Models, losses and metrics a user might write for other tasks than plain classification,
importable by tests as ``tests.user_tasks:<name>`` or by file path."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SigmoidCNN(nn.Module):
    """Ends in ``torch.sigmoid`` over its bins, as the pitch tracker torchcrepe does."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.features(x)))


class SoftmaxCNN(SigmoidCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.features(x)), dim=1)


def sigmoid_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return SigmoidCNN(num_classes, in_channels)


def offset_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus 10: the same gradients, and a loss that shows it was the one used."""
    return 10.0 + F.cross_entropy(outputs, targets)


def no_grad_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(outputs.detach().mean()))


def error_rate(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Lower is better, and says so."""
    return float((outputs.argmax(1) != targets).mean())


error_rate.higher_is_better = False  # type: ignore[attr-defined]


def sigmoid_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multi-label: one sigmoid per target."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, num_classes), nn.Sigmoid())


def regression_mlp(input_shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, 1))


def hamming(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Share of the (sample, target) pairs a 0.5 threshold gets right: multi-label accuracy."""
    return float(((outputs > 0.5) == (targets > 0.5)).mean())
