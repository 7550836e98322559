"""A model from outside fedmpi: a small CNN with GroupNorm layers (Wu and He 2018).

GroupNorm has parameters that fedmpi's ghost-norm DP-SGD path does not cover,
and no running statistics (BatchNorm's would differ between ranks).
"""

from __future__ import annotations

import torch
from torch import nn


class GroupNormCNN(nn.Module):
    """conv 3x3 -> GroupNorm -> ReLU -> 2x2 max pool, twice (width, then 2 x width
    channels), then a linear layer to the classes."""

    def __init__(self, input_shape: tuple, num_classes: int, width: int, groups: int):
        super().__init__()
        channels, height, wide = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(groups, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * (height // 4) * (wide // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def group_norm_cnn(*, input_shape: tuple, num_classes: int, width: int = 8, groups: int = 4) -> nn.Module:
    """fedmpi's model factory: images (C, H, W) of at least 4 x 4 pixels."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ValueError(f"group_norm_cnn needs images (C, H, W) of at least 4x4, got {tuple(input_shape)}")
    if width % groups:
        raise ValueError(f"width ({width}) must be a multiple of groups ({groups})")
    return GroupNormCNN(tuple(input_shape), num_classes, width, groups)
