"""Differential privacy: per-example clipping for DP-SGD, client-level DP, accounting.

Sample-level DP-SGD (Abadi et al. 2016): every per-example gradient is clipped
to L2 norm C (``max_grad_norm``), the clipped gradients are summed, Gaussian
noise N(0, sigma^2 C^2) is added to the sum and the result is divided by the
expected batch size. Local batches are Poisson-sampled (rate q = B / n_local),
which is what the accountant assumes.

Per-example gradients are never formed for a whole model at once. For a
Linear layer the norm of example i's weight gradient is |g_i| |a_i| (output
gradient times input, the "ghost norm"), and the clipped sum is one matmul
(c * G)^T A. For Conv2d the per-example weight gradients are one batched
matmul of the unfolded input with the output gradient. Only the gradients
with respect to layer outputs come from autograd, so the ordinary weight
gradients are not computed twice.

Client-level DP (DP-FedAvg, McMahan et al. 2018): each client update is clipped
to norm S; Gaussian noise with std z S is added to the sum on the server
(central) or by each client to its own update (local).

Accounting uses Google's dp-accounting: RDP for per-round tracking (fast),
PLD for the reported final epsilon where the event allows it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Integer RDP orders: exact and fast in dp-accounting (fractional orders are
# slow and can fail to converge); the epsilon they give is within a few
# percent of the library's default order set.
RDP_ORDERS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256)

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

# Above this (RDP) epsilon the final report stays with RDP instead of PLD (see RunAccountant.final).
PLD_MAX_EPSILON = 64.0


# --------------------------------------------------------------------------- per-example clipping


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


# --------------------------------------------------------------------------- client-level


def clip_update(update: np.ndarray, clip_norm: float) -> bool:
    """Scale ``update`` in place to L2 norm <= clip_norm (norm in float64); return whether it was clipped."""
    norm = float(np.sqrt(np.dot(update.astype(np.float64), update.astype(np.float64))))
    if norm > clip_norm:
        update *= np.float32(clip_norm / norm)
        return True
    return False


# --------------------------------------------------------------------------- accounting


def _quiet_absl() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)


def _event(noise_multiplier: float, sample_rate: float, population: int | None = None, sample_size: int | None = None):
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if population is not None:
        return dp_event.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
    if sample_rate >= 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(sample_rate, gaussian)


def make_accountant(accountant: str, replace_one: bool = False):
    """A fresh dp-accounting accountant: ``rdp`` (with :data:`RDP_ORDERS`) or ``pld``."""
    from dp_accounting import NeighboringRelation, pld, rdp

    _quiet_absl()
    relation = NeighboringRelation.REPLACE_ONE if replace_one else NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS), neighboring_relation=relation)
    if accountant == "pld":
        return pld.PLDAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


@lru_cache(maxsize=65536)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps (add/remove-one
    neighbours), from dp-accounting's RDP or PLD accountant. 0 for 0 steps;
    infinite without noise."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(_event(noise_multiplier, sample_rate), int(steps))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=4096)
def epsilon_without_replacement(noise_multiplier: float, population: int, sample_size: int, steps: int,
                                delta: float) -> float:
    """Epsilon of a sum with L2 sensitivity S and noise std ``noise_multiplier`` x S, over
    ``steps`` samples of fixed size drawn without replacement (replace-one
    neighbours, so the sum's sensitivity is 2S: the Gaussian event's multiplier is
    noise_multiplier / 2). RDP only: dp-accounting's PLD does not support it."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = make_accountant("rdp", replace_one=True)
    acc.compose(_event(noise_multiplier / 2, 0.0, population, sample_size), int(steps))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=4096)
def epsilon_local(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``releases`` Gaussian releases of one clipped update (local DP: any
    two datasets of a client give updates at most 2S apart, so the multiplier
    relative to that sensitivity is noise_multiplier / 2; no sampling amplification)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = make_accountant(accountant, replace_one=True)
    acc.compose(_event(noise_multiplier / 2, 1.0), int(releases))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
                    eps_fn: Callable[[float], float] | None = None, rtol: float = 1e-3) -> float:
    """The noise multiplier whose epsilon is at most ``target_epsilon`` and within
    ``rtol`` of it (relative).

    Brackets the answer by doubling and halving from 1 (from the RDP answer when
    the accountant is PLD: PLD is tighter, so it needs no more noise than RDP),
    then refines with the Illinois variant of regula falsi on log(epsilon) versus
    log(sigma), which needs a handful of accountant calls.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    fn = eps_fn or (lambda sigma: epsilon(sigma, sample_rate, steps, delta, accountant))
    start = 1.0
    if accountant == "pld" and eps_fn is None:
        start = calibrate_noise(target_epsilon, sample_rate, steps, delta, "rdp", rtol=rtol)
    hi = start
    while fn(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    lo = hi / 2
    while fn(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            return hi
    target = math.log(target_epsilon)
    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = math.log(fn(lo)) - target, math.log(fn(hi)) - target  # > 0, <= 0
    side = 0
    for _ in range(100):
        if f_hi >= math.log1p(-rtol) or x_hi - x_lo < 1e-12:
            break
        x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo)
        f = math.log(fn(math.exp(x))) - target
        if f > 0:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            x_hi, f_hi = x, f
            if side == 1:
                f_lo /= 2
            side = 1
    return math.exp(x_hi)


# --------------------------------------------------------------------------- a run's budget


def expected_participations(rounds: int, per_round: int, total: int) -> int:
    """Rounds a client takes part in: all of them when every client is in every
    cohort, else the expectation rounded up."""
    return rounds if per_round >= total else math.ceil(rounds * per_round / total)


class RunAccountant:
    """What a run has spent so far, from the cohorts the server drew.

    ``after_round`` tracks epsilon with RDP (cheap, every round); ``final`` gives
    the reported epsilon with the configured accountant (PLD by default). For
    sample-level DP each client has its own sample rate q = B / n and step count,
    so epsilon is per client: the max and the median over all clients are
    reported (clients never sampled have spent nothing).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.p = cfg.privacy
        total = cfg.clients.total
        self.participations = np.zeros(total, dtype=np.int64)
        self.sample_rate = np.zeros(total)
        self.steps = np.zeros(total, dtype=np.int64)  # sample mode: DP-SGD steps so far
        self.eps = np.zeros(total)
        self.rounds = 0

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a checkpoint stores; :meth:`load_state` puts them back."""
        return {"participations": self.participations, "sample_rate": self.sample_rate, "steps": self.steps,
                "eps": self.eps, "rounds": np.array([self.rounds], dtype=np.int64)}

    def load_state(self, state: dict) -> None:
        self.participations[:] = state["participations"]
        self.sample_rate[:] = state["sample_rate"]
        self.steps[:] = state["steps"]
        self.eps[:] = state["eps"]
        self.rounds = int(np.asarray(state["rounds"]).reshape(-1)[0])

    def _central(self, rounds: int, accountant: str) -> float:
        c, p = self.cfg.clients, self.p
        if c.sampling == "poisson":
            return epsilon(p.noise_multiplier, c.per_round / c.total, rounds, p.delta, accountant)
        return epsilon_without_replacement(p.noise_multiplier, c.total, c.per_round, rounds, p.delta)

    def after_round(self, cohort: np.ndarray, num_samples: np.ndarray) -> tuple[float, float]:
        """Account one round; return (epsilon, median over clients) by RDP."""
        from .training import dp_schedule

        p, t = self.p, self.cfg.train
        self.rounds += 1
        self.participations[cohort] += 1
        if p.mode == "client_central":
            value = self._central(self.rounds, "rdp")
            self.eps[:] = value
            return value, value
        for cid, n in zip(cohort.tolist(), num_samples.tolist()):
            if p.mode == "sample":
                q, steps = dp_schedule(int(n), t.batch_size, t.epochs)
                self.sample_rate[cid] = q
                self.steps[cid] += steps
                self.eps[cid] = epsilon(p.noise_multiplier, q, int(self.steps[cid]), p.delta, "rdp")
            else:
                self.eps[cid] = epsilon_local(p.noise_multiplier, int(self.participations[cid]), p.delta, "rdp")
        return float(self.eps.max()), float(np.median(self.eps))

    def final(self, max_candidates: int = 16) -> tuple[float, float, str]:
        """(epsilon, median over clients, accountant used) with the configured accountant.

        With PLD and many distinct clients, PLD is run for the ``max_candidates``
        clients with the largest RDP epsilon and for the RDP-median client. Where
        RDP already gives more than :data:`PLD_MAX_EPSILON` (almost no noise), the
        RDP value is reported: PLD's discretisation of such a loss would need
        gigabytes, and the number carries no useful guarantee either way."""
        p = self.p
        acc = p.accountant
        rdp_max = float(self.eps.max())
        if acc == "pld" and rdp_max > PLD_MAX_EPSILON:
            acc = "rdp"
        if p.mode == "client_central":
            if self.cfg.clients.sampling != "poisson":
                acc = "rdp"
            value = self._central(self.rounds, acc)
            return value, value, acc
        if acc == "rdp":
            return rdp_max, float(np.median(self.eps)), acc
        order = np.argsort(self.eps, kind="stable")
        median_client = order[len(order) // 2]
        candidates = list(order[::-1][:max_candidates]) + [median_client]

        def pld_eps(cid: int) -> float:
            if p.mode == "sample":
                return epsilon(p.noise_multiplier, float(self.sample_rate[cid]), int(self.steps[cid]), p.delta, "pld")
            return epsilon_local(p.noise_multiplier, int(self.participations[cid]), p.delta, "pld")

        values = {int(c): pld_eps(int(c)) for c in candidates}
        return max(values.values()), values[int(median_client)], acc


def calibrate_for_run(cfg, client_sizes: np.ndarray) -> float:
    """The noise multiplier that meets ``privacy.target_epsilon`` for this run.

    sample: for the smallest client (largest q = B / n), taking part in
    :func:`expected_participations` rounds; client_central: the cohort sampling
    rate over all rounds; client_local: the expected participations.
    """
    from .training import dp_schedule

    p, c = cfg.privacy, cfg.clients
    acc = p.accountant
    rounds = expected_participations(cfg.rounds, c.per_round, c.total)
    if p.mode == "sample":
        q, steps = dp_schedule(int(client_sizes.min()), cfg.train.batch_size, cfg.train.epochs)
        return calibrate_noise(p.target_epsilon, q, rounds * steps, p.delta, acc)
    if p.mode == "client_local":
        return calibrate_noise(p.target_epsilon, 1.0, rounds, p.delta, acc,
                               eps_fn=lambda z: epsilon_local(z, rounds, p.delta, acc))
    if c.sampling == "poisson":
        return calibrate_noise(p.target_epsilon, c.per_round / c.total, cfg.rounds, p.delta, acc)
    return calibrate_noise(p.target_epsilon, 0.0, cfg.rounds, p.delta, "rdp",
                           eps_fn=lambda z: epsilon_without_replacement(z, c.total, c.per_round, cfg.rounds, p.delta))
