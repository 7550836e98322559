"""Server optimizers: how the aggregated client update moves the global model.

The aggregate ``u`` (a float64 vector: the robust or weighted mean of
``w_local - w``) is treated as a pseudo-gradient step.

- ``avg``: w <- w + lr * u (FedAvg, McMahan et al. 2017; lr = 1 is plain averaging).
- ``fedavgm``: m <- beta * m + u; w <- w + lr * m (server momentum, Hsu et al. 2019).
- ``fedadam``: m <- b1 m + (1-b1) u; v <- b2 v + (1-b2) u^2;
  w <- w + lr * m / (sqrt(v) + tau), with v starting at tau^2 (Reddi et al. 2021, Alg. 2).

State lives in :attr:`ServerOptimizer.state`, a dict of float64 arrays that the
checkpoint writes and reads back as is.
"""

from __future__ import annotations

import numpy as np

from .config import ServerConfig


class ServerOptimizer:
    def __init__(self, cfg: ServerConfig, size: int):
        self.cfg = cfg
        self.state: dict[str, np.ndarray] = {}
        if cfg.optimizer == "fedavgm":
            self.state["momentum"] = np.zeros(size)
        elif cfg.optimizer == "fedadam":
            self.state["m"] = np.zeros(size)
            self.state["v"] = np.full(size, cfg.tau ** 2)

    def step(self, weights: np.ndarray, update: np.ndarray) -> None:
        """Apply ``update`` (float64, shape (d,)) to ``weights`` (float32) in place."""
        c = self.cfg
        if c.optimizer == "avg":
            direction = update
        elif c.optimizer == "fedavgm":
            m = self.state["momentum"]
            m *= c.momentum
            m += update
            direction = m
        else:
            m, v = self.state["m"], self.state["v"]
            m *= c.beta1
            m += (1 - c.beta1) * update
            v *= c.beta2
            v += (1 - c.beta2) * update * update
            direction = m / (np.sqrt(v) + c.tau)
        # float64 sum, rounded once to float32
        np.add(weights, c.lr * direction, out=weights, casting="same_kind")
