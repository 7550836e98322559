"""One round's values on rank 0, and the aggregators that turn updates into one vector.

:class:`Updates` is what the cohort sent, as rank 0 holds it; :class:`Aggregate`
is what an aggregator decided. Every aggregator is a callable
``aggregator(updates, round_index) -> Aggregate`` with its between-round
state in ``.state`` (checkpointed):

- :class:`RuleAggregator`: ``aggregator.pre`` steps, then ``aggregator.name``,
  over the finite rows (any rule of :data:`fedmpi.aggregation.RULES`);
- :class:`PresummedMean`: ``transport: reduce``, FedAvg from the workers'
  pre-summed weighted total, never the rows;
- :class:`fedmpi.privacy.client_level.CentralDP`: central client-level DP.

:func:`fedmpi.server.build_aggregator` picks one for a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import extensions, seeding
from .aggregation import AggregationResult, unmet_requirement
from .protocol import RECORD
from .schema import Config


@dataclass
class Updates:
    """One round's cohort as rank 0 holds it, in slot order.

    ``rows``: the (K, d) float32 updates (``transport: gather``), or ``total``: the
    float64 sum of n_i * update_i over the finite rows (``transport: reduce``).
    ``records``: (K, R) float64 rows of :data:`fedmpi.protocol.RECORD_FIELDS`.
    ``counts``: slots per rank. ``byzantine``: which slots hold a Byzantine client.
    ``norms``: the L2 norm of each slot's update as received; ``finite``: whether
    every coordinate of it is finite (None: all are). A slot whose update is not
    finite never reaches an aggregator's rule, and counts against f. ``shard``:
    ``transport: sharded``, this rank's columns of the rows
    (:class:`fedmpi.sharded.columns.Columns`). ``canaries``: how many of the last
    slots are audit canary clients inserted by rank 0 (:mod:`fedmpi.canaries`), not
    clients of the run."""

    cohort: np.ndarray
    records: np.ndarray
    counts: list
    rows: np.ndarray | None = None
    total: np.ndarray | None = None
    byzantine: np.ndarray | None = None
    norms: np.ndarray | None = None
    finite: np.ndarray | None = None
    shard: Any = None
    canaries: int = 0

    def record(self, name: str) -> np.ndarray:
        return self.records[:, RECORD[name]]

    @property
    def samples(self) -> np.ndarray:
        return self.record("num_samples")

    @property
    def kept(self) -> np.ndarray:
        """Indices of the slots whose update is finite, in slot order."""
        return np.arange(len(self.cohort)) if self.finite is None else np.flatnonzero(self.finite)

    @property
    def dropped(self) -> np.ndarray:
        """Per slot: the update never reached the server (:mod:`fedmpi.devices`)."""
        return self.record("dropped") != 0

    def arrived(self) -> Updates:
        """The slots whose update reached the server: ``self`` when none was dropped, else
        a new Updates whose rows are ``self.rows`` moved up in place (``self.rows`` is
        then no longer slot-aligned; rank 0 keeps one copy of the rows)."""
        keep = np.flatnonzero(~self.dropped)
        if len(keep) == len(self.cohort):
            return self
        rows = None
        if self.rows is not None:
            for j, i in enumerate(keep.tolist()):
                if i != j:
                    self.rows[j] = self.rows[i]
            rows = self.rows[:len(keep)]
        byzantine = self.byzantine[keep] if self.byzantine is not None else None
        return Updates(self.cohort[keep], self.records[keep], self.counts, rows=rows, total=self.total,
                       byzantine=byzantine, finite=self.finite[keep] if self.finite is not None else None)


@dataclass
class Aggregate:
    """An aggregator's decision: the (d,) float64 ``vector`` the server optimizer
    applies; per slot, whether the vector used its update (``selected``) and the
    rule's score for it (NaN where none, +inf for a non-finite update); ``clipped``:
    per-slot clipping that the aggregator itself did (central DP), replacing the
    clients' records. ``skipped``: why the rule could not run on the round's finite
    updates (too few for its requirement); the server then leaves the model and its
    state as they are. ``norm``: the L2 norm of the whole aggregate where ``vector``
    holds only this rank's columns (``transport: sharded``)."""

    vector: np.ndarray
    selected: np.ndarray
    scores: np.ndarray
    clipped: np.ndarray | None = None
    skipped: str | None = None
    norm: float | None = None

    def for_slots(self, arrived: np.ndarray) -> Aggregate:
        """The decision over the arrived slots spread back over every slot of the cohort
        (``arrived``: (K,) bool); dropped slots are not selected and have no score."""
        k = len(arrived)
        selected = np.zeros(k, dtype=bool)
        selected[arrived] = self.selected
        scores = np.full(k, np.nan)
        scores[arrived] = self.scores
        clipped = None
        if self.clipped is not None:
            clipped = np.full(k, np.nan)
            clipped[arrived] = self.clipped
        return Aggregate(self.vector, selected, scores, clipped, skipped=self.skipped, norm=self.norm)


def finite_rows(rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The rows of ``kept`` (sorted indices), as the first len(kept) rows of ``rows``
    moved up in place (no copy of the cohort: the rows are rank 0's scratch once
    received); ``rows`` itself when every row is kept."""
    if len(kept) == len(rows):
        return rows
    for position, index in enumerate(kept):
        if position != index:
            rows[position] = rows[index]
    return rows[:len(kept)]


def _excluded_scores(k: int, kept: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-slot scores: ``values`` for the kept slots, +inf for the excluded ones."""
    scores = np.full(k, np.inf)
    scores[kept] = values
    return scores


def _skipped(size: int, k: int, kept: np.ndarray, reason: str) -> Aggregate:
    return Aggregate(np.zeros(size), np.zeros(k, dtype=bool), _excluded_scores(k, kept, np.nan), skipped=reason)


class RuleAggregator:
    """``aggregator.pre`` steps, then ``aggregator.name``, over one round's finite rows.

    Rows with a non-finite coordinate are left out and count against f: the steps and
    the rule run on the K - e finite rows with f - e (at least 0). When those rows do
    not meet the rule's requirement (its registry entry), the round is skipped.

    Holds the only state a rule keeps between rounds (e.g. centered clipping's
    center) in :attr:`state`. Maps the rule's decision back to cohort slots: a
    slot is selected when any row it went into was, and scored with the score of
    the row that stands for it.
    """

    # the functions of the steps by name, where they are not the entries' own
    # (fedmpi.sharded.round's subclass runs them over column blocks); the rule's is
    # ``self.function``
    step_functions: Mapping | None = None

    def __init__(self, cfg: Config, size: int):
        self.cfg = cfg
        self.size = size
        g = cfg.aggregator
        self.rule = extensions.rule(g.name, g.params)
        self.steps = [extensions.pre_step(step.name, step.params, f"aggregator.pre[{i}].name") for i, step in enumerate(g.pre)]
        self.function = self.rule.function
        self.state: dict[str, np.ndarray] = self.rule.init_state(size) if self.rule.init_state else {}

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        k = len(updates.cohort)
        if k == 0:  # an empty Poisson cohort leaves the model as it is
            return Aggregate(np.zeros(self.size), np.zeros(0, dtype=bool), np.full(0, np.nan))
        kept = updates.kept
        f, problem = self.finite_f(k, kept)
        if problem is not None:
            return self.skip(k, kept, problem)
        if "weights" in self.rule.reads and not updates.samples[kept].sum():
            # no client of the cohort holds a sample (e.g. a membership audit's split): a zero
            # step, as the pre-summed mean of transport: reduce takes
            return Aggregate(np.zeros(self.size), np.zeros(k, dtype=bool), np.full(k, np.nan))
        rows = finite_rows(updates.rows, kept)
        result, members, row_of_slot = self.apply(rows, updates.samples[kept].astype(np.float64), f, round_index)
        if self.rule.next_state is not None:
            self.state.update(self.rule.next_state(result))
        return self.to_slots(result, members, row_of_slot, k, kept)

    def finite_f(self, k: int, kept: np.ndarray) -> tuple[int, str | None]:
        """The f the steps and the rule get when only ``kept`` of the k rows are finite
        (each left-out row counts against f), and why they cannot run on those rows
        (None: they can)."""
        f = max(0, self.cfg.aggregator.f - (k - len(kept)))
        return f, self.unmet(len(kept), f) if len(kept) else "no finite update"

    def skip(self, k: int, kept: np.ndarray, problem: str) -> Aggregate:
        """A round the rule cannot aggregate: the model and the rule's state stay as they are."""
        return _skipped(self.size, k, kept, problem)

    def to_slots(self, result: AggregationResult, members: np.ndarray, row_of_slot: np.ndarray, k: int,
                 kept: np.ndarray) -> Aggregate:
        """The rule's decision over the kept rows, per cohort slot (+inf scores where left out)."""
        selected = np.zeros(k, dtype=bool)
        selected[kept] = members[result.selected].any(axis=0) if result.selected is not None else members.any(axis=0)
        values = result.scores[row_of_slot] if result.scores is not None else np.nan
        return Aggregate(result.vector, selected, _excluded_scores(k, kept, values))

    def unmet(self, n: int, f: int) -> str | None:
        """Why the steps and the rule cannot run on n rows with f (None: they can)."""
        return unmet_requirement(self.cfg.aggregator, n, f, self.rule, self.steps)

    def apply(self, rows: np.ndarray, weights: np.ndarray, f: int, round_index: int):
        """The steps and the rule over ``rows`` with ``f``, reading (not changing) the
        rule's state: (AggregationResult, members[r, i]: input row i went into the rule's
        row r, row_of[i]: the rule's row that stands for input row i)."""
        g = self.cfg.aggregator
        k = len(rows)
        members = np.eye(k, dtype=bool)
        row_of_slot = np.arange(k)
        for step_index, (step, entry) in enumerate(zip(g.pre, self.steps)):
            values = {"f": f, "rng": seeding.rng(self.cfg.seed, "bucketing", round_index, step_index),
                      "bucket_size": step.bucket_size, "max_norm": step.max_norm}
            function = entry.function if self.step_functions is None else self.step_functions[step.name]
            out = function(rows, **{name: values[name] for name in entry.reads})
            if out.groups is not None:
                weights = np.array([weights[group].sum() for group in out.groups])
                members = np.stack([members[group].any(axis=0) for group in out.groups])
                if out.row_of is not None:
                    row_of_slot = out.row_of[row_of_slot]
            rows = out.rows
        values = {**self.state, "weights": weights, "f": f, "m": g.m, "tau": g.tau, "iterations": g.iterations,
                  "smoothing": g.smoothing, "tol": g.tol, "max_iter": g.max_iter, "state": self.state}
        if "rng" in self.rule.reads:  # user rules only
            values["rng"] = seeding.rng(self.cfg.seed, "rule", round_index)
        result = self.function(rows, **{name: values[name] for name in self.rule.reads})
        return result, members, row_of_slot

    def simulate(self, rows: np.ndarray, f: int, round_index: int) -> AggregationResult:
        """What the steps and the rule would make of ``rows`` with ``f`` (uniform
        weights; state read, not changed), for full-knowledge attacks. ``selected``
        lists the input rows the aggregate used. Raises ValueError when the rows do not
        meet the rule's requirement."""
        problem = self.unmet(len(rows), f)
        if problem is not None:
            raise ValueError(problem)
        kept, self.state = self.state, {name: value.copy() for name, value in self.state.items()}
        try:  # a user rule may change its state in place: it reads a copy here
            result, members, _ = self.apply(rows, np.ones(len(rows)), f, round_index)
        finally:
            self.state = kept
        used = members[result.selected].any(axis=0) if result.selected is not None else members.any(axis=0)
        return AggregationResult(result.vector, selected=np.flatnonzero(used), scores=None, info=result.info)


class PresummedMean:
    """``transport: reduce``: FedAvg from sum_i n_i update_i, which the workers summed
    over their finite rows; rank 0 never holds the rows. Scores are the slots' FedAvg
    weights (+inf for a non-finite update, which the workers left out)."""

    def __init__(self, cfg: Config, size: int):
        self.size = size
        self.state: dict[str, np.ndarray] = {}

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        samples = updates.samples
        k, kept = len(samples), updates.kept
        if len(kept) < k:
            total_samples = samples[kept].sum()
            if not total_samples:
                return _skipped(self.size, k, kept, "no finite update")
            selected = np.zeros(k, dtype=bool)
            selected[kept] = samples[kept] > 0
            return Aggregate(updates.total / total_samples, selected,
                             _excluded_scores(k, kept, samples[kept] / total_samples))
        total_samples = samples.sum()
        if not total_samples:
            return Aggregate(np.zeros(self.size), samples > 0, np.full(len(samples), np.nan))
        return Aggregate(updates.total / total_samples, samples > 0, samples / total_samples)
