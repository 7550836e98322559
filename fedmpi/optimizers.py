"""Server optimizers: how the aggregated client update moves the global model.

The aggregate ``u`` (a float64 vector: the robust or weighted mean of
``w_local - w``) is treated as a pseudo-gradient step.

- ``avg``: w <- w + lr * u (FedAvg, McMahan et al. 2017; lr = 1 is plain averaging).
- ``fedavgm``: m <- beta * m + u; w <- w + lr * m (server momentum, Hsu et al. 2019).
- ``fedadam``: m <- b1 m + (1-b1) u; v <- b2 v + (1-b2) u^2;
  w <- w + lr * m / (sqrt(v) + tau), with v starting at tau^2 (Reddi et al. 2021, Alg. 2).

Each optimizer is one :data:`OPTIMIZERS` entry: its step (a direction from the
update and its state), the state it keeps, its default learning rate and the
``server.*`` keys it reads. :class:`ServerOptimizer` holds the state, a dict of
float64 arrays that the checkpoint writes and reads back as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .schema import ServerConfig


def avg_direction(update: np.ndarray, state: dict, cfg: ServerConfig) -> np.ndarray:
    return update


def fedavgm_direction(update: np.ndarray, state: dict, cfg: ServerConfig) -> np.ndarray:
    m = state["momentum"]
    m *= cfg.momentum
    m += update
    return m


def fedadam_direction(update: np.ndarray, state: dict, cfg: ServerConfig) -> np.ndarray:
    m, v = state["m"], state["v"]
    m *= cfg.beta1
    m += (1 - cfg.beta1) * update
    v *= cfg.beta2
    v += (1 - cfg.beta2) * update * update
    return m / (np.sqrt(v) + cfg.tau)


@dataclass(frozen=True)
class Optimizer:
    """``direction(update, state, cfg)`` (updating ``state`` in place); ``init_state(d, cfg)``;
    ``reads``: the ``server.*`` keys it uses besides ``optimizer`` and ``lr``."""

    direction: Callable[[np.ndarray, dict, ServerConfig], np.ndarray]
    paper: str
    default_lr: float
    reads: tuple[str, ...] = ()
    init_state: Callable[[int, ServerConfig], dict] = lambda size, cfg: {}


OPTIMIZERS: dict[str, Optimizer] = {
    "avg": Optimizer(avg_direction, "McMahan et al. 2017 (FedAvg)", 1.0),
    "fedavgm": Optimizer(fedavgm_direction, "Hsu et al. 2019 (server momentum)", 1.0, reads=("momentum",),
                         init_state=lambda size, cfg: {"momentum": np.zeros(size)}),
    "fedadam": Optimizer(fedadam_direction, "Reddi et al. 2021 (FedAdam, Alg. 2)", 0.01, reads=("beta1", "beta2", "tau"),
                         init_state=lambda size, cfg: {"m": np.zeros(size), "v": np.full(size, cfg.tau ** 2)}),
}


class ServerOptimizer:
    """The configured optimizer and its state (checkpointed as is); ``entry``: its registry
    entry (default ``OPTIMIZERS[cfg.optimizer]``; user code: :func:`fedmpi.extensions.optimizer`)."""

    def __init__(self, cfg: ServerConfig, size: int, entry: Optimizer | None = None):
        self.cfg = cfg
        self.entry = entry or OPTIMIZERS[cfg.optimizer]
        self.state: dict[str, np.ndarray] = self.entry.init_state(size, cfg)

    def step(self, weights: np.ndarray, update: np.ndarray) -> None:
        """Apply ``update`` (float64, shape (d,)) to ``weights`` (float32) in place."""
        # an overflow makes the model non-finite, which the server reports as divergence
        with np.errstate(over="ignore", invalid="ignore"):
            direction = self.entry.direction(update, self.state, self.cfg)
            # float64 sum, rounded once to float32
            np.add(weights, self.cfg.lr * direction, out=weights, casting="same_kind")
