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
the expected batch size q n.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import seeding
from .models import FlatModel
from .privacy.accounting import dp_schedule
from .privacy.dpsgd import PerExampleGradients
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
        self.dp = cfg.privacy.mode == "sample"
        if self.dp:
            self.per_example = PerExampleGradients(model.module)
            self.grad_views = [p.grad for p in model.module.parameters()]
            self.noise_cpu = torch.empty(model.size, dtype=torch.float32)

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

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray, round_index: int,
              client_id: int, out: np.ndarray) -> ClientResult:
        """Train one client from ``global_weights``; write its update into ``out``. The
        model is in train mode, torch's global generator (dropout) keyed by the client."""
        self.model.module.train()
        with client_torch_rng(self.cfg.seed, round_index, client_id, self.model.device):
            return self._train(global_weights, x, y, round_index, client_id, out)

    def _train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray, round_index: int,
               client_id: int, out: np.ndarray) -> ClientResult:
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
        buf = self.momentum_buffer
        loss_sum, seen, clipped, steps = 0.0, 0, 0, 0
        for idx, expected_size in self._batches(n, gen):
            if self.dp:
                if len(idx):
                    norms, batch_loss = self.per_example.compute(xt[idx], yt[idx], F.cross_entropy, p.max_grad_norm,
                                                                 self.grad_views)
                    clipped += int((norms > p.max_grad_norm).sum())
                else:
                    grad.zero_()
                    batch_loss = 0.0
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
