"""Torch modules built from the registered architectures, and the flat-vector view
of their parameters.

The architectures themselves (logistic regression, MLP, McMahan et al.'s CNNs
and character LSTM) are layer specs in :mod:`fedmpi.architectures`; this module
turns them into torch modules. The layers torch lacks are here: TensorFlow's
SAME max pooling, an embedding that takes byte-sized character codes, and a
batch-first LSTM layer whose forward is PyTorch's fused kernel and whose
``per_example_forward`` is the same LSTM written with operations that
``torch.func.vmap`` batches (DP-SGD's generic per-example path calls it). A user model
(:mod:`fedmpi.extensions`) is built by its factory.

Between ranks a model is one contiguous float32 vector. :class:`FlatModel` makes
the module's parameters and gradients *views* into two flat buffers, so loading
the global weights is one copy and the local update is one subtraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow's SAME padding: ceil(n / stride) outputs per side, the
    padding (of -inf) split with the extra element after, as TensorFlow places it."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), self.kernel, self.stride)


class TokenEmbedding(nn.Embedding):
    """An embedding of integer ids of any integer dtype (character codes are stored as uint8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.long())


class LSTMLayer(nn.LSTM):
    """One batch-first LSTM layer (PyTorch's gate order and parameters) returning its
    output sequence (B, T, hidden), from zero initial states.

    ``forward`` is PyTorch's fused LSTM kernel. ``per_example_forward`` computes the same
    function with an explicit recurrence whose backward pass forms the weight gradients
    as one product over all time steps, so ``torch.func.vmap`` gives per-example
    gradients at the cost of one batched pass (vmap can only run the fused kernel
    example by example, about 60x slower)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]

    def per_example_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LSTMSequence.apply(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)[0]


class _LSTMSequence(torch.autograd.Function):
    """z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh; i, f, o = sigmoid, g = tanh of its four
    quarters; c_t = f c_{t-1} + i g; h_t = o tanh(c_t). Returns (h, c, activated gates),
    the last two saved for the backward pass (back-propagation through time)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_ih, w_hh, b_ih, b_hh):
        batch, steps, _ = x.shape
        hidden = w_hh.shape[1]
        xz = F.linear(x, w_ih, b_ih + b_hh)
        h = c = x.new_zeros(batch, hidden)
        hs, cs, gates = [], [], []
        for t in range(steps):
            z = torch.addmm(xz[:, t], h, w_hh.t())
            i, f, o = (torch.sigmoid(z[:, k * hidden:(k + 1) * hidden]) for k in (0, 1, 3))
            g = torch.tanh(z[:, 2 * hidden:3 * hidden])
            c = f * c + i * g
            h = o * torch.tanh(c)
            hs.append(h)
            cs.append(c)
            gates.append(torch.cat([i, f, g, o], 1))
        return torch.stack(hs, 1), torch.stack(cs, 1), torch.stack(gates, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_ih, w_hh, _, _ = inputs
        hs, cs, gates = output
        ctx.mark_non_differentiable(cs, gates)
        ctx.save_for_backward(x, w_ih, w_hh, hs, cs, gates)

    @staticmethod
    def backward(ctx, d_hs, d_cs, d_gates):
        x, w_ih, w_hh, hs, cs, gates = ctx.saved_tensors
        batch, steps, hidden = hs.shape
        dh_next = dc_next = hs.new_zeros(batch, hidden)
        dzs = []
        for t in range(steps - 1, -1, -1):
            gate = gates[:, t]
            i, f, g, o = (gate[:, k * hidden:(k + 1) * hidden] for k in range(4))
            tanh_c = torch.tanh(cs[:, t])
            dh = d_hs[:, t] + dh_next
            dc = dh * o * (1 - tanh_c * tanh_c) + dc_next
            c_prev = cs[:, t - 1] if t > 0 else torch.zeros_like(dc)
            dz = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                            dh * tanh_c * o * (1 - o)], 1)
            dzs.append(dz)
            dc_next = dc * f
            dh_next = dz @ w_hh
        dz_all = torch.stack(dzs[::-1], 1)  # (B, T, 4 hidden)
        h_prev = torch.cat([hs.new_zeros(batch, 1, hidden), hs[:, :-1]], 1)
        dz_flat = dz_all.reshape(batch * steps, 4 * hidden)
        d_w_hh = dz_flat.t() @ h_prev.reshape(batch * steps, hidden)
        d_w_ih = dz_flat.t() @ x.reshape(batch * steps, -1)
        d_b = dz_flat.sum(0)
        return dz_all @ w_ih, d_w_ih, d_w_hh, d_b, d_b


class LastStep(nn.Module):
    """(B, T, features) -> (B, features): the sequence's last element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


_MODULES = {
    "flatten": nn.Flatten,
    "linear": nn.Linear,
    "relu": nn.ReLU,
    "conv2d": lambda c_in, c_out, kernel, padding: nn.Conv2d(c_in, c_out, kernel, padding=padding),
    "maxpool2d": nn.MaxPool2d,
    "maxpool2d_same": MaxPool2dSame,
    "lrn": lambda size, alpha, beta, k: nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k),
    "embedding": TokenEmbedding,
    "lstm": LSTMLayer,
    "last_step": LastStep,
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
