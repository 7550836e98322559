"""The sharded parts of a round, the same on every rank.

After training, every rank holds its blocks' columns of every cohort row
(:meth:`fedmpi.protocol.RoundMessages.send_columns` / ``receive_columns``). Then,
on every rank in the same order:

1. :class:`ColumnCheck`: an omniscient attack acts on the columns (ALIE and IPM
   are per-coordinate means and deviations of the honest rows, so each block does
   its own part exactly); each row's norm and finite flag are combined from the
   blocks (rank 0 records them);
2. :class:`ShardedAggregator`: the pre-aggregation steps and the rule of
   :mod:`fedmpi.sharded.rules`; rank 0 maps the decision back to cohort slots as
   :class:`fedmpi.rounds.RuleAggregator` does; the aggregate's norm is combined;
3. :class:`ShardedServerOptimizer`: the server optimizer steps this rank's
   columns of the weights with its columns of the state, and rank 0 gathers the
   new weights' columns (it evaluates and broadcasts the whole model).

Rank 0 runs these inside :class:`fedmpi.server.ServerLoop` (through
:class:`fedmpi.worker.ShardedClients` and :func:`fedmpi.server.build_aggregator`);
workers through :class:`ShardedWorker` in :func:`fedmpi.worker.serve`. The server
state (optimizer, aggregator) lives in columns; a checkpoint gathers it on rank 0
and ``--resume`` scatters it back (:class:`ShardContext`), so what the file holds
is the same as with the rows on rank 0.
"""

from __future__ import annotations

import numpy as np

from .. import attacks, seeding
from ..aggregation import PRE_STEPS, RULES
from ..optimizers import ServerOptimizer
from ..protocol import CMD_LOAD, CMD_STATE
from ..rounds import Aggregate, Updates
from ..schema import Config, ServerConfig
from .columns import Columns, sq_norms
from .layout import BlockLayout
from .rules import SHARDED_RULES, SHARDED_STEPS, aggregate_norm

PARTS = ("optimizer", "aggregator")  # the sharded parts of the server state, by header index


class ShardContext:
    """What one rank's sharded parts share: the ``layout``, ``comm`` (the collectives),
    and on rank 0 of several ranks the round's ``messages``, which call the workers in
    for a state transfer."""

    def __init__(self, layout: BlockLayout, comm, messages=None):
        self.layout, self.comm, self.messages = layout, comm, messages
        self.span = layout.span(comm.rank)
        self.width = self.span[1] - self.span[0]

    def columns(self, rows: np.ndarray) -> Columns:
        return Columns(rows, self.layout, self.comm)

    def _call_in(self, command: int, part: str) -> None:
        if self.comm.rank == 0 and self.messages is not None:
            self.messages.send_command(command, PARTS.index(part))

    def gather_state(self, part: str, local: dict) -> dict:
        """Every rank: its columns ``local`` of a part of the state; rank 0 gets the
        whole (d,) arrays (others an empty dict)."""
        self._call_in(CMD_STATE, part)
        lo, hi = self.span
        full = {}
        for key in sorted(local):
            out = None
            if self.comm.rank == 0:
                out = np.empty(self.layout.size, dtype=local[key].dtype)
                out[lo:hi] = local[key]
            self.comm.gather_columns(local[key] if out is None else out[lo:hi], out, self.layout.spans)
            if out is not None:
                full[key] = out
        return full

    def scatter_state(self, part: str, full: dict | None, local: dict) -> None:
        """Every rank: its columns of rank 0's whole arrays ``full`` into ``local``."""
        self._call_in(CMD_LOAD, part)
        for key in sorted(local):
            self.comm.scatter_columns(None if full is None else np.asarray(full[key], dtype=local[key].dtype),
                                      local[key], self.layout.spans)


class ColumnCheck:
    """Step 1 on every rank: the omniscient attack on the columns, then each row's norm
    and whether it is finite (rank 0's)."""

    def __init__(self, cfg: Config):
        a = cfg.attack
        self.attack = attacks.ATTACKS[a.name]
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)

    def __call__(self, columns: Columns, cohort: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not len(cohort):
            return np.empty(0), np.empty(0, dtype=bool)
        if self.attack.on_server is not None:
            self.attack.on_server(columns.rows, np.isin(cohort, self.byzantine_ids), self.params)
        sq = sq_norms(columns)
        return (np.sqrt(sq), np.isfinite(sq)) if columns.root else (None, None)


class ShardedAggregator:
    """``aggregator.pre`` steps, then ``aggregator.name``, over the columns, on every
    rank. ``vector`` of the returned :class:`Aggregate` is this rank's columns; the
    slot mapping (``selected``, ``scores``) and ``norm`` are rank 0's. The rule's state
    (centered clipping's center) is kept in columns: :attr:`state` gathers it."""

    def __init__(self, cfg: Config, size: int, context: ShardContext):
        self.cfg, self.size, self.context = cfg, size, context
        self.entry = RULES[cfg.aggregator.name]
        self.rule = SHARDED_RULES[cfg.aggregator.name]
        self.local_state: dict[str, np.ndarray] = self.entry.init_state(context.width) if self.entry.init_state else {}

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.context.gather_state("aggregator", self.local_state)

    def load_state(self, values: dict | None) -> None:
        self.context.scatter_state("aggregator", values, self.local_state)

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        columns, k = updates.shard, len(updates.cohort)
        if k == 0:  # an empty Poisson cohort leaves the model as it is
            return Aggregate(np.zeros(self.context.width), np.zeros(0, dtype=bool), np.full(0, np.nan), norm=0.0)
        g = self.cfg.aggregator
        weights = columns.share(updates.samples.astype(np.float64) if columns.root else None)
        members = np.eye(k, dtype=bool)  # members[r, slot]: slot's update went into row r
        row_of_slot = np.arange(k)
        rows = columns
        for step_index, step in enumerate(g.pre):
            values = {"f": g.f, "rng": seeding.rng(self.cfg.seed, "bucketing", round_index, step_index),
                      "bucket_size": step.bucket_size, "max_norm": step.max_norm}
            out = SHARDED_STEPS[step.name](rows, **{name: values[name] for name in PRE_STEPS[step.name].reads})
            if out.groups is not None:
                weights = np.array([weights[group].sum() for group in out.groups])
                members = np.stack([members[group].any(axis=0) for group in out.groups])
                if out.row_of is not None:
                    row_of_slot = out.row_of[row_of_slot]
            rows = out.rows
        values = {"weights": weights, "f": g.f, "m": g.m, "tau": g.tau, "iterations": g.iterations,
                  "smoothing": g.smoothing, "tol": g.tol, "max_iter": g.max_iter, **self.local_state}
        result = self.rule(rows, **{name: values[name] for name in self.entry.reads})
        if self.entry.next_state is not None:
            self.local_state.update(self.entry.next_state(result))
        norm = aggregate_norm(columns, result.vector)
        if not columns.root:
            return Aggregate(result.vector, None, None)
        selected = members[result.selected].any(axis=0) if result.selected is not None else members.any(axis=0)
        scores = result.scores[row_of_slot] if result.scores is not None else np.full(k, np.nan)
        return Aggregate(result.vector, selected, scores, norm=norm)


class ShardedServerOptimizer:
    """The server optimizer over this rank's columns (its state too, in columns):
    ``step(weights, update)`` moves this rank's columns of the global ``weights`` by
    ``update`` (its columns of the aggregate), element by element as
    :class:`fedmpi.optimizers.ServerOptimizer` does, and gathers every rank's new
    columns into rank 0's ``weights``."""

    def __init__(self, cfg: ServerConfig, context: ShardContext):
        self.context = context
        self.columns = ServerOptimizer(cfg, context.width)

    @property
    def local_state(self) -> dict[str, np.ndarray]:
        return self.columns.state

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.context.gather_state("optimizer", self.local_state)

    def load_state(self, values: dict | None) -> None:
        self.context.scatter_state("optimizer", values, self.local_state)

    def step(self, weights: np.ndarray, update: np.ndarray) -> None:
        lo, hi = self.context.span
        mine = weights[lo:hi]
        self.columns.step(mine, update)
        self.context.comm.gather_columns(mine, weights if self.context.comm.rank == 0 else None,
                                         self.context.layout.spans)


class ShardedWorker:
    """A worker's part of every round with ``transport: sharded`` (rank 0's is the same
    objects inside :class:`fedmpi.server.ServerLoop`), and its answer to STATE / LOAD."""

    def __init__(self, cfg: Config, size: int, messages):
        self.messages = messages
        self.context = ShardContext(messages.layout, messages.comm)
        self.check = ColumnCheck(cfg)
        self.parts = {"aggregator": ShardedAggregator(cfg, size, self.context),
                      "optimizer": ShardedServerOptimizer(cfg.server, self.context)}

    def round(self, order, rows: np.ndarray, records: np.ndarray) -> None:
        """After training this rank's slots: exchange, check, aggregate, step."""
        columns = self.context.columns(self.messages.send_columns(rows, records, order.counts))
        self.check(columns, order.cohort)
        updates = Updates(order.cohort, None, order.counts, shard=columns)
        result = self.parts["aggregator"](updates, order.round_index)
        self.parts["optimizer"].step(order.weights, result.vector)

    def command(self, order) -> None:
        part = PARTS[order.part]
        local = self.parts[part].local_state
        if order.command == CMD_STATE:
            self.context.gather_state(part, local)
        else:
            self.context.scatter_state(part, None, local)
