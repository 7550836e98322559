"""Models for tests/test_extensions.py, named by import path (tests/helpers on PYTHONPATH)."""

from __future__ import annotations

import math

from torch import nn


def wrong_classes(*, input_shape: tuple, num_classes: int) -> nn.Module:
    """Three logits too many."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 3))


def batch_norm(*, input_shape: tuple, num_classes: int) -> nn.Module:
    """Running statistics: buffers that change in training."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def logreg(*, input_shape: tuple, num_classes: int) -> nn.Module:
    """The built-in logreg, as user code."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
