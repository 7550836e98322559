"""Ranks >= 1: host virtual clients, train the ones the server hands out, send rows back.

One round as a worker sees it::

    Ibcast header (command, round, cohort size), waited for asleep -- stop when command is STOP
    Bcast cohort client ids
    Bcast global weights (flat float32)
    train my contiguous block of cohort slots, in slot order, into one (k, d) buffer
    Ibarrier, waited for asleep (every worker done training)
    Gatherv rows, Gatherv per-client records (float64 rows of META_FIELDS);
      with transport: reduce, Gatherv the records and Reduce the weighted sum of the rows

Which slots a rank trains depends on the world size, but what a client computes
does not (its randomness is keyed by seed, round and client id), so the gathered
(K, d) array is the same for any number of ranks.
"""

from __future__ import annotations

import time

import numpy as np

from . import aggregation, attacks, seeding
from .config import Config
from .data import FederatedData
from .models import FlatModel
from .training import LocalTrainer

CMD_STOP, CMD_ROUND = 0, 1
META_FIELDS = ("num_samples", "train_loss", "steps", "train_s", "clipped_fraction", "update_norm")
META = {name: i for i, name in enumerate(META_FIELDS)}


def slot_counts(cohort_size: int, world_size: int) -> list[int]:
    """Rows per rank: with one process rank 0 trains everything; otherwise rank 0
    trains nothing and the workers split the cohort into near-equal contiguous blocks."""
    if world_size == 1:
        return [cohort_size]
    base, extra = divmod(cohort_size, world_size - 1)
    return [0] + [base + (1 if w < extra else 0) for w in range(world_size - 1)]


class ClientHost:
    """Trains the clients of one rank, one after another, on one flat model."""

    def __init__(self, cfg: Config, data: FederatedData, model: FlatModel):
        self.cfg = cfg
        self.data = data
        self.trainer = LocalTrainer(model, cfg)
        a = cfg.attack
        self.byzantine = set(attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients).tolist())
        self.attack_params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)

    def train_slots(self, round_index: int, client_ids: np.ndarray, weights: np.ndarray,
                    rows: np.ndarray, meta: np.ndarray) -> None:
        """Train ``client_ids`` in order; row i of ``rows``/``meta`` belongs to client_ids[i]."""
        for i, cid in enumerate(client_ids):
            start = time.perf_counter()
            cid = int(cid)
            x, y = self.data.client(cid)
            byzantine = cid in self.byzantine
            if byzantine and self.cfg.attack.name == "label_flip":
                y = attacks.flip_labels(y, self.data.num_classes)
            result = self.trainer.train(weights, x, y, round_index, cid, rows[i])
            clipped_fraction = result.clipped_fraction
            if byzantine:  # a Byzantine client sends what it likes, privacy protocol or not
                attacks.apply_update_attack(self.cfg.attack.name, self.attack_params, rows[i], self.cfg.seed,
                                            round_index, cid)
            elif self.cfg.privacy.mode == "client_local":
                clipped_fraction = float(self.privatise_update(rows[i], round_index, cid))
            meta[i, META["clipped_fraction"]] = clipped_fraction
            if self.cfg.transport == "reduce":  # rank 0 never sees the row: the norm travels with the record
                meta[i, META["update_norm"]] = aggregation.row_norms(rows[i:i + 1])[0]
            meta[i, META["num_samples"]] = result.num_samples
            meta[i, META["train_loss"]] = result.train_loss
            meta[i, META["steps"]] = result.steps
            meta[i, META["train_s"]] = time.perf_counter() - start


    def privatise_update(self, row: np.ndarray, round_index: int, client_id: int) -> bool:
        """Local client-level DP: clip the update to S, add N(0, z^2 S^2) from the
        client's key. Returns whether the update was clipped."""
        from .privacy import clip_update

        p = self.cfg.privacy
        clipped = clip_update(row, p.max_grad_norm)
        noise = seeding.rng(self.cfg.seed, "dp_noise", round_index, client_id).standard_normal(row.size)
        row += (p.noise_multiplier * p.max_grad_norm * noise).astype(np.float32)
        return clipped


def weighted_total(rows: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """transport: reduce: sum_i n_i * update_i over this rank's clients, float64 (d,)."""
    if not len(rows):
        return np.zeros(rows.shape[1])
    return aggregation.weighted_sum(rows, meta[:, META["num_samples"]])


def run_worker(cfg: Config, comm, data: FederatedData, model: FlatModel) -> int:
    """Serve rounds until STOP; return the exit status rank 0 sent with it."""
    host = ClientHost(cfg, data, model)
    header = np.zeros(3, dtype=np.int64)
    weights = np.empty(model.size, dtype=np.float32)
    rows = np.empty((0, model.size), dtype=np.float32)
    while True:
        comm.bcast_idle(header)
        if header[0] == CMD_STOP:
            return int(header[1])
        round_index, cohort_size = int(header[1]), int(header[2])
        cohort = np.empty(cohort_size, dtype=np.int64)
        comm.bcast(cohort)
        comm.bcast(weights)
        counts = slot_counts(cohort_size, comm.size)
        start = sum(counts[: comm.rank])
        mine = cohort[start:start + counts[comm.rank]]
        if rows.shape[0] != len(mine):
            rows = np.empty((len(mine), model.size), dtype=np.float32)
        meta = np.zeros((len(mine), len(META_FIELDS)))
        host.train_slots(round_index, mine, weights, rows, meta)
        comm.barrier_idle()
        if cfg.transport == "reduce":
            comm.gather_rows(meta, None, counts)
            comm.reduce_sum(weighted_total(rows, meta), None)
        else:
            comm.gather_rows(rows, None, counts)
            comm.gather_rows(meta, None, counts)
