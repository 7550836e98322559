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
from ..optimizers import ServerOptimizer
from ..protocol import CMD_LOAD, CMD_STATE
from ..rounds import Aggregate, RuleAggregator, Updates, finite_rows
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
    """Step 1 on every rank: an omniscient attack on the columns (ALIE and IPM, with the
    finite flags of the rows as they arrived, combined first), then each row's norm and
    whether it is finite (rank 0's)."""

    def __init__(self, cfg: Config):
        a = cfg.attack
        self.cfg = cfg
        self.attack = attacks.ATTACKS[a.name]
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.params = attacks.resolved_params(cfg)

    def __call__(self, columns: Columns, cohort: np.ndarray, round_index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not len(cohort):
            return np.empty(0), np.empty(0, dtype=bool)
        if self.attack.on_server is not None:
            sq = sq_norms(columns)
            finite = columns.share(np.isfinite(sq) if columns.root else None)
            byzantine = np.isin(cohort, self.byzantine_ids)
            with np.errstate(over="ignore", invalid="ignore"):  # what the attack makes is checked below
                self.attack.on_server(columns.rows, byzantine, self.params, self.context(cohort, byzantine, finite,
                                                                                          round_index))
        sq = sq_norms(columns)
        return (np.sqrt(sq), np.isfinite(sq)) if columns.root else (None, None)

    def context(self, cohort: np.ndarray, byzantine: np.ndarray, finite: np.ndarray, round_index: int):
        """What a coordinate-wise attack reads of :class:`fedmpi.attacks.ServerContext` (the
        honest finite rows); the rule is not simulated over columns (attacks that need it
        are refused by config validation)."""
        def aggregate(rows):
            raise attacks.Inapplicable("transport: sharded does not simulate the rule for an attack")

        return attacks.ServerContext(round_index=round_index, cohort=cohort, finite=finite, honest=~byzantine & finite,
                                     f=self.cfg.aggregator.f, aggregate=aggregate,
                                     rng=seeding.rng(self.cfg.seed, "server_attack", round_index))


class ShardedAggregator(RuleAggregator):
    """:class:`fedmpi.rounds.RuleAggregator` over column blocks, on every rank: the same
    finite rows (rank 0's flags, shared), f less the rows left out, skipped rounds, steps
    and slot mapping, with the functions of :mod:`fedmpi.sharded.rules`. ``vector`` of
    the returned :class:`Aggregate` is this rank's columns; ``selected``, ``scores`` and
    ``norm`` are rank 0's. :attr:`state` (centered clipping's center) holds this rank's
    columns; :meth:`gather_state` and :meth:`load_state` move the whole arrays."""

    step_functions = SHARDED_STEPS

    def __init__(self, cfg: Config, size: int, context: ShardContext):
        super().__init__(cfg, context.width)
        self.function = SHARDED_RULES[cfg.aggregator.name]
        self.context = context

    def gather_state(self) -> dict[str, np.ndarray]:
        return self.context.gather_state("aggregator", self.state)

    def load_state(self, values: dict | None) -> None:
        self.context.scatter_state("aggregator", values, self.state)

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        columns, k = updates.shard, len(updates.cohort)
        if k == 0:  # an empty Poisson cohort leaves the model as it is
            return Aggregate(np.zeros(self.size), np.zeros(0, dtype=bool), np.full(0, np.nan), norm=0.0)
        kept, samples = columns.share((updates.kept, updates.samples) if columns.root else None)
        f, problem = self.finite_f(k, kept)
        if problem is not None:
            skipped = self.skip(k, kept, problem)
            skipped.norm = 0.0
            return skipped
        rows = columns.with_rows(finite_rows(columns.rows, kept))
        result, members, row_of_slot = self.apply(rows, samples[kept].astype(np.float64), f, round_index)
        if self.rule.next_state is not None:
            self.state.update(self.rule.next_state(result))
        norm = aggregate_norm(columns, result.vector)
        if not columns.root:
            return Aggregate(result.vector, None, None)
        decided = self.to_slots(result, members, row_of_slot, k, kept)
        decided.norm = norm
        return decided

    def simulate(self, rows: np.ndarray, f: int, round_index: int):
        raise ValueError("transport: sharded does not simulate the rule over whole rows")


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
    def state(self) -> dict[str, np.ndarray]:
        return self.columns.state

    def gather_state(self) -> dict[str, np.ndarray]:
        return self.context.gather_state("optimizer", self.state)

    def load_state(self, values: dict | None) -> None:
        self.context.scatter_state("optimizer", values, self.state)

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
        """After training this rank's slots: exchange, check, aggregate, step (unless the
        round was skipped: every rank knows it, from the shared finite flags)."""
        columns = self.context.columns(self.messages.send_columns(rows, records, order.counts))
        self.check(columns, order.cohort, order.round_index)
        updates = Updates(order.cohort, None, order.counts, shard=columns)
        result = self.parts["aggregator"](updates, order.round_index)
        if result.skipped is None:
            self.parts["optimizer"].step(order.weights, result.vector)

    def command(self, order) -> None:
        part = PARTS[order.part]
        local = self.parts[part].state
        if order.command == CMD_STATE:
            self.context.gather_state(part, local)
        else:
            self.context.scatter_state(part, None, local)
