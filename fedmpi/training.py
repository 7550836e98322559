"""Local training of one client, and evaluation of a model on a test set.

A client receives the global weights w, runs ``train.epochs`` epochs of
minibatch SGD (optional momentum and weight decay, torch.optim.SGD semantics)
over its own shard in an order drawn from its key (seed, "shuffle", round,
client id), and returns its update ``w_local - w`` as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import seeding
from .config import Config
from .models import FlatModel


@dataclass
class ClientResult:
    num_samples: int
    train_loss: float
    steps: int


class LocalTrainer:
    """Trains clients one after another on one reusable flat model."""

    def __init__(self, model: FlatModel, cfg: Config):
        self.model = model
        self.cfg = cfg
        self.momentum_buffer = torch.zeros_like(model.flat)

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray, round_index: int,
              client_id: int, out: np.ndarray) -> ClientResult:
        """Train one client from ``global_weights``; write its update into ``out``."""
        t = self.cfg.train
        model, flat, grad = self.model.module, self.model.flat, self.model.grad
        self.model.set_weights(global_weights)
        n = len(y)
        if n == 0:
            out[:] = 0.0
            return ClientResult(0, float("nan"), 0)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(seeding.torch_seed(self.cfg.seed, "shuffle", round_index, client_id))
        buf = self.momentum_buffer
        loss_sum, steps = 0.0, 0
        for _ in range(t.epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, t.batch_size):
                idx = order[start:start + t.batch_size]
                grad.zero_()
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
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
                loss_sum += loss.item() * len(idx)
                steps += 1
        np.subtract(flat.numpy(), global_weights, out=out)
        return ClientResult(n, loss_sum / (n * t.epochs), steps)


def evaluate(model: FlatModel, weights: np.ndarray, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``weights`` on (x, y)."""
    model.set_weights(weights)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = torch.from_numpy(x[start:start + batch_size])
            yb = torch.from_numpy(y[start:start + batch_size])
            logits = model.module(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)
