"""One round's values on rank 0, and the aggregators that turn updates into one vector.

:class:`Updates` is what the cohort sent, as rank 0 holds it; :class:`Aggregate`
is what an aggregator decided. Every aggregator is a callable
``aggregator(updates, round_index) -> Aggregate`` with its between-round
state in ``.state`` (checkpointed):

- :class:`RuleAggregator`: ``aggregator.pre`` steps, then ``aggregator.name``,
  over the rows (any rule of :data:`fedmpi.aggregation.RULES`);
- :class:`PresummedMean`: ``transport: reduce``, FedAvg from the workers'
  pre-summed weighted total, never the rows;
- :class:`fedmpi.privacy.client_level.CentralDP`: central client-level DP.

:func:`fedmpi.server.build_aggregator` picks one for a config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import seeding
from .aggregation import PRE_STEPS, RULES
from .protocol import RECORD
from .schema import Config


@dataclass
class Updates:
    """One round's cohort as rank 0 holds it, in slot order.

    ``rows``: the (K, d) float32 updates (``transport: gather``), or ``total``: the
    float64 sum of n_i * update_i (``transport: reduce``). ``records``: (K, R)
    float64 rows of :data:`fedmpi.protocol.RECORD_FIELDS`. ``counts``: slots per
    rank. ``byzantine``: which slots hold a Byzantine client. ``norms``: the L2 norm
    of each slot's update as received. ``canaries``: how many of the last slots are
    audit canary clients inserted by rank 0 (:mod:`fedmpi.canaries`), not clients
    of the run."""

    cohort: np.ndarray
    records: np.ndarray
    counts: list
    rows: np.ndarray | None = None
    total: np.ndarray | None = None
    byzantine: np.ndarray | None = None
    norms: np.ndarray | None = None
    canaries: int = 0

    def record(self, name: str) -> np.ndarray:
        return self.records[:, RECORD[name]]

    @property
    def samples(self) -> np.ndarray:
        return self.record("num_samples")


@dataclass
class Aggregate:
    """An aggregator's decision: the (d,) float64 ``vector`` the server optimizer
    applies; per slot, whether the vector used its update (``selected``) and the
    rule's score for it (NaN where none); ``clipped``: per-slot clipping that the
    aggregator itself did (central DP), replacing the clients' records."""

    vector: np.ndarray
    selected: np.ndarray
    scores: np.ndarray
    clipped: np.ndarray | None = None


class RuleAggregator:
    """``aggregator.pre`` steps, then ``aggregator.name``, over one round's rows.

    Holds the only state a rule keeps between rounds (e.g. centered clipping's
    center) in :attr:`state`. Maps the rule's decision back to cohort slots: a
    slot is selected when any row it went into was, and scored with the score of
    the row that stands for it.
    """

    def __init__(self, cfg: Config, size: int):
        self.cfg = cfg
        self.size = size
        self.rule = RULES[cfg.aggregator.name]
        self.state: dict[str, np.ndarray] = self.rule.init_state(size) if self.rule.init_state else {}

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        k = len(updates.cohort)
        if k == 0:  # an empty Poisson cohort leaves the model as it is
            return Aggregate(np.zeros(self.size), np.zeros(0, dtype=bool), np.full(0, np.nan))
        g = self.cfg.aggregator
        rows, weights = updates.rows, updates.samples.astype(np.float64)
        members = np.eye(k, dtype=bool)  # members[r, slot]: slot's update went into row r
        row_of_slot = np.arange(k)  # the row that stands for each slot, for scores
        for step_index, step in enumerate(g.pre):
            entry = PRE_STEPS[step.name]
            values = {"f": g.f, "rng": seeding.rng(self.cfg.seed, "bucketing", round_index, step_index),
                      "bucket_size": step.bucket_size, "max_norm": step.max_norm}
            out = entry.function(rows, **{name: values[name] for name in entry.reads})
            if out.groups is not None:
                weights = np.array([weights[group].sum() for group in out.groups])
                members = np.stack([members[group].any(axis=0) for group in out.groups])
                if out.row_of is not None:
                    row_of_slot = out.row_of[row_of_slot]
            rows = out.rows
        values = {"weights": weights, "f": g.f, "m": g.m, "tau": g.tau, "iterations": g.iterations,
                  "smoothing": g.smoothing, "tol": g.tol, "max_iter": g.max_iter, **self.state}
        result = self.rule.function(rows, **{name: values[name] for name in self.rule.reads})
        if self.rule.next_state is not None:
            self.state.update(self.rule.next_state(result))
        selected = members[result.selected].any(axis=0) if result.selected is not None else members.any(axis=0)
        scores = result.scores[row_of_slot] if result.scores is not None else np.full(k, np.nan)
        return Aggregate(result.vector, selected, scores)


class PresummedMean:
    """``transport: reduce``: FedAvg from sum_i n_i update_i, which the workers summed;
    rank 0 never holds the rows. Scores are the slots' FedAvg weights."""

    state: dict[str, np.ndarray] = {}

    def __init__(self, cfg: Config, size: int):
        self.size = size
        self.state = {}

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        samples = updates.samples
        total_samples = samples.sum()
        if not total_samples:
            return Aggregate(np.zeros(self.size), samples > 0, np.full(len(samples), np.nan))
        return Aggregate(updates.total / total_samples, samples > 0, samples / total_samples)
