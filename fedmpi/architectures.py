"""The model registry: every architecture as a list of layer specs, without torch.

An architecture is defined once, as plain layer specs (:class:`Layer`), from
which :func:`count_params` sizes rank 0's memory before torch is imported and
:func:`fedmpi.models.build_model` builds the torch module. Adding a model is one
function returning its layers plus one :data:`ARCHITECTURES` entry.

Models: multinomial logistic regression; an MLP with configurable hidden
widths; the MNIST CNN of McMahan et al. 2017 (two 5x5 conv layers with 32 and
64 channels, each followed by 2x2 max pooling, a 512-unit ReLU layer, softmax;
1,663,370 parameters on 28x28 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .schema import ModelConfig


@dataclass(frozen=True)
class Layer:
    """One layer: ``kind`` is flatten, linear (in_features, out_features),
    conv2d (in_channels, out_channels, kernel, padding), relu or maxpool2d (kernel)."""

    kind: str
    args: tuple = ()

    @property
    def num_params(self) -> int:
        if self.kind == "linear":
            fan_in, fan_out = self.args
            return (fan_in + 1) * fan_out
        if self.kind == "conv2d":
            c_in, c_out, kernel, _ = self.args
            return (c_in * kernel * kernel + 1) * c_out
        return 0


def logreg_layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    return [Layer("flatten"), Layer("linear", (math.prod(input_shape), num_classes))]


def mlp_layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    layers, width = [Layer("flatten")], math.prod(input_shape)
    for hidden in cfg.hidden:
        layers += [Layer("linear", (width, hidden)), Layer("relu")]
        width = hidden
    return [*layers, Layer("linear", (width, num_classes))]


def mcmahan_cnn_layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    channels, height, width = input_shape
    return [
        Layer("conv2d", (channels, 32, 5, 2)), Layer("relu"), Layer("maxpool2d", (2,)),
        Layer("conv2d", (32, 64, 5, 2)), Layer("relu"), Layer("maxpool2d", (2,)),
        Layer("flatten"),
        Layer("linear", (64 * (height // 4) * (width // 4), 512)), Layer("relu"),
        Layer("linear", (512, num_classes)),
    ]


def needs_images(min_side: int) -> Callable[[tuple], str | None]:
    def check(input_shape: tuple) -> str | None:
        if len(input_shape) != 3 or input_shape[1] < min_side or input_shape[2] < min_side:
            return f"needs image inputs (C, H, W) of at least {min_side}x{min_side}"
        return None

    return check


@dataclass(frozen=True)
class Architecture:
    """``layers(model_cfg, input_shape, num_classes)``; ``reads``: the ``model.*`` keys it
    uses besides ``name``; ``check(input_shape)``: why the data does not fit, or None.
    ``build(model_cfg, input_shape, num_classes)``: a torch module made by user code
    instead of layer specs (:mod:`fedmpi.extensions`; ``layers`` is then None)."""

    layers: Callable[[ModelConfig, tuple, int], list[Layer]] | None
    paper: str
    reads: tuple[str, ...] = ()
    check: Callable[[tuple], str | None] | None = None
    build: Callable[[ModelConfig, tuple, int], Any] | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "logreg": Architecture(logreg_layers, "multinomial logistic regression"),
    "mlp": Architecture(mlp_layers, "multilayer perceptron with ReLU", reads=("hidden",)),
    "cnn": Architecture(mcmahan_cnn_layers, "McMahan et al. 2017 (MNIST CNN)", check=needs_images(4)),
}


def layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    return ARCHITECTURES[cfg.name].layers(cfg, tuple(input_shape), num_classes)


def count_params(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> int:
    """Parameters of the configured model, without building it."""
    return sum(layer.num_params for layer in layers(cfg, input_shape, num_classes))
