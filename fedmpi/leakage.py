"""Gradient leakage: what an honest-but-curious server can rebuild from one client's update.

This module owns the reconstruction attacks a curious server can mount on a single
client's update ``w_local - w_global`` (or on a gradient), and the metrics that say
how much leaked. It is pure: torch, numpy and scipy only; no MPI, no files.

Metrics (images on a [0, 1] scale; :func:`to_unit` maps normalized inputs back):

- :func:`mse`, :func:`psnr` per image; :func:`ssim` per image (Wang, Bovik, Sheikh
  and Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 2004);
- :func:`match`: minimum-cost assignment of reconstructions to true examples;
  :func:`label_accuracy`; :func:`mean_image_psnr`, the "nothing leaked" reference.

Attacks:

- :func:`gradient_from_update` and :func:`analytic_fc_input`: exact recovery of the
  input of a fully connected layer from its weight and bias gradients for a batch
  of one (Phong et al., "Privacy-preserving deep learning via additively
  homomorphic encryption", IEEE TIFS 2018; also discussed by Geiping et al. 2020);
- :func:`idlg_label`: iDLG label recovery (Zhao, Mopuri and Bilen, "iDLG: Improved
  Deep Leakage from Gradients", arXiv:2001.02610, 2020);
- :func:`dlg`: Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019);
- :func:`inverting_gradients`: Geiping, Bauermeister, Droege and Moeller,
  "Inverting Gradients - How easy is it to break privacy in federated
  learning?", NeurIPS 2020;
- :func:`fedavg_inversion`: the same paper's attack on updates made of several
  local SGD steps, which unrolls the client's local training
  (:func:`simulate_update`) inside the objective.

Models are given as an ``nn.Module`` (parameters in ``named_parameters()`` order,
the order of fedmpi's flat vector, see :func:`fedmpi.models.layout`) or as a
callable ``f(params, x) -> logits`` with ``params`` a list of tensors. All
randomness comes from the ``torch.Generator`` passed in; the global torch RNG is
never used. The client's loss is ``F.cross_entropy`` averaged over the batch, as
in :class:`fedmpi.training.LocalTrainer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

ArrayLike = Tensor | np.ndarray
Params = Sequence[Tensor]
Model = nn.Module | Callable[[list[Tensor], Tensor], Tensor]

MATCH_COSTS = ("mse", "ssim")


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} = {value!r}: {allowed}")


def _tensor(x: ArrayLike, dtype: torch.dtype = torch.float64) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        _fail(name, value, f"must be an integer >= {low}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        _fail(name, value, "must be a finite number > 0")


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        _fail(name, value, "must be a finite number >= 0")


# --------------------------------------------------------------------------- metrics


def _channel_shaped(stat: ArrayLike, ndim: int) -> Tensor:
    """A per-channel statistic (scalar or shape (C,)) shaped to broadcast over (N, C, ...)."""
    t = _tensor(stat)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(())
    if t.ndim == 1 and ndim >= 2:
        return t.reshape((1, -1) + (1,) * (ndim - 2))
    return t


def to_unit(x: ArrayLike, mean: ArrayLike, std: ArrayLike) -> Tensor:
    """Map inputs normalized with ``data.normalize = 'standard'`` back to the [0, 1] scale.

    ``normalize`` divides by the value range, then subtracts the training mean and
    divides by the training std (per channel), so the inverse is ``x * std + mean``.
    ``mean`` and ``std`` are what :func:`fedmpi.data.normalize` returns (scalars or
    one value per channel, axis 1 of ``x``). Values are not clipped. Returns float64.
    """
    x = _tensor(x)
    return x * _channel_shaped(std, x.ndim) + _channel_shaped(mean, x.ndim)


def value_box(mean: ArrayLike, std: ArrayLike, input_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(lo, hi): the [0, 1] value box in normalized space, ((0 - mean) / std, (1 - mean) / std),
    shaped to broadcast over a batch of inputs of ``input_shape`` (per channel for images)."""
    mean_t, std_t = _tensor(mean), _tensor(std)
    shape = (-1,) + (1,) * (len(input_shape) - 1) if mean_t.numel() > 1 else ()
    lo = ((0.0 - mean_t) / std_t).reshape(shape)
    hi = ((1.0 - mean_t) / std_t).reshape(shape)
    return lo, hi


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[Tensor, Tensor]:
    a, b = _tensor(a), _tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"images must have equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"images must be a batch (N, ...); got shape {tuple(a.shape)}")
    return a, b


def mse(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Mean squared error per image: shape (N,), float64."""
    a, b = _pair(a, b)
    return (a - b).pow(2).reshape(len(a), -1).mean(dim=1)


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) in dB; inf where equal."""
    _check_positive("data_range", data_range)
    err = mse(a, b)
    out = 10.0 * torch.log10(data_range ** 2 / err)
    return torch.where(err > 0, out, torch.full_like(out, math.inf))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-k.pow(2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 1.0, window: int = 5, sigma: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image (Wang et al. 2004), shape (N,), float64.

    Choices: a ``window`` x ``window`` Gaussian window (default 5x5, ``sigma`` = 1.0,
    weights normalized to sum 1; the paper's 11x11 / 1.5 does not fit an 8x8 digit),
    local moments as Gaussian-weighted means without a Bessel correction (as in the
    paper's reference implementation), C1 = (K1 L)^2, C2 = (K2 L)^2 with K1 = 0.01,
    K2 = 0.03, L = ``data_range``. Borders: only windows that lie entirely inside
    the image are used ('valid'; 4x4 = 16 positions on 8x8 with the default), and the
    SSIM map is averaged over them and over channels. Inputs are (N, C, H, W) or
    (N, H, W). Symmetric in ``a`` and ``b``; 1 for identical images.
    """
    a, b = _pair(a, b)
    if a.ndim == 3:
        a, b = a[:, None], b[:, None]
    if a.ndim != 4:
        raise ValueError(f"ssim needs images of shape (N, C, H, W) or (N, H, W); got {tuple(a.shape)}")
    _check_int("window", window, 1)
    _check_positive("sigma", sigma)
    _check_positive("data_range", data_range)
    n, c, h, w = a.shape
    if window > min(h, w):
        _fail("window", window, f"must fit the images ({h}x{w})")
    kernel = _gaussian_window(window, sigma)[None, None]
    a, b = a.reshape(n * c, 1, h, w), b.reshape(n * c, 1, h, w)
    mu_a, mu_b = F.conv2d(a, kernel), F.conv2d(b, kernel)
    var_a = F.conv2d(a * a, kernel) - mu_a ** 2
    var_b = F.conv2d(b * b, kernel) - mu_b ** 2
    cov = F.conv2d(a * b, kernel) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return smap.reshape(n, -1).mean(dim=1)


def match(recon: ArrayLike, truth: ArrayLike, cost: str = "mse") -> np.ndarray:
    """The assignment of reconstructions to true examples of least total cost.

    Returns ``perm`` (int64, length N) such that ``recon[perm[i]]`` is matched with
    ``truth[i]``; found with ``scipy.optimize.linear_sum_assignment`` on the N x N
    matrix of per-pair costs ("mse", or "ssim" as 1 - SSIM). A batch of one gives [0].
    """
    if cost not in MATCH_COSTS:
        _fail("cost", cost, f"must be one of {', '.join(MATCH_COSTS)}")
    recon, truth = _tensor(recon), _tensor(truth)
    if recon.shape != truth.shape:
        raise ValueError(f"recon and truth must have equal shapes; got {tuple(recon.shape)} and {tuple(truth.shape)}")
    n = len(truth)
    rows = torch.arange(n).repeat_interleave(n)
    cols = torch.arange(n).repeat(n)
    if cost == "mse":
        pair_cost = mse(truth[rows], recon[cols])
    else:
        pair_cost = 1.0 - ssim(truth[rows], recon[cols])
    _, perm = linear_sum_assignment(pair_cost.reshape(n, n).numpy())
    return perm.astype(np.int64)


def label_accuracy(pred_labels: ArrayLike, true_labels: ArrayLike, perm: ArrayLike | None = None) -> float:
    """Share of correctly recovered labels.

    With ``perm`` (from :func:`match`), ``pred_labels[perm[i]]`` is compared with
    ``true_labels[i]``. Without it the labels are compared as multisets (for
    label-only recovery, where there is no image to match): the size of the multiset
    intersection divided by the batch size.
    """
    pred = np.asarray(pred_labels.cpu() if isinstance(pred_labels, Tensor) else pred_labels).astype(np.int64).ravel()
    true = np.asarray(true_labels.cpu() if isinstance(true_labels, Tensor) else true_labels).astype(np.int64).ravel()
    if len(pred) != len(true) or len(true) == 0:
        _fail("pred_labels", pred.tolist(), f"must hold as many labels as true_labels ({len(true)}, at least 1)")
    if perm is not None:
        order = np.asarray(perm, dtype=np.int64)
        return float(np.mean(pred[order] == true))
    classes = np.union1d(pred, true)
    common = sum(min(int((pred == k).sum()), int((true == k).sum())) for k in classes)
    return common / len(true)


def mean_image_psnr(truth: ArrayLike, mean_image: ArrayLike, data_range: float = 1.0) -> Tensor:
    """PSNR of the dataset's mean image (one image, broadcast) against each true image:
    what a server that learned nothing about the example would score."""
    truth = _tensor(truth)
    return psnr(_tensor(mean_image).expand_as(truth), truth, data_range)


# --------------------------------------------------------------------------- model plumbing


class _Target:
    """The attacked model as a pure function of a parameter list."""

    def __init__(self, model: Model, global_weights: np.ndarray | Params, dtype: torch.dtype):
        if isinstance(model, nn.Module):
            named = list(model.named_parameters())
            self.names = [name for name, _ in named]
            self.shapes = [tuple(p.shape) for _, p in named]
            buffers = {name: buf for name, buf in model.named_buffers()}
            self._forward = lambda params, x: torch.func.functional_call(
                model, ({**buffers, **dict(zip(self.names, params))},), (x,))
        elif callable(model):
            if isinstance(global_weights, np.ndarray):
                _fail("global_weights", f"ndarray of shape {global_weights.shape}", "must be a list of parameter tensors "
                      "when model is a plain callable (its shapes are unknown)")
            self.shapes = [tuple(p.shape) for p in global_weights]
            self._forward = model
        else:
            _fail("model", type(model).__name__, "must be an nn.Module or a callable f(params, x) -> logits")
        self.dtype = dtype
        self.params = self.split(global_weights, "global_weights")

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def split(self, vector: np.ndarray | Params, name: str) -> list[Tensor]:
        """A flat vector or a list of tensors as detached per-parameter tensors of ``dtype``."""
        if isinstance(vector, (np.ndarray, Tensor)) and np.ndim(vector) == 1:
            flat = _tensor(vector, self.dtype)
            if flat.numel() != self.size:
                _fail(name, f"vector of length {flat.numel()}", f"must have the model's {self.size} entries")
            out, offset = [], 0
            for shape in self.shapes:
                k = math.prod(shape)
                out.append(flat[offset:offset + k].reshape(shape))
                offset += k
            return out
        parts = [_tensor(p, self.dtype) for p in vector]
        if [tuple(p.shape) for p in parts] != self.shapes:
            _fail(name, [tuple(p.shape) for p in parts], f"must have the model's parameter shapes {self.shapes}")
        return parts

    def __call__(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        return self._forward(list(params), x)


def split_flat(vector: np.ndarray, model: nn.Module) -> list[Tensor]:
    """A flat vector (weights, update or gradient) as one float64 tensor per parameter of ``model``."""
    return _Target(model, vector, torch.float64).params


def _loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy; ``labels`` are class indices, or logits of soft labels (DLG)."""
    if labels.dtype == torch.int64:
        return F.cross_entropy(logits, labels)
    return -(labels.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _gradient(target: _Target, x: Tensor, labels: Tensor, create_graph: bool) -> list[Tensor]:
    params = [p.detach().requires_grad_(True) for p in target.params]
    loss = _loss(target(params, x), labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def cosine_distance(a: Params, b: Params) -> Tensor:
    """1 - cos(a, b) over all parameters together (the data term of Geiping et al. 2020)."""
    dot = sum((p * q).sum() for p, q in zip(a, b))
    na = sum(p.pow(2).sum() for p in a)
    nb = sum(q.pow(2).sum() for q in b)
    return 1.0 - dot / (na.sqrt() * nb.sqrt())


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of (N, C, H, W) images: the mean absolute difference of
    horizontal neighbours plus that of vertical neighbours (as in Geiping et al.'s code)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


# --------------------------------------------------------------------------- analytic attacks


def gradient_from_update(update: ArrayLike, lr: float, weight_decay: float = 0.0,
                         global_weights: ArrayLike | None = None) -> Tensor:
    """The loss gradient behind an update of ONE local SGD step: ``-update / lr`` (float64).

    One step of fedmpi's SGD is ``w' = w - lr (g + weight_decay w)`` (momentum has no
    effect on the first step: the buffer starts at the gradient), so
    ``g = -(w' - w) / lr - weight_decay w``; ``global_weights`` is needed only when
    ``weight_decay`` > 0. The float32 subtraction ``w' - w`` limits the precision to
    about 1e-7 |w| / lr per coordinate.
    """
    _check_positive("lr", lr)
    _check_nonnegative("weight_decay", weight_decay)
    grad = -_tensor(update) / lr
    if weight_decay:
        if global_weights is None:
            _fail("global_weights", None, "must be given when weight_decay > 0")
        grad = grad - weight_decay * _tensor(global_weights)
    return grad


def analytic_fc_input(weight_grad: ArrayLike, bias_grad: ArrayLike, rtol: float = 1e-3) -> Tensor:
    """The input of a fully connected layer from its weight and bias gradients (batch of one).

    For y = W x + b and one example, dL/dW = delta x^T and dL/db = delta, so every row i
    with delta_i != 0 gives x = dW[i, :] / db[i]. Choice: rather than one row, the
    least-squares fit of dW = db x^T over the rows with |db_i| > ``rtol`` max|db|,
    x = sum_i db_i dW_i / sum_i db_i^2, i.e. the per-row ratios averaged with weights
    db_i^2, so that rows with small (noise-dominated) db count little and rows of
    inactive ReLU units (db_i = 0) not at all. Exact for a batch of one; for a batch of
    B it returns a db-weighted mixture of the B inputs. Returns the input as a flat
    float64 vector (in_features,). Raises if every db_i is 0.
    """
    dw, db = _tensor(weight_grad), _tensor(bias_grad)
    if dw.ndim != 2 or db.ndim != 1 or dw.shape[0] != db.shape[0]:
        raise ValueError(f"weight_grad (out, in) and bias_grad (out,) must agree; got {tuple(dw.shape)} and {tuple(db.shape)}")
    _check_nonnegative("rtol", rtol)
    scale = db.abs().max()
    if not scale > 0:
        _fail("bias_grad", "all zeros", "must have a nonzero entry (the layer's output gradient vanished)")
    keep = db.abs() > rtol * scale
    dw, db = dw[keep], db[keep]
    return (db[:, None] * dw).sum(dim=0) / db.pow(2).sum()


def idlg_label(last_weight_grad: ArrayLike | None = None, last_bias_grad: ArrayLike | None = None) -> int:
    """The label of a single example from the last layer's gradient (iDLG, Zhao et al. 2020).

    With softmax cross-entropy, the logits' gradient is p - onehot(y): negative only
    at the true class (p_i > 0 elsewhere). With the bias gradient (which equals it,
    preferred when given) the label is ``argmin(db)``. With the weight gradient only,
    dW[i, :] = (p_i - y_i) a for the last layer's input a: iDLG takes the row whose
    sum is negative, which assumes a >= 0 (ReLU/sigmoid features, as in the paper).
    Choice for inputs that may be negative (logistic regression on standardized
    pixels): the row whose sum has the sign no other row has (the paper's rule when
    a >= 0, the flipped rule when sum(a) < 0); when the signs do not single out one
    row, the row of largest norm (|p_y - 1| = sum of the other p_i >= each of them).
    Also holds for an update of several local steps on one example, with ``-update``
    in place of the gradient (each step adds a positive multiple of p - onehot(y)).
    """
    if last_bias_grad is not None:
        db = _tensor(last_bias_grad)
        if db.ndim != 1 or db.numel() < 2:
            _fail("last_bias_grad", f"shape {tuple(db.shape)}", "must be one value per class (at least 2)")
        return int(torch.argmin(db))
    if last_weight_grad is None:
        _fail("last_weight_grad", None, "give last_weight_grad or last_bias_grad")
    dw = _tensor(last_weight_grad)
    if dw.ndim != 2 or dw.shape[0] < 2:
        _fail("last_weight_grad", f"shape {tuple(dw.shape)}", "must be (classes, features) with at least 2 classes")
    sums = dw.sum(dim=1)
    negative, positive = torch.nonzero(sums < 0).ravel(), torch.nonzero(sums > 0).ravel()
    if len(negative) == 1:
        return int(negative[0])
    if len(positive) == 1:
        return int(positive[0])
    return int(torch.argmax(dw.norm(dim=1)))


def _last_layer(grads: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) gradients of the output layer, the last parameters in order."""
    last = grads[-1]
    if last.ndim == 1 and len(grads) >= 2 and grads[-2].ndim == 2 and grads[-2].shape[0] == last.shape[0]:
        return grads[-2], last
    if last.ndim == 2:
        return last, None
    raise ValueError(f"cannot find the output layer: the last parameter has shape {tuple(last.shape)}; give labels")


# --------------------------------------------------------------------------- optimisation attacks


@dataclass
class Reconstruction:
    """What an optimisation attack returns.

    ``x``: reconstructed inputs (B, *input_shape) in the model's (normalized) input
    space; ``labels``: (B,) int64, the fixed labels or the argmax of the optimised
    soft labels; ``loss``: the data term (gradient/update distance, without the prior)
    of the returned trial at its end; ``trial_losses``: the same for every restart;
    ``seconds``: wall time.
    """

    x: Tensor
    labels: Tensor
    loss: float
    trial_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _check_common(input_shape: Sequence[int], batch_size: int, iterations: int, generator: torch.Generator,
                  box: tuple[Tensor, Tensor] | None) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        _fail("input_shape", input_shape, "must be a non-empty shape of positive sizes, without the batch dimension")
    _check_int("batch_size", batch_size, 1)
    _check_int("iterations", iterations, 1)
    if not isinstance(generator, torch.Generator):
        _fail("generator", generator, "must be a torch.Generator (keyed randomness; the global torch RNG is not used)")
    if box is not None and (len(box) != 2 or not all(isinstance(t, (Tensor, np.ndarray, float, int)) for t in box)):
        _fail("box", box, "must be a pair (lo, hi) of tensors broadcastable to the inputs")
    return shape


def _box(box: tuple[ArrayLike, ArrayLike] | None, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    if box is None:
        return None
    return _tensor(box[0], dtype), _tensor(box[1], dtype)


def _labels_or_none(labels: ArrayLike | None, batch_size: int) -> Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)).to(torch.int64).reshape(-1)
    if len(t) != batch_size:
        _fail("labels", t.tolist(), f"must hold one label per reconstructed example ({batch_size})")
    return t


def _observed_gradient(target: _Target, observed: np.ndarray | Params, lr: float | None, weight_decay: float) -> list[Tensor]:
    if lr is None:
        return target.split(observed, "observed")
    flat = torch.cat([p.reshape(-1) for p in target.split(observed, "observed")])
    weights = torch.cat([p.reshape(-1) for p in target.params])
    grad = gradient_from_update(flat, lr, weight_decay, weights if weight_decay else None).to(target.dtype)
    return target.split(grad, "observed")


def _num_classes(target: _Target, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(target(target.params, torch.zeros((1, *shape), dtype=target.dtype)).shape[-1])


def dlg(model: Model, global_weights: np.ndarray | Params, observed: np.ndarray | Params, *,
        input_shape: Sequence[int], generator: torch.Generator, batch_size: int = 1, lr: float | None = None,
        weight_decay: float = 0.0, labels: ArrayLike | None = None, box: tuple[ArrayLike, ArrayLike] | None = None,
        iterations: int = 300, max_iter: int = 20, line_search: str | None = None, restarts: int = 1,
        dtype: torch.dtype = torch.float32) -> Reconstruction:
    """Deep Leakage from Gradients (Zhu, Liu and Han, NeurIPS 2019).

    Minimises ||grad_w L(f(x'), y') - g||^2 (summed over all parameters) over dummy
    inputs x' and, unless ``labels`` are given, dummy soft labels y' = softmax(z'),
    with the loss mean_b sum_c -y'_bc log softmax(f(x'_b))_c. Choices, following the
    paper and its code: x' and z' start as standard normal draws from ``generator``;
    the optimiser is ``torch.optim.LBFGS`` with step size 1, ``max_iter`` = 20 inner
    iterations and no line search (``line_search='strong_wolfe'`` is offered as a
    stabiliser); ``iterations`` (300 in the paper) counts ``LBFGS.step`` calls. With
    ``labels`` (e.g. from :func:`idlg_label`: the iDLG variant) only x' is optimised,
    with the ordinary cross-entropy. DLG is unconstrained; ``box``, when given, only
    clips the returned inputs.

    Additions the paper does not have, for robustness: a trial keeps the inputs with
    the lowest objective seen (LBFGS without a line search can diverge to non-finite
    values, which ends the trial) and stops early once a step lowers the objective by
    less than a relative 1e-9 (converged, or stuck: on ReLU networks DLG can stall in
    a local minimum whose activation pattern differs from the true input's);
    ``restarts`` > 1 runs that many trials from fresh draws and returns the one with
    the lowest objective (the first trial's draws are those of ``restarts`` = 1).

    ``observed`` is the client's gradient, or with ``lr`` its update from ONE local
    SGD step (converted by :func:`gradient_from_update`).
    """
    shape = _check_common(input_shape, batch_size, iterations, generator, box)
    _check_int("max_iter", max_iter, 1)
    _check_int("restarts", restarts, 1)
    if line_search not in (None, "strong_wolfe"):
        _fail("line_search", line_search, "must be None or 'strong_wolfe'")
    start = time.perf_counter()
    target = _Target(model, global_weights, dtype)
    observed_grad = _observed_gradient(target, observed, lr, weight_decay)
    fixed = _labels_or_none(labels, batch_size)
    classes = _num_classes(target, shape)
    trials: list[tuple[float, Tensor, Tensor]] = []
    for _ in range(restarts):
        x = torch.randn((batch_size, *shape), generator=generator, dtype=dtype).requires_grad_(True)
        soft = torch.randn((batch_size, classes), generator=generator, dtype=dtype).requires_grad_(True)
        variables = [x] if fixed is not None else [x, soft]
        optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=max_iter, line_search_fn=line_search)

        def objective(x: Tensor = x, soft: Tensor = soft) -> Tensor:
            dummy = _gradient(target, x, fixed if fixed is not None else soft, create_graph=True)
            return sum((d - o).pow(2).sum() for d, o in zip(dummy, observed_grad))

        def closure(objective: Callable[[], Tensor] = objective, optimizer: torch.optim.LBFGS = optimizer,
                    variables: list[Tensor] = variables) -> Tensor:
            optimizer.zero_grad()
            value = objective()
            value.backward(inputs=variables)
            return value

        best = (float(objective().detach()), x.detach().clone(), soft.detach().clone())
        for _ in range(iterations):
            optimizer.step(closure)
            value = float(objective().detach())
            if not math.isfinite(value):
                break
            previous = best[0]
            if value <= previous:
                best = (value, x.detach().clone(), soft.detach().clone())
            if not previous - value > 1e-9 * previous:
                break
        trials.append(best)
    losses = [t[0] for t in trials]
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    loss, x_best, soft_best = trials[min(finite, key=losses.__getitem__) if finite else 0]
    bounds = _box(box, dtype)
    if bounds is not None:
        x_best = torch.maximum(torch.minimum(x_best, bounds[1]), bounds[0])
    out_labels = fixed if fixed is not None else soft_best.argmax(dim=-1)
    return Reconstruction(x_best, out_labels, loss, losses, time.perf_counter() - start)


def _milestones(iterations: int) -> list[int]:
    """Step-size decay points of Geiping et al.'s code: 3/8, 5/8 and 7/8 of the run."""
    return sorted({max(1, (iterations * k) // 8) for k in (3, 5, 7)})


def _signed_adam(data_term: Callable[[Tensor, Tensor], Tensor], *, shape: tuple[int, ...], batch_size: int,
                 classes: int, fixed: Tensor | None, bounds: tuple[Tensor, Tensor] | None, iterations: int,
                 step_size: float, tv: float, restarts: int, signed: bool, generator: torch.Generator,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, float, list[float]]:
    """The optimisation loop shared by :func:`inverting_gradients` and :func:`fedavg_inversion`."""
    if tv > 0 and len(shape) < 2:
        _fail("tv", tv, f"must be 0 for inputs of shape {shape} (total variation needs images)")
    inits = torch.randn((restarts, batch_size, *shape), generator=generator, dtype=dtype)
    soft_inits = torch.randn((restarts, batch_size, classes), generator=generator, dtype=dtype) if fixed is None else None
    best: tuple[float, Tensor, Tensor] | None = None
    trial_losses = []
    for trial in range(restarts):
        x = inits[trial].clone().requires_grad_(True)
        variables = [x]
        soft = None
        if fixed is None:
            soft = soft_inits[trial].clone().requires_grad_(True)
            variables.append(soft)
        optimizer = torch.optim.Adam(variables, lr=step_size)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=_milestones(iterations), gamma=0.1)
        for _ in range(iterations):
            optimizer.zero_grad()
            value = data_term(x, fixed if fixed is not None else soft)
            if tv > 0:
                value = value + tv * total_variation(x)
            grads = torch.autograd.grad(value, variables)
            x.grad = grads[0].sign() if signed else grads[0]
            if soft is not None:
                soft.grad = grads[1]
            optimizer.step()
            scheduler.step()
            if bounds is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
        final = float(data_term(x, fixed if fixed is not None else soft).detach())
        trial_losses.append(final)
        if best is None or (math.isfinite(final) and not final >= best[0]):
            labels_out = fixed if fixed is not None else soft.detach().argmax(dim=-1)
            best = (final, x.detach().clone(), labels_out)
    assert best is not None
    return best[1], best[2], best[0], trial_losses


def _labels_for_attack(labels: ArrayLike | None, batch_size: int, grad_like: Sequence[Tensor]) -> Tensor | None:
    """Given labels; else the iDLG label for a batch of one; else None (soft labels are optimised)."""
    fixed = _labels_or_none(labels, batch_size)
    if fixed is None and batch_size == 1:
        weight, bias = _last_layer(grad_like)
        fixed = torch.tensor([idlg_label(weight, bias)], dtype=torch.int64)
    return fixed


def inverting_gradients(model: Model, global_weights: np.ndarray | Params, observed: np.ndarray | Params, *,
                        input_shape: Sequence[int], generator: torch.Generator, batch_size: int = 1,
                        lr: float | None = None, weight_decay: float = 0.0, labels: ArrayLike | None = None,
                        box: tuple[ArrayLike, ArrayLike] | None = None, iterations: int = 4800,
                        step_size: float = 0.1, tv: float = 1e-4, restarts: int = 1, signed: bool = True,
                        dtype: torch.dtype = torch.float32) -> Reconstruction:
    """Inverting Gradients (Geiping et al., NeurIPS 2020), reconstruction from a gradient.

    Minimises 1 - cos(grad_w L(f(x'), y), g) + ``tv`` TV(x'), the cosine taken over
    all parameters together. Choices, following the paper and its code: x' starts as
    a standard normal draw from ``generator`` (one per restart); Adam with step size
    ``step_size`` (0.1) on the SIGN of the objective's gradient w.r.t. x'; the step
    size decays by 0.1 after 3/8, 5/8 and 7/8 of ``iterations`` (MultiStepLR); after
    every step x' is clamped to ``box`` = (lo, hi), the data's value box in
    normalized space (:func:`value_box`); TV is the anisotropic mean absolute
    neighbour difference, weight 1e-4 by default (the code's command-line default;
    its library default is 0.1). Labels: ``labels`` if given; for a batch of one the
    iDLG label from the observed last layer (:func:`idlg_label`); for larger batches
    without labels, softmax soft labels are optimised jointly (plain Adam, unsigned),
    as in the authors' code. With ``restarts`` > 1 the trial with the lowest final
    cosine distance (the prior left out) is returned.

    ``observed`` is the client's gradient, or with ``lr`` its update from ONE local
    SGD step (converted by :func:`gradient_from_update`; for several steps use
    :func:`fedavg_inversion`).
    """
    shape = _check_common(input_shape, batch_size, iterations, generator, box)
    _check_positive("step_size", step_size)
    _check_nonnegative("tv", tv)
    _check_int("restarts", restarts, 1)
    start = time.perf_counter()
    target = _Target(model, global_weights, dtype)
    observed_grad = _observed_gradient(target, observed, lr, weight_decay)
    fixed = _labels_for_attack(labels, batch_size, observed_grad)

    def data_term(x: Tensor, y: Tensor) -> Tensor:
        return cosine_distance(_gradient(target, x, y, create_graph=True), observed_grad)

    x, out_labels, loss, losses = _signed_adam(
        data_term, shape=shape, batch_size=batch_size, classes=_num_classes(target, shape), fixed=fixed,
        bounds=_box(box, dtype), iterations=iterations, step_size=step_size, tv=tv, restarts=restarts, signed=signed,
        generator=generator, dtype=dtype)
    return Reconstruction(x, out_labels, loss, losses, time.perf_counter() - start)


# --------------------------------------------------------------------------- several local steps


def fedmpi_orders(seed: int, round_index: int, client_id: int, num_examples: int, epochs: int) -> list[Tensor]:
    """The per-epoch example orders of :class:`fedmpi.training.LocalTrainer` (non-DP training):
    ``torch.randperm`` from a generator keyed by (seed, "shuffle", round, client). A server
    that knows the run's seed can reproduce them exactly."""
    from . import seeding

    gen = torch.Generator().manual_seed(seeding.torch_seed(seed, "shuffle", round_index, client_id))
    return [torch.randperm(num_examples, generator=gen) for _ in range(epochs)]


def _unroll(target: _Target, x: Tensor, labels: Tensor, *, lr: float, epochs: int, batch_size: int, momentum: float,
            weight_decay: float, orders: Sequence[Tensor] | None, create_graph: bool) -> list[Tensor]:
    n = x.shape[0]
    start = [p.detach().requires_grad_(True) for p in target.params]
    params: list[Tensor] = list(start)
    buf: list[Tensor] | None = None
    for epoch in range(epochs):
        order = orders[epoch] if orders is not None else torch.arange(n)
        for first in range(0, n, batch_size):
            idx = order[first:first + batch_size]
            loss = _loss(target(params, x[idx]), labels[idx])
            grads = list(torch.autograd.grad(loss, params, create_graph=create_graph))
            if weight_decay:
                grads = [g + weight_decay * p for g, p in zip(grads, params)]
            if momentum:
                buf = grads if buf is None else [momentum * b + g for b, g in zip(buf, grads)]
                grads = buf
            params = [p - lr * g for p, g in zip(params, grads)]
    return [p - s.detach() for p, s in zip(params, start)]


def _check_local(lr: float, epochs: int, batch_size: int, momentum: float, weight_decay: float,
                 orders: Sequence[Tensor] | None, num_examples: int) -> list[Tensor] | None:
    _check_positive("lr", lr)
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_nonnegative("weight_decay", weight_decay)
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        _fail("momentum", momentum, "must be in [0, 1)")
    if orders is None:
        return None
    out = [torch.as_tensor(np.asarray(o.cpu() if isinstance(o, Tensor) else o)).to(torch.int64) for o in orders]
    if len(out) != epochs or any(sorted(o.tolist()) != list(range(num_examples)) for o in out):
        _fail("orders", [o.tolist() for o in out], f"must be {epochs} permutation(s) of range({num_examples}), one per epoch")
    return out


def simulate_update(model: Model, global_weights: np.ndarray | Params, x: Tensor, labels: ArrayLike, *, lr: float,
                    epochs: int = 1, batch_size: int = 1, momentum: float = 0.0, weight_decay: float = 0.0,
                    orders: Sequence[ArrayLike] | None = None, create_graph: bool = False,
                    dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The update w_local - w_global (one tensor per parameter) that local SGD on (x, labels)
    produces, with fedmpi's semantics: per epoch, batches ``order[k B:(k+1) B]`` (the last
    one may be smaller), mean cross-entropy, weight decay added to the gradient, momentum
    buffer started at the first gradient. ``orders`` are the per-epoch permutations of
    the example indices (None: the identity in every epoch). With ``create_graph`` the
    result is differentiable w.r.t. ``x`` (torch.func.functional_call on the module)."""
    target = _Target(model, global_weights, dtype)
    orders_t = _check_local(lr, epochs, batch_size, momentum, weight_decay, orders, x.shape[0])
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)).to(torch.int64)
    return _unroll(target, x.to(dtype), y, lr=lr, epochs=epochs, batch_size=batch_size, momentum=momentum,
                   weight_decay=weight_decay, orders=orders_t, create_graph=create_graph)


def fedavg_inversion(model: Model, global_weights: np.ndarray | Params, update: np.ndarray | Params, *,
                     input_shape: Sequence[int], num_examples: int, lr: float, generator: torch.Generator,
                     epochs: int = 1, batch_size: int = 1, momentum: float = 0.0, weight_decay: float = 0.0,
                     orders: Sequence[ArrayLike] | None = None, labels: ArrayLike | None = None,
                     box: tuple[ArrayLike, ArrayLike] | None = None, iterations: int = 4800, step_size: float = 1.0,
                     tv: float = 1e-4, restarts: int = 1, signed: bool = True,
                     dtype: torch.dtype = torch.float32) -> Reconstruction:
    """Inverting Gradients on a FedAvg update of several local steps (Geiping et al. 2020, federated averaging).

    The attacker knows the local training settings (``num_examples``, ``lr``,
    ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``). The objective unrolls
    the client's local SGD on the dummy examples differentiably (:func:`simulate_update`
    with create_graph) and compares the dummy update with the observed one by
    1 - cos + ``tv`` TV, optimised as in :func:`inverting_gradients` (signed Adam,
    decay at 3/8, 5/8, 7/8, box clamp, restarts scored by the cosine term). The step
    size defaults to 1, as in the authors' script for this setting.

    Batch order: dummy example j stands for the client's example j. The client draws
    a new permutation every epoch; ``orders`` gives them (e.g. :func:`fedmpi_orders`,
    which a server knowing the run's seed can compute). Without ``orders`` the
    identity order is assumed in every epoch - fixed batches cycled in the same order,
    as in the authors' code. This is exact whenever the batch composition does not
    depend on the order: one epoch (the first epoch's order only renames the dummy
    examples, so reconstructions come out in that order and :func:`match` pairs them),
    or one batch holding all examples (``batch_size >= num_examples``, e.g. a batch of
    one); otherwise it is a model mismatch the attack must absorb.

    Labels: ``labels`` if given; for one example the iDLG label from ``-update`` (each
    step adds a positive multiple of p - onehot(y) to the last bias' negative update;
    weight decay can blur this); otherwise soft labels are optimised jointly.
    """
    _check_int("num_examples", num_examples, 1)
    shape = _check_common(input_shape, batch_size, iterations, generator, box)
    orders_t = _check_local(lr, epochs, batch_size, momentum, weight_decay, orders, num_examples)
    _check_positive("step_size", step_size)
    _check_nonnegative("tv", tv)
    _check_int("restarts", restarts, 1)
    start = time.perf_counter()
    target = _Target(model, global_weights, dtype)
    observed = target.split(update, "update")
    fixed = _labels_for_attack(labels, num_examples, [-u for u in observed])

    def data_term(x: Tensor, y: Tensor) -> Tensor:
        dummy = _unroll(target, x, y, lr=lr, epochs=epochs, batch_size=batch_size, momentum=momentum,
                        weight_decay=weight_decay, orders=orders_t, create_graph=True)
        return cosine_distance(dummy, observed)

    x, out_labels, loss, losses = _signed_adam(
        data_term, shape=shape, batch_size=num_examples, classes=_num_classes(target, shape), fixed=fixed,
        bounds=_box(box, dtype), iterations=iterations, step_size=step_size, tv=tv, restarts=restarts, signed=signed,
        generator=generator, dtype=dtype)
    return Reconstruction(x, out_labels, loss, losses, time.perf_counter() - start)
