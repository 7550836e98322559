"""Heterogeneous devices: stragglers, dropouts and a deadline, every draw keyed.

FedProx's systems heterogeneity (Li et al., MLSys 2020, Section 5.2): in every
round a share of the sampled devices are stragglers that do less local work;
FedAvg drops their updates, FedProx uses the partial work. Added here: a
per-round dropout probability and a deadline over per-client speeds.

What one round's slots do, the same on every rank (so the rows do not depend on
which rank hosts a client):

1. stragglers (``devices.stragglers`` = p): exactly round(p K) of the K slots,
   halves rounded up, chosen uniformly without replacement from the key
   (seed, "stragglers", round);
2. dropout (``devices.dropout``): each slot's client drops out with that
   probability, from the key (seed, "dropout", round, client id); it does not
   train and sends nothing;
3. a straggler's local work: s ~ Uniform{1, ..., K_i - 1} steps, K_i being its
   full work (``train.epochs`` over its samples), from (seed, "stragglers",
   round, client id). FedProx draws epochs below E; steps let E = 1 have
   stragglers too. A client whose full work is one step does that step;
4. deadline (``devices.deadline`` = T time units): client i runs at v_i steps per
   unit, v_i ~ LogNormal(0, ``speed_sigma``) drawn once per client from (seed,
   "speed", client id), so a median device does T steps by the deadline. Work
   that does not fit is cut to floor(T v_i) steps (partial work) or, with
   ``partial_work: drop``, the update misses the deadline and is dropped; a
   client that fits no step at all is dropped either way;
5. ``partial_work: drop``: a straggler's update is discarded (FedProx's FedAvg
   baseline); ``use``: it is aggregated with the others (FedProx, SCAFFOLD).

A dropped slot is not trained (the simulation skips work whose result is thrown
away): it records 0 steps, NaN loss and norm, and its reason in
``/clients/dropped`` (:data:`DROP_REASONS`). Its update never reaches the
aggregator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import seeding
from .schema import Config, DevicesConfig

# /clients/dropped: why a slot's update did not reach the aggregator (0: it did)
USED, DROPOUT, DEADLINE, PARTIAL = 0, 1, 2, 3
DROP_REASONS = {USED: "used", DROPOUT: "dropped out", DEADLINE: "missed the deadline",
                PARTIAL: "partial work discarded (partial_work: drop)"}


def active(d: DevicesConfig) -> bool:
    """Whether any device heterogeneity is configured (without it nothing is drawn)."""
    return d.stragglers > 0 or d.dropout > 0 or d.deadline is not None


@dataclass
class CohortDraws:
    """Per slot of a round's cohort: a straggler? dropped out?"""

    straggler: np.ndarray
    dropout: np.ndarray

    def __getitem__(self, slots: slice) -> CohortDraws:
        return CohortDraws(self.straggler[slots], self.dropout[slots])


def cohort_draws(cfg: Config, round_index: int, cohort: np.ndarray) -> CohortDraws | None:
    """The round's straggler and dropout draws for every slot; None without devices."""
    d = cfg.devices
    if not active(d):
        return None
    k = len(cohort)
    straggler = np.zeros(k, dtype=bool)
    count = int(math.floor(d.stragglers * k + 0.5))
    if count:
        straggler[seeding.rng(cfg.seed, "stragglers", round_index).choice(k, size=count, replace=False)] = True
    dropout = np.zeros(k, dtype=bool)
    if d.dropout > 0:
        dropout[:] = [seeding.rng(cfg.seed, "dropout", round_index, int(cid)).random() < d.dropout for cid in cohort]
    return CohortDraws(straggler, dropout)


def speed(cfg: Config, client_id: int) -> float:
    """Client ``client_id``'s speed in local steps per time unit (fixed for the run)."""
    sigma = cfg.devices.speed_sigma
    return float(seeding.rng(cfg.seed, "speed", client_id).lognormal(0.0, sigma)) if sigma > 0 else 1.0


def local_work(cfg: Config, round_index: int, client_id: int, full_steps: int, straggler: bool,
               dropout: bool) -> tuple[int, int]:
    """(local steps the client takes, its :data:`DROP_REASONS` code): 0 steps when dropped."""
    d = cfg.devices
    if dropout:
        return 0, DROPOUT
    steps, partial = full_steps, False
    if straggler and full_steps > 1:
        steps = int(seeding.rng(cfg.seed, "stragglers", round_index, client_id).integers(1, full_steps))
        partial = True
    if d.deadline is not None and steps > 0:
        fits = int(math.floor(d.deadline * speed(cfg, client_id)))
        if steps > fits:
            if fits == 0 or d.partial_work == "drop":
                return 0, DEADLINE
            steps, partial = fits, True
    if partial and d.partial_work == "drop":
        return 0, PARTIAL
    return steps, USED
