"""Torch modules built from the registered architectures, and the flat-vector view
of their parameters.

The architectures themselves (logistic regression, MLP, McMahan et al.'s CNN)
are layer specs in :mod:`fedmpi.architectures`; this module turns them into
torch modules. A user model (:mod:`fedmpi.extensions`) is built by its factory.

Between ranks a model is one contiguous float32 vector. :class:`FlatModel` makes
the module's parameters and gradients *views* into two flat buffers, so loading
the global weights is one copy and the local update is one subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import extensions, seeding
from .architectures import layers
from .schema import ModelConfig


def build_model(cfg: ModelConfig, input_shape: tuple, num_classes: int, seed: int = 0) -> nn.Module:
    """The configured model for inputs of ``input_shape`` (without the batch dim), built
    from its layer specs in :mod:`fedmpi.architectures`, or by user code
    (:mod:`fedmpi.extensions`), which runs under torch's generator keyed (seed, "init")."""
    build = extensions.architecture(cfg.name).build
    if build is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.torch_seed(seed, "init"))
            return build(cfg, tuple(input_shape), num_classes)
    return nn.Sequential(*(_MODULES[layer.kind](*layer.args) for layer in layers(cfg, input_shape, num_classes)))


_MODULES = {
    "flatten": nn.Flatten,
    "linear": nn.Linear,
    "relu": nn.ReLU,
    "conv2d": lambda c_in, c_out, kernel, padding: nn.Conv2d(c_in, c_out, kernel, padding=padding),
    "maxpool2d": nn.MaxPool2d,
}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    offset: int
    numel: int


def layout(model: nn.Module) -> list[ParamSpec]:
    """Where each parameter lives in the flat vector, in ``named_parameters()`` order."""
    specs, offset = [], 0
    for name, p in model.named_parameters():
        specs.append(ParamSpec(name, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return specs


def flatten_params(model: nn.Module) -> np.ndarray:
    """A float32 copy of all parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float32).numpy().copy()


def load_flat(model: nn.Module, vector: np.ndarray) -> None:
    """Copy a flat vector into the model's parameters (no memory is shared with ``vector``)."""
    source = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(source[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def init_weights(model: nn.Module, seed: int) -> np.ndarray:
    """Re-initialise ``model`` from a keyed seed (not the ambient torch RNG); return the flat weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.torch_seed(seed, "init"))
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return flatten_params(model)


class FlatModel:
    """A module whose parameters and gradients are views into ``flat`` and ``grad``
    (on ``device``; the flat vectors that travel between ranks stay numpy on the CPU)."""

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.specs = layout(module)
        self.size = sum(s.numel for s in self.specs)
        self.flat = torch.zeros(self.size, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(self.size, dtype=torch.float32, device=self.device)
        for spec, p in zip(self.specs, module.parameters()):
            view = self.flat[spec.offset:spec.offset + spec.numel].view(spec.shape)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grad[spec.offset:spec.offset + spec.numel].view(spec.shape)

    def set_weights(self, vector: np.ndarray) -> None:
        self.flat.copy_(torch.from_numpy(vector))

    def weights(self) -> np.ndarray:
        """The flat weights as numpy: a view on the CPU, a copy from a GPU."""
        return self.flat.detach().cpu().numpy()
