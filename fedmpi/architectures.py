"""The model registry: every architecture as a list of layer specs, without torch.

An architecture is defined once, as plain layer specs (:class:`Layer`), from
which :func:`count_params` sizes rank 0's memory before torch is imported and
:func:`fedmpi.models.build_model` builds the torch module. Adding a model is one
function returning its layers plus one :data:`ARCHITECTURES` entry.

Models: multinomial logistic regression; an MLP with configurable hidden
widths; the MNIST CNN of McMahan et al. 2017 (two 5x5 conv layers with 32 and
64 channels, each followed by 2x2 max pooling, a 512-unit ReLU layer, softmax;
1,663,370 parameters on 28x28 inputs); the CIFAR-10 CNN of McMahan et al. 2017,
which the paper takes from TensorFlow's CIFAR-10 tutorial (two 5x5 conv layers
of 64 channels, each with 3x3 stride-2 max pooling and local response
normalisation, ReLU layers of 384 and 192 units, a linear output layer); and
their Shakespeare character LSTM (an 8-dimensional character embedding, two
LSTM layers of 256 units, a softmax over the characters, read at the last of
the 80 input characters).
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
    conv2d (in_channels, out_channels, kernel, padding), relu, maxpool2d (kernel),
    maxpool2d_same (kernel, stride: TensorFlow's SAME padding), lrn (size, alpha,
    beta, k: local response normalisation across channels), embedding
    (num_embeddings, dim), lstm (input_size, hidden_size: one batch-first LSTM
    layer returning its output sequence) or last_step (the sequence's last element)."""

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
        if self.kind == "embedding":
            return self.args[0] * self.args[1]
        if self.kind == "lstm":  # four gates, each with input and recurrent weights and two biases (PyTorch's LSTM)
            n_in, hidden = self.args
            return 4 * hidden * (n_in + hidden + 2)
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


def cifar_cnn_layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    """TensorFlow's CIFAR-10 tutorial CNN, as McMahan et al. 2017 use it: conv 5x5x64, ReLU,
    max pool 3x3 stride 2 (SAME), LRN; conv 5x5x64, ReLU, LRN, max pool; 384 and 192 ReLU
    units; linear logits. The tutorial's LRN (depth radius 4, bias 1, alpha 0.001/9,
    beta 0.75) is PyTorch's LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1), which
    divides alpha by the window size."""
    channels, height, width = input_shape
    lrn = Layer("lrn", (9, 0.001, 0.75, 1.0))
    return [
        Layer("conv2d", (channels, 64, 5, 2)), Layer("relu"), Layer("maxpool2d_same", (3, 2)), lrn,
        Layer("conv2d", (64, 64, 5, 2)), Layer("relu"), lrn, Layer("maxpool2d_same", (3, 2)),
        Layer("flatten"),
        Layer("linear", (64 * math.ceil(height / 4) * math.ceil(width / 4), 384)), Layer("relu"),
        Layer("linear", (384, 192)), Layer("relu"),
        Layer("linear", (192, num_classes)),
    ]


def char_lstm_layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    """McMahan et al. 2017's Shakespeare model: characters embedded in 8 dimensions, two
    LSTM layers of 256 units, a softmax over the characters. As in LEAF, the next
    character is predicted from the output at the last of the input characters; the
    input and output vocabularies are the same (``num_classes`` characters)."""
    return [Layer("embedding", (num_classes, 8)), Layer("lstm", (8, 256)), Layer("lstm", (256, 256)),
            Layer("last_step"), Layer("linear", (256, num_classes))]


def needs_sequences(input_shape: tuple) -> str | None:
    return None if len(input_shape) == 1 else "needs character sequences (L,)"


def needs_images(min_side: int) -> Callable[[tuple], str | None]:
    def check(input_shape: tuple) -> str | None:
        if len(input_shape) != 3 or input_shape[1] < min_side or input_shape[2] < min_side:
            return f"needs image inputs (C, H, W) of at least {min_side}x{min_side}"
        return None

    return check


@dataclass(frozen=True)
class Architecture:
    """``layers(model_cfg, input_shape, num_classes)``; ``reads``: the ``model.*`` keys it
    uses besides ``name``; ``check(input_shape)``: why the data does not fit, or None;
    ``tokens``: it reads integer token ids (characters), not real-valued features.
    ``build(model_cfg, input_shape, num_classes)``: a torch module made by user code
    instead of layer specs (:mod:`fedmpi.extensions`; ``layers`` is then None)."""

    layers: Callable[[ModelConfig, tuple, int], list[Layer]] | None
    paper: str
    reads: tuple[str, ...] = ()
    check: Callable[[tuple], str | None] | None = None
    tokens: bool = False
    build: Callable[[ModelConfig, tuple, int], Any] | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "logreg": Architecture(logreg_layers, "multinomial logistic regression"),
    "mlp": Architecture(mlp_layers, "multilayer perceptron with ReLU", reads=("hidden",)),
    "cnn": Architecture(mcmahan_cnn_layers, "McMahan et al. 2017 (MNIST CNN)", check=needs_images(4)),
    "cifar_cnn": Architecture(cifar_cnn_layers, "McMahan et al. 2017 (CIFAR-10 CNN of the TensorFlow tutorial)",
                              check=needs_images(4)),
    "char_lstm": Architecture(char_lstm_layers, "McMahan et al. 2017 (Shakespeare character LSTM)",
                              check=needs_sequences, tokens=True),
}


def layers(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> list[Layer]:
    return ARCHITECTURES[cfg.name].layers(cfg, tuple(input_shape), num_classes)


def count_params(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> int:
    """Parameters of the configured model, without building it."""
    return sum(layer.num_params for layer in layers(cfg, input_shape, num_classes))
