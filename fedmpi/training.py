"""Local training of one client, and evaluation of a model on a test set.

A client receives the global weights w, runs ``train.epochs`` epochs of
minibatch SGD (optional momentum and weight decay, torch.optim.SGD semantics)
over its own shard and returns its update ``w_local - w`` as float32.

Batches: without DP, a shuffled pass per epoch in an order drawn from the
client's key (seed, "shuffle", round, client id). With sample-level DP
(``privacy.mode: sample``), round(n / B) Poisson-sampled batches per epoch,
each example included with probability q = B / n, and every step is a DP-SGD
step (Abadi et al. 2016): per-example gradients clipped to C, summed, noise
N(0, sigma^2 C^2) from the key (seed, "dp_noise", round, client id), divided by
the expected batch size q n. Audit canaries the client holds (:mod:`fedmpi.canaries`)
are sampled in each step with the same rate q and join the clipped sum before the
noise.

What the algorithm adds to every step's gradient (:mod:`fedmpi.algorithms`):
FedProx's proximal gradient mu (w - w_global), and SCAFFOLD's correction
c - c_i (one float32 row per client and round, sent by rank 0). Neither depends
on the client's data, so with DP-SGD both are added *after* the clipped sum,
the noise and the division by the expected batch size: clipping them per
example would cut a term that carries no privacy risk (and change the
algorithm), while the privatised part, whose sensitivity to one example is C,
stays exactly what it is without them. Then weight decay and momentum, as
before.

``max_steps``: stop after that many steps (a straggler's or a deadline's partial
work, :mod:`fedmpi.devices`); :meth:`LocalTrainer.full_steps` is the work
without a limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import seeding
from .algorithms import prox_mu
from .models import FlatModel
from .privacy.accounting import dp_schedule
from .privacy.dpsgd import PerExampleGradients
from .privacy.hooks import noise_scale
from .schema import Config


@dataclass
class ClientResult:
    num_samples: int
    train_loss: float
    steps: int
    clipped_fraction: float = float("nan")  # DP-SGD: share of per-example gradients clipped


class LocalTrainer:
    """Trains clients one after another on one reusable flat model."""

    def __init__(self, model: FlatModel, cfg: Config):
        self.model = model
        self.cfg = cfg
        self.momentum_buffer = torch.zeros_like(model.flat)
        self.mu = prox_mu(cfg)
        if self.mu:
            self.prox = torch.zeros_like(model.flat)
        self.dp = cfg.privacy.mode == "sample"
        if self.dp:
            self.per_example = PerExampleGradients(model.module)
            self.grad_views = [p.grad for p in model.module.parameters()]
            self.noise_cpu = torch.empty(model.size, dtype=torch.float32)
            self.noise_scale = noise_scale()  # 1.0 unless a test injects a bug (fedmpi.privacy.hooks)
        self.canary_grad: torch.Tensor | None = None  # input canaries' clipped gradients, when a run has them

    def _batches(self, n: int, gen: torch.Generator):
        t = self.cfg.train
        if self.dp and self.cfg.privacy.batch_sampling == "poisson":
            q, steps = dp_schedule(n, t.batch_size, t.epochs)
            for _ in range(steps):
                yield torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1), q * n
            return
        for _ in range(t.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, t.batch_size):
                idx = order[start:start + t.batch_size]
                yield idx, len(idx)

    def _add_canaries(self, canaries, rate: float) -> None:
        """Audit canaries (:class:`fedmpi.canaries.CanaryShare`) that this step samples, each
        with the client's rate: their clipped gradients join the clipped per-example sum."""
        picked = canaries.sample(rate)
        if not len(picked):
            return
        grad, device, clip = self.model.grad, self.model.device, self.cfg.privacy.max_grad_norm
        if canaries.coordinates is not None:  # dirac: +C on the canary's own coordinate
            grad[torch.from_numpy(canaries.coordinates[picked]).to(device)] += clip
            return
        if self.canary_grad is None:
            self.canary_grad = torch.zeros_like(grad)
            self.canary_views = [self.canary_grad[s.offset:s.offset + s.numel].view(s.shape) for s in self.model.specs]
        xc = torch.from_numpy(canaries.x[picked]).to(device)
        yc = torch.from_numpy(canaries.y[picked]).to(device)
        self.per_example.compute(xc, yc, F.cross_entropy, clip, self.canary_views)
        grad.add_(self.canary_grad)

    def full_steps(self, num_samples: int) -> int:
        """Local steps of a client holding ``num_samples``, without a limit."""
        t = self.cfg.train
        if not num_samples:
            return 0
        if self.dp and self.cfg.privacy.batch_sampling == "poisson":
            return dp_schedule(num_samples, t.batch_size, t.epochs)[1]
        return t.epochs * -(-num_samples // t.batch_size)

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray, round_index: int,
              client_id: int, out: np.ndarray, max_steps: int | None = None,
              correction: np.ndarray | None = None, canaries=None) -> ClientResult:
        """Train one client from ``global_weights``; write its update into ``out``. At most
        ``max_steps`` steps; ``correction``: a constant added to every step's gradient
        (SCAFFOLD's c - c_i). The model is in train mode, torch's global generator
        (dropout) keyed by the client. ``canaries``: the audit canaries the client holds
        this round (DP-SGD only, :mod:`fedmpi.canaries`), or None."""
        self.model.module.train()
        with client_torch_rng(self.cfg.seed, round_index, client_id, self.model.device):
            return self._train(global_weights, x, y, round_index, client_id, out, max_steps, correction, canaries)

    def _train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray, round_index: int,
               client_id: int, out: np.ndarray, max_steps: int | None, correction: np.ndarray | None,
               canaries=None) -> ClientResult:
        t, p = self.cfg.train, self.cfg.privacy
        model, flat, grad = self.model.module, self.model.flat, self.model.grad
        self.model.set_weights(global_weights)
        n = len(y)
        if n == 0:
            out[:] = 0.0
            return ClientResult(0, float("nan"), 0)
        device = self.model.device
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        gen = torch.Generator().manual_seed(seeding.torch_seed(self.cfg.seed, "shuffle", round_index, client_id))
        if self.dp:
            noise_gen = torch.Generator().manual_seed(seeding.torch_seed(self.cfg.seed, "dp_noise", round_index, client_id))
            noise_std = p.noise_multiplier * p.max_grad_norm
            if self.noise_scale != 1.0:
                noise_std *= self.noise_scale
            rate = dp_schedule(n, t.batch_size, t.epochs)[0]
        buf = self.momentum_buffer
        if self.mu:
            anchor = torch.from_numpy(global_weights).to(device)
        if correction is not None:
            correction = torch.from_numpy(correction).to(device)
        loss_sum, seen, clipped, steps = 0.0, 0, 0, 0
        for idx, expected_size in self._batches(n, gen):
            if max_steps is not None and steps >= max_steps:
                break
            if self.dp:
                if len(idx):
                    norms, batch_loss = self.per_example.compute(xt[idx], yt[idx], F.cross_entropy, p.max_grad_norm,
                                                                 self.grad_views)
                    clipped += int((norms > p.max_grad_norm).sum())
                else:
                    grad.zero_()
                    batch_loss = 0.0
                if canaries is not None:
                    self._add_canaries(canaries, rate)
                # drawn on the CPU whatever the device: the same noise on CPU and GPU
                torch.randn(grad.shape, generator=noise_gen, out=self.noise_cpu)
                grad.add_(self.noise_cpu.to(device, non_blocking=True), alpha=noise_std)
                grad.div_(expected_size)
            else:
                grad.zero_()
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                batch_loss = loss.item() * len(idx)
            with torch.no_grad():
                if self.mu:  # data-independent: after clipping and noise (see the module docstring)
                    grad.add_(torch.sub(flat, anchor, out=self.prox), alpha=self.mu)
                if correction is not None:
                    grad.add_(correction)
                if t.weight_decay:
                    grad.add_(flat, alpha=t.weight_decay)
                if t.momentum:
                    if steps == 0:
                        buf.copy_(grad)
                    else:
                        buf.mul_(t.momentum).add_(grad)
                    flat.add_(buf, alpha=-t.lr)
                else:
                    flat.add_(grad, alpha=-t.lr)
            loss_sum += batch_loss
            seen += len(idx)
            steps += 1
        np.subtract(self.model.weights(), global_weights, out=out)
        return ClientResult(n, loss_sum / seen if seen else float("nan"), steps,
                            clipped / seen if self.dp and seen else float("nan"))


@contextmanager
def client_torch_rng(seed: int, round_index: int, client_id: int, device: torch.device) -> Iterator[None]:
    """torch's global generator keyed by (seed, "client_torch", round, client id) inside,
    restored after: what a model draws from it (dropout) does not depend on which
    clients the rank trained before. The built-in models draw nothing from it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seeding.torch_seed(seed, "client_torch", round_index, client_id))
        yield


def evaluate(model: FlatModel, weights: np.ndarray, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``weights`` on (x, y), the model in eval mode."""
    model.set_weights(weights)
    model.module.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size]).to(model.device)
            yb = torch.from_numpy(y[start:start + batch_size]).to(model.device)
            logits = model.module(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)
