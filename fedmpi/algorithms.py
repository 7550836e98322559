"""Federated algorithms: what local training optimises, and the state that clients
and the server keep between rounds (docs/algorithms.md).

- ``fedavg`` (McMahan et al. 2017): local SGD on the client's own loss f_i.
- ``fedprox`` (Li et al., MLSys 2020): local SGD on f_i(w) + mu/2 ||w - w_global||^2.
  Every local step adds the proximal gradient mu (w - w_global) to the step's
  gradient (:class:`fedmpi.training.LocalTrainer`); with DP-SGD after the
  per-example clipping and the noise, because it does not depend on the data.
  Stragglers' partial work is used.
- ``scaffold`` (Karimireddy et al., ICML 2020, Algorithm 1, control variates by
  option II): client i steps y <- y - lr (g_i(y) - c_i + c) and, after its K_i
  local steps, c_i+ = c_i - c + (x - y_i) / (K_i lr); the server applies the
  aggregated model update with ``server.lr`` as the global step size eta_g and
  sets c <- c + sum_{i in S} p_i (c_i+ - c_i).

SCAFFOLD's choices the paper leaves open, or that a simulator adds:

- weights: the paper weights clients equally (model update: the mean over S;
  c <- c + |S|/N mean(delta c_i), which keeps c the mean of all c_i). fedmpi
  weights the model update as aggregator ``fedavg`` does (n_i over the
  cohort's samples) and uses p_i = n_i / (samples of all clients) for c, which
  keeps c = sum_i p_i c_i, the same invariant for the sample-weighted
  objective. With equal client sizes both are the paper's exactly;
- K_i is the number of steps client i actually took (stragglers and deadlines
  make it vary); a client that took none (no samples, dropped) keeps its c_i;
- c_i+ is computed by rank 0 from the update row it received, which option II
  makes a function of that row: the client's delta c_i does not travel. A
  Byzantine client's control variate therefore follows from the update it sent;
- c is float64 on rank 0, each c_i a float32 row of the client state store
  (:mod:`fedmpi.client_state`); c - c_i is formed in float64 and sent to the
  client rounded once to float32.

Each algorithm is one :data:`ALGORITHMS` entry: its paper, the ``algorithm.*``
keys it reads, the default of ``devices.partial_work``, the per-client arrays it
keeps and its server half (``server(cfg, size, client_sizes, store)``), an
object with ``state`` (checkpointed), ``downlink(cohort)`` (per-slot float32 rows
sent with the round, or None) and ``after_round(updates, round)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .client_state import ClientStateStore
from .schema import Config


class NoServerState:
    """The server half of an algorithm that keeps nothing between rounds."""

    def __init__(self, *args):
        self.state: dict[str, np.ndarray] = {}

    def downlink(self, cohort: np.ndarray) -> None:
        return None

    def after_round(self, updates, round_index: int) -> None:
        pass


class ScaffoldServer:
    """Rank 0's half of SCAFFOLD: the server control variate c (float64, checkpointed
    as ``algorithm/control``) and every client's c_i in ``store``."""

    def __init__(self, cfg: Config, size: int, client_sizes: np.ndarray, store: ClientStateStore):
        self.size, self.store, self.lr = size, store, cfg.train.lr
        self.control = np.zeros(size)
        self.state = {"control": self.control}
        sizes = np.asarray(client_sizes, dtype=np.float64)
        self.share = sizes / sizes.sum()  # p_i

    def downlink(self, cohort: np.ndarray) -> np.ndarray:
        """Per slot, c - c_i (float64, rounded once to float32): the correction of every local step."""
        out = np.empty((len(cohort), self.size), dtype=np.float32)
        for slot, cid in enumerate(cohort.tolist()):
            np.subtract(self.control, self.store.row("control", cid), out=out[slot], casting="same_kind")
        return out

    def after_round(self, updates, round_index: int) -> None:
        """Option II for every slot that took steps (``updates``: the slots that arrived,
        rows as the server received them), then c <- c + sum_i p_i (c_i+ - c_i). A row
        that is not finite (excluded from the aggregate) leaves its c_i as it was."""
        steps = updates.record("steps")
        finite = updates.finite if updates.finite is not None else np.ones(len(updates.cohort), dtype=bool)
        delta = np.zeros(self.size)
        for slot, cid in enumerate(updates.cohort.tolist()):
            if steps[slot] <= 0 or not finite[slot]:
                continue
            old = self.store.row("control", cid).astype(np.float64)
            new = (old - self.control - updates.rows[slot].astype(np.float64) / (steps[slot] * self.lr)).astype(np.float32)
            delta += self.share[cid] * (new - old)
            self.store.write("control", cid, new, round_index)
        self.control += delta


@dataclass(frozen=True)
class Algorithm:
    """``reads``: the ``algorithm.*`` keys it uses besides ``name``; ``partial_work``:
    what ``devices.partial_work`` defaults to; ``client_state``: names of the per-client
    float32 rows of d values it keeps on rank 0; ``server``: its server half."""

    paper: str
    reads: tuple[str, ...] = ()
    partial_work: str = "drop"
    client_state: tuple[str, ...] = ()
    server: Callable[..., object] = NoServerState


ALGORITHMS: dict[str, Algorithm] = {
    "fedavg": Algorithm("McMahan et al. 2017 (FedAvg)"),
    "fedprox": Algorithm("Li et al. 2020 (FedProx, MLSys)", reads=("mu",), partial_work="use"),
    "scaffold": Algorithm("Karimireddy et al. 2020 (SCAFFOLD, ICML), option II", reads=("state_store", "state_dir"),
                          partial_work="use", client_state=("control",), server=ScaffoldServer),
}


def prox_mu(cfg: Config) -> float:
    """The proximal weight local training uses (0 for algorithms without the term)."""
    return cfg.algorithm.mu if "mu" in ALGORITHMS[cfg.algorithm.name].reads else 0.0


def client_state_bytes(cfg: Config, size: int) -> int:
    """Bytes of the per-client state rank 0 keeps for a model of ``size`` parameters."""
    return len(ALGORITHMS[cfg.algorithm.name].client_state) * cfg.clients.total * size * 4


def state_path(cfg: Config) -> str:
    """The file of a file-backed client state store: ``<results file>.client-state`` in
    ``algorithm.state_dir`` (default: beside the results file)."""
    path = os.path.abspath(cfg.output.path)
    return os.path.join(cfg.algorithm.state_dir or os.path.dirname(path), os.path.basename(path) + ".client-state")
