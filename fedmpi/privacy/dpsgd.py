"""Sample-level DP-SGD (Abadi et al. 2016): per-example clipping for a whole model.

Every per-example gradient is clipped to L2 norm C (``max_grad_norm``), the
clipped gradients are summed; :class:`fedmpi.training.LocalTrainer` then adds
Gaussian noise N(0, sigma^2 C^2) to the sum and divides by the expected batch
size. Local batches are Poisson-sampled (rate q = B / n_local), which is what
the accountant assumes.

Per-example gradients come layer by layer, each layer on one of two paths
(:func:`per_example_plan` chooses, once per model):

- **ghost norm** (Linear, Conv2d with groups=1 and zero padding). For a Linear
  layer the norm of example i's weight gradient is |g_i| |a_i| (output gradient
  times input, the "ghost norm"), and the clipped sum is one matmul
  (c * G)^T A. For Conv2d the per-example weight gradients are one batched
  matmul of the unfolded input with the output gradient.
- **vmap**, the generic path, for every other layer with parameters (embeddings,
  LSTMs, normalisation layers, grouped convolutions, user layers; and any layer
  called more than once in a forward pass): ``torch.func.vmap`` over
  ``torch.func.grad`` of ``torch.func.functional_call`` of that layer alone, one
  example at a time, at the layer's recorded input and the gradient of the loss
  with respect to its output. This gives the layer's per-example gradients
  (materialised: batch x the layer's parameters). A layer may define
  ``per_example_forward(*inputs)``, the same function as ``forward`` written
  with operations vmap batches; the generic path then differentiates that
  instead (:class:`fedmpi.models.LSTMLayer` does: vmap runs PyTorch's fused LSTM
  kernel example by example).

One forward pass records every layer's input and output; autograd then gives
the gradients with respect to the layer outputs only, so the ordinary weight
gradients are never computed. The per-example squared norms of all layers add
up (in float64) to each example's norm.

What the generic path needs of a layer (user models too): every tensor it takes
and returns has the batch as its first dimension, examples do not interact
(BatchNorm in training mode is refused; an LSTM must be batch-first), and its
parameters are used inside its own ``forward`` only (tied weights are not
seen). Parameters of a layer the forward pass does not reach get a zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

GHOST_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerPlan:
    """One layer with parameters: its name in the model, the module, and its path
    (``ghost`` or ``vmap``)."""

    name: str
    layer: nn.Module
    path: str


def _ghost_supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    return isinstance(layer, GHOST_LAYERS)


def per_example_plan(module: nn.Module) -> list[LayerPlan]:
    """Every submodule that owns parameters, in ``named_modules()`` order, with the path
    its per-example gradients take. Raises ValueError for a layer no path can serve."""
    plan = []
    for name, sub in module.named_modules():
        if not list(sub.parameters(recurse=False)):
            continue
        label = name or "the model"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"DP-SGD needs per-example gradients, but {label} is a {type(sub).__name__}, which mixes the "
                             "examples of a batch; use GroupNorm or LayerNorm")
        if isinstance(sub, nn.RNNBase) and not sub.batch_first:
            raise ValueError(f"DP-SGD's per-example path needs the batch first; {label} is a {type(sub).__name__} "
                             "with batch_first=False")
        plan.append(LayerPlan(name, sub, "ghost" if _ghost_supported(sub) else "vmap"))
    return plan


def describe_plan(plan: list[LayerPlan]) -> str:
    """One line: which layers take which path, e.g. ``ghost norm for 1 layer (4: Linear);
    torch.func vmap for 3 layers (0: TokenEmbedding, 1: LSTMLayer, 2: LSTMLayer)``
    (a ghost-norm layer called more than once per forward pass takes the vmap path)."""
    parts = []
    for path, what in (("ghost", "ghost norm"), ("vmap", "torch.func vmap")):
        chosen = [p for p in plan if p.path == path]
        if chosen:
            names = ", ".join(f"{p.name or 'model'}: {type(p.layer).__name__}" for p in chosen)
            parts.append(f"{what} for {len(chosen)} layer{'s' * (len(chosen) != 1)} ({names})")
    return "; ".join(parts)


class PerExampleGradients:
    """Per-example gradient norms and clipped gradient sums for a module, each layer
    with parameters on its path (:func:`per_example_plan`)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.plan = per_example_plan(module)
        self.layers = [p.layer for p in self.plan]
        self._ghost = {p.layer for p in self.plan if p.path == "ghost"}
        self._own = {p.layer: list(p.layer.parameters(recurse=False)) for p in self.plan}
        self._records: list = []
        self._hooks = [layer.register_forward_hook(self._record) for layer in self.layers]
        self._active = False

    @property
    def uses_vmap(self) -> bool:
        return any(p.path == "vmap" for p in self.plan)

    def remove(self) -> None:
        """Detach the forward hooks from the module."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, layer, inputs, output):
        if self._active:
            self._records.append((layer, tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs), output))

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
        # every differentiable tensor each call returned, and the loss's gradient with respect to it
        returned = [[r[2]] if isinstance(r[2], torch.Tensor) else tree_flatten(r[2])[0] for r in records]
        chosen = [[i for i, t in enumerate(ts) if isinstance(t, torch.Tensor) and t.requires_grad] for ts in returned]
        targets = [ts[i] for ts, idx in zip(returned, chosen) for i in idx]
        grads = iter(torch.autograd.grad(loss, targets, allow_unused=True) if targets else ())
        calls: dict[nn.Module, list] = {}
        for (layer, inputs, _), ts, idx in zip(records, returned, chosen):
            cotangents = [g if g is not None else torch.zeros_like(ts[i]) for i, g in zip(idx, grads)]
            calls.setdefault(layer, []).append((inputs, idx, [ts[i] for i in idx], cotangents))
        batch = x.shape[0]
        sq_norms = torch.zeros(batch, dtype=torch.float64)
        parts = []
        for layer, layer_calls in calls.items():
            if layer in self._ghost and len(layer_calls) == 1 and len(layer_calls[0][1]) == 1:
                inputs, _, _, (g,) = layer_calls[0]
                part = _layer_parts(layer, inputs[0], g)
            else:  # the generic path; also for a Linear or Conv2d called more than once
                part = _vmap_parts(layer, layer_calls, batch)
            sq_norms += part[0]
            parts.append((layer, part))
        norms = sq_norms.sqrt()
        factors = (max_grad_norm / norms.clamp_min(1e-300)).clamp(max=1.0).to(output.dtype)
        slot = {p: t for p, t in zip(self.module.parameters(), out)}
        written = 0
        for layer, (_, write) in parts:
            write(factors, slot)
            written += len(self._own[layer])
        if written < len(slot):  # parameters of layers the forward pass did not reach
            reached = {p for layer, _ in parts for p in self._own[layer]}
            for p, t in slot.items():
                if p not in reached:
                    t.zero_()
        return norms, float(loss.detach())


def _layer_parts(layer: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """The ghost-norm path of one Linear or Conv2d layer: (per-example squared norm of its
    gradient, writer of its clipped weight and bias sums into ``slot[parameter]``)."""
    if isinstance(layer, nn.Linear):
        if a.dim() == 2:
            sq = (g.square().sum(1) * a.square().sum(1)).double()  # |g_i a_i^T|_F^2 = |g_i|^2 |a_i|^2
            if layer.bias is not None:
                sq += g.square().sum(1).double()

            def weight_sum(c, dest):
                torch.mm((g * c[:, None]).t(), a, out=dest)

            def bias_sum(c, dest):
                torch.mv(g.t(), c, out=dest)

            return sq, _writer(layer, weight_sum, bias_sum)
        per = torch.einsum("b...o,b...i->boi", g, a)  # sequence inputs: materialise
        return _materialised(per, g.reshape(g.shape[0], -1, g.shape[-1]).sum(1), layer)
    cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    g_flat = g.reshape(g.shape[0], g.shape[1], -1)
    per = torch.bmm(g_flat, cols.transpose(1, 2))  # (B, C_out, C_in*k*k)
    return _materialised(per, g_flat.sum(2), layer)


def _vmap_parts(layer: nn.Module, calls: list, batch: int):
    """The generic path of one layer: (per-example squared norm, writer of every clipped
    parameter sum); vmap over grad of functional_call, summed over the layer's calls."""
    names = [name for name, _ in layer.named_parameters(recurse=False)]
    params = {f"layer.{name}": p.detach() for name, p in layer.named_parameters(recurse=False)}
    call = _PerExampleCall(layer)
    total = None
    for inputs, chosen, outputs, cotangents in calls:
        leaves, spec = tree_flatten(inputs)
        batched = [isinstance(t, torch.Tensor) for t in leaves]
        for t in [t for t, b in zip(leaves, batched) if b] + list(outputs):
            if t.dim() == 0 or t.shape[0] != batch:
                raise ValueError(f"DP-SGD's per-example path needs the batch ({batch}) as the first dimension of every "
                                 f"tensor a layer takes and returns; a {type(layer).__name__} has one of shape "
                                 f"{tuple(t.shape)}")

        def example_loss(p, example_leaves, example_cotangents, leaves=leaves, batched=batched, spec=spec, chosen=chosen):
            it = iter(example_leaves)
            rebuilt = [next(it).unsqueeze(0) if b else t for t, b in zip(leaves, batched)]
            returned = tree_flatten(functional_call(call, p, tuple(tree_unflatten(rebuilt, spec))))[0]
            return sum((returned[i] * c.unsqueeze(0)).sum() for i, c in zip(chosen, example_cotangents))

        per = vmap(grad(example_loss), in_dims=(None, 0, 0))(
            params, [t for t, b in zip(leaves, batched) if b], list(cotangents))
        total = per if total is None else {k: total[k] + per[k] for k in total}
    per_example = [total[f"layer.{name}"] for name in names]
    sq = sum(g.reshape(batch, -1).square().sum(1).double() for g in per_example)

    def write_all(c, slot):
        for name, g in zip(names, per_example):
            torch.mv(g.reshape(batch, -1).t(), c, out=slot[getattr(layer, name)].view(-1))

    return sq, write_all


class _PerExampleCall(nn.Module):
    """Calls ``layer.per_example_forward`` where the layer has one, else the layer itself
    (functional_call swaps the parameters of ``self.layer``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        own = getattr(self.layer, "per_example_forward", None)
        return own(*inputs) if own is not None else self.layer(*inputs)


def _materialised(per_weight: torch.Tensor, per_bias: torch.Tensor, layer: nn.Module):
    sq = per_weight.square().sum(dim=(1, 2)).double()
    if layer.bias is not None:
        sq += per_bias.square().sum(1).double()

    def weight_sum(c, dest):
        torch.mv(per_weight.reshape(per_weight.shape[0], -1).t(), c, out=dest.view(-1))

    def bias_sum(c, dest):
        torch.mv(per_bias.t(), c, out=dest)

    return sq, _writer(layer, weight_sum, bias_sum)


def _writer(layer: nn.Module, weight_sum: Callable, bias_sum: Callable) -> Callable:
    def write(c, slot):
        weight_sum(c, slot[layer.weight])
        if layer.bias is not None:
            bias_sum(c, slot[layer.bias])

    return write


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
