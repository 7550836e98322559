"""Sample-level DP-SGD (Abadi et al. 2016): per-example clipping for a whole model.

Every per-example gradient is clipped to L2 norm C (``max_grad_norm``), the
clipped gradients are summed; :class:`fedmpi.training.LocalTrainer` then adds
Gaussian noise N(0, sigma^2 C^2) to the sum and divides by the expected batch
size. Local batches are Poisson-sampled (rate q = B / n_local), which is what
the accountant assumes.

Per-example gradients are never formed for a whole model at once. For a
Linear layer the norm of example i's weight gradient is |g_i| |a_i| (output
gradient times input, the "ghost norm"), and the clipped sum is one matmul
(c * G)^T A. For Conv2d the per-example weight gradients are one batched
matmul of the unfolded input with the output gradient. Only the gradients
with respect to layer outputs come from autograd, so the ordinary weight
gradients are not computed twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class PerExampleGradients:
    """Per-example gradient norms and clipped gradient sums for a module built from
    Linear and Conv2d layers (plus parameter-free layers)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers = []
        for name, sub in module.named_modules():
            own = list(sub.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(sub, SUPPORTED_LAYERS):
                raise ValueError(f"DP-SGD supports Linear and Conv2d layers; {name or 'the model'} is a "
                                 f"{type(sub).__name__} with parameters")
            if isinstance(sub, nn.Conv2d) and (sub.groups != 1 or sub.padding_mode != "zeros"):
                raise ValueError(f"DP-SGD supports Conv2d with groups=1 and zero padding; {name} is not")
            self.layers.append(sub)
        self._records: list = []
        self._hooks = [layer.register_forward_hook(self._record) for layer in self.layers]
        self._active = False

    def remove(self) -> None:
        """Detach the forward hooks from the module."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, layer, inputs, output):
        if self._active:
            self._records.append((layer, inputs[0].detach(), output))

    def compute(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, max_grad_norm: float,
                out: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Write the sum of clipped per-example gradients into ``out`` (one tensor per
        parameter, ``named_parameters()`` order); return (per-example norms, summed loss)."""
        self._records = []
        self._active = True
        try:
            output = self.module(x)
        finally:
            self._active = False
        loss = loss_fn(output, y, reduction="sum")
        records = self._records
        self._records = []
        grads = torch.autograd.grad(loss, [r[2] for r in records])
        batch = x.shape[0]
        sq_norms = torch.zeros(batch, dtype=torch.float64)
        parts = []
        for (layer, a, _), g in zip(records, grads):
            part = _layer_parts(layer, a, g)
            sq_norms += part[0]
            parts.append(part)
        norms = sq_norms.sqrt()
        factors = (max_grad_norm / norms.clamp_min(1e-300)).clamp(max=1.0).to(output.dtype)
        slot = {p: t for p, t in zip(self.module.parameters(), out)}
        for (layer, _, _), (_, weight_sum, bias_sum) in zip(records, parts):
            weight_sum(factors, slot[layer.weight])
            if layer.bias is not None:
                bias_sum(factors, slot[layer.bias])
        return norms, float(loss.detach())


def _layer_parts(layer: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """(per-example squared norm of the layer's gradient, weight-sum writer, bias-sum writer)."""
    if isinstance(layer, nn.Linear):
        if a.dim() == 2:
            sq = (g.square().sum(1) * a.square().sum(1)).double()  # |g_i a_i^T|_F^2 = |g_i|^2 |a_i|^2
            if layer.bias is not None:
                sq += g.square().sum(1).double()

            def weight_sum(c, dest):
                torch.mm((g * c[:, None]).t(), a, out=dest)

            def bias_sum(c, dest):
                torch.mv(g.t(), c, out=dest)

            return sq, weight_sum, bias_sum
        per = torch.einsum("b...o,b...i->boi", g, a)  # sequence inputs: materialise
        return _materialised(per, g.reshape(g.shape[0], -1, g.shape[-1]).sum(1), layer)
    cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    g_flat = g.reshape(g.shape[0], g.shape[1], -1)
    per = torch.bmm(g_flat, cols.transpose(1, 2))  # (B, C_out, C_in*k*k)
    return _materialised(per, g_flat.sum(2), layer)


def _materialised(per_weight: torch.Tensor, per_bias: torch.Tensor, layer: nn.Module):
    sq = per_weight.square().sum(dim=(1, 2)).double()
    if layer.bias is not None:
        sq += per_bias.square().sum(1).double()

    def weight_sum(c, dest):
        torch.mv(per_weight.reshape(per_weight.shape[0], -1).t(), c, out=dest.view(-1))

    def bias_sum(c, dest):
        torch.mv(per_bias.t(), c, out=dest)

    return sq, weight_sum, bias_sum


def clipped_grad_sum(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                     max_grad_norm: float) -> torch.Tensor:
    """The flat sum over the batch of per-example gradients, each clipped to L2 norm
    ``max_grad_norm``, without noise, in ``model.named_parameters()`` order.

    ``loss_fn(outputs, targets, reduction="sum")`` must sum independent per-example
    losses (e.g. ``torch.nn.functional.cross_entropy``).
    """
    params = [p for _, p in model.named_parameters()]
    out = [torch.empty_like(p) for p in params]
    per_example = PerExampleGradients(model)
    try:
        per_example.compute(x, y, loss_fn, max_grad_norm, out)
    finally:
        per_example.remove()
    return torch.cat([t.reshape(-1) for t in out])
