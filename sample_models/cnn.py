"""A tiny convolutional classifier with BatchNorm (so it carries buffers)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv/BN/ReLU stages, global average pooling and a linear classifier.

    Attribute names: ``features.0`` (Conv2d), ``features.1`` (BatchNorm2d, with
    ``running_mean``/``running_var``/``num_batches_tracked`` buffers), ``features.2`` (ReLU),
    ``features.3`` (Conv2d), ``features.4`` (BatchNorm2d), ``features.5`` (ReLU),
    ``features.6`` (AdaptiveAvgPool2d), ``features.7`` (Flatten), then ``classifier`` (Linear).
    With the defaults it has about 1.6k parameters. Input: ``(batch, in_channels, H, W)``.
    """

    def __init__(self, channels: int = 8, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, in_channels, H, W)`` images to ``(batch, num_classes)`` logits."""
        return self.classifier(self.features(x))
