"""The clients of a run: hosting and training them, and reaching them from rank 0.

:class:`ClientHost` trains a rank's share of the cohort, one client after
another, on one flat model: local training, then what a Byzantine client does
to its data or its update (its attack's ``on_data`` / ``on_update`` hooks), and
local client-level DP for honest clients. With ``transport: reduce`` each row is
checked here (norm and finite flag, :func:`fedmpi.aggregation.norms_and_finite`)
and only finite rows enter the pre-summed total. With heterogeneous devices
(:mod:`fedmpi.devices`) a client may do less work or drop out; what the
algorithm sends per slot (SCAFFOLD's c - c_i) is added to every local step.

Rank 0 reaches the clients through one interface, ``collect(round, cohort,
weights, slot_rows) -> Updates`` and ``stop(status)``: :class:`RemoteClients` over MPI
(the workers run :func:`serve`), or :class:`LocalClients` in a single process,
where rank 0 trains the cohort itself. Both produce the same bytes.
:class:`ShardedClients` (``transport: sharded``) leaves rank 0 only its blocks'
columns of the rows, already checked (:mod:`fedmpi.sharded.round`).
"""

from __future__ import annotations

import time

import numpy as np

from . import attacks, devices, extensions
from .aggregation import norms_and_finite
from .canaries import ExampleCanaries
from .data import FederatedData
from .models import FlatModel
from .privacy.client_level import privatise_update
from .protocol import CMD_ROUND, CMD_RUN, RECORD, RECORD_FIELDS, RoundMessages, slot_counts, weighted_total
from .rounds import Updates
from .schema import Config
from .sharded.round import ColumnCheck, ShardContext, ShardedWorker
from .training import LocalTrainer


class ClientHost:
    """Trains the clients of one rank, one after another, on one flat model."""

    def __init__(self, cfg: Config, data: FederatedData, model: FlatModel):
        self.cfg = cfg
        self.data = data
        self.trainer = LocalTrainer(model, cfg)
        a = cfg.attack
        self.attack = extensions.attack(a.name)
        self.byzantine = set(attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients).tolist())
        self.attack_params = attacks.resolved_params(cfg, data, self.attack)
        self.canaries = ExampleCanaries(cfg, data, model.size) if cfg.audit.canaries.count else None

    def close(self) -> None:
        """Detach what this host attached to the shared model (DP-SGD's forward hooks)."""
        if self.trainer.dp:
            self.trainer.per_example.remove()

    def train_slots(self, round_index: int, client_ids: np.ndarray, weights: np.ndarray,
                    rows: np.ndarray, records: np.ndarray, draws: devices.CohortDraws | None = None,
                    corrections: np.ndarray | None = None) -> None:
        """Train ``client_ids`` in order; row i of ``rows``/``records`` (and of ``draws``, the
        device draws, and ``corrections``, the algorithm's per-slot rows) belongs to client_ids[i]."""
        cfg, attack = self.cfg, self.attack
        for i, cid in enumerate(client_ids):
            start = time.perf_counter()
            cid = int(cid)
            x, y = self.data.client(cid)
            max_steps = None
            if draws is not None:
                max_steps, dropped = devices.local_work(cfg, round_index, cid, self.trainer.full_steps(len(y)),
                                                        bool(draws.straggler[i]), bool(draws.dropout[i]))
                records[i, RECORD["dropped"]] = dropped
                if dropped:  # nothing reaches the server: the work is not simulated
                    rows[i] = 0.0
                    records[i, [RECORD["num_samples"], RECORD["train_loss"], RECORD["steps"], RECORD["clipped_fraction"],
                                RECORD["update_norm"], RECORD["finite"]]] = (len(y), np.nan, 0, np.nan, np.nan, 1.0)
                    records[i, RECORD["train_s"]] = time.perf_counter() - start
                    continue
            byzantine = cid in self.byzantine
            if byzantine and attack.on_data is not None:
                x, y = attack.on_data(x, y, self.data.num_classes, self.attack_params,
                                      attacks.client_rng(cfg.seed, round_index, cid))
            share = self.canaries.share(round_index, cid) if self.canaries is not None else None
            result = self.trainer.train(weights, x, y, round_index, cid, rows[i], max_steps,
                                        corrections[i] if corrections is not None else None, canaries=share)
            clipped_fraction = result.clipped_fraction
            if byzantine and attack.on_update is not None:  # a Byzantine client sends what it likes, DP or not
                with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are its to send; rank 0 checks
                    attack.on_update(rows[i], self.attack_params, attacks.client_rng(cfg.seed, round_index, cid))
            elif not byzantine and cfg.privacy.mode == "client_local":
                p = cfg.privacy
                clipped_fraction = float(privatise_update(rows[i], p.max_grad_norm, p.noise_multiplier, cfg.seed,
                                                          round_index, cid))
            records[i, RECORD["clipped_fraction"]] = clipped_fraction
            if cfg.transport == "reduce":  # rank 0 never sees the row: its check travels with the record
                norm, finite = norms_and_finite(rows[i:i + 1])
                records[i, RECORD["update_norm"]], records[i, RECORD["finite"]] = norm[0], finite[0]
            records[i, RECORD["num_samples"]] = result.num_samples
            records[i, RECORD["train_loss"]] = result.train_loss
            records[i, RECORD["steps"]] = result.steps
            records[i, RECORD["train_s"]] = time.perf_counter() - start


class LocalClients:
    """One process: rank 0 trains the whole cohort itself. ``host_for(run)``: the host of
    another federation (membership audit's shadows)."""

    def __init__(self, host: ClientHost, size: int, reduce: bool, host_for=None):
        self.host, self.size, self.reduce, self.host_for = host, size, reduce, host_for

    def switch(self, run: int) -> None:
        """The rounds that follow train the clients of federation ``run`` (0: the audited run)."""
        self.host = self.host_for(run)

    def collect(self, round_index: int, cohort: np.ndarray, weights: np.ndarray,
                slot_rows: np.ndarray | None = None) -> Updates:
        k = len(cohort)
        rows = np.empty((k, self.size), dtype=np.float32)
        records = np.zeros((k, len(RECORD_FIELDS)))
        self.host.train_slots(round_index, cohort, weights, rows, records,
                              devices.cohort_draws(self.host.cfg, round_index, cohort), slot_rows)
        if self.reduce:
            return Updates(cohort, records, slot_counts(k, 1), total=weighted_total(rows, records))
        return Updates(cohort, records, slot_counts(k, 1), rows=rows)

    def stop(self, status: int) -> None:
        pass


class RemoteClients:
    """Rank 0 of an MPI job: the workers train the cohort (see :func:`serve`)."""

    def __init__(self, messages: RoundMessages):
        self.messages = messages

    def collect(self, round_index: int, cohort: np.ndarray, weights: np.ndarray,
                slot_rows: np.ndarray | None = None) -> Updates:
        self.messages.send_round(round_index, cohort, weights, slot_rows)
        rows, total, records, counts = self.messages.receive_updates(len(cohort))
        return Updates(cohort, records, counts, rows=rows, total=total)

    def switch(self, run: int) -> None:
        """The rounds that follow train the clients of federation ``run`` (0: the audited run)."""
        self.messages.send_run(run)

    def stop(self, status: int) -> None:
        self.messages.send_stop(status)


class ShardedClients:
    """``transport: sharded`` on rank 0: the workers (or this process, ``local``) train
    the cohort, every rank receives its blocks' columns of the rows, and they are
    checked there (:class:`fedmpi.sharded.round.ColumnCheck`); the norms reach the
    records and ``Updates.shard`` holds rank 0's columns. ``rows`` stays None."""

    def __init__(self, cfg: Config, context: ShardContext, local: LocalClients | None = None):
        self.context, self.local, self.check = context, local, ColumnCheck(cfg)

    def collect(self, round_index: int, cohort: np.ndarray, weights: np.ndarray,
                slot_rows: np.ndarray | None = None) -> Updates:
        """(No per-slot rows: config validation refuses algorithms with client state here.)"""
        messages = self.context.messages
        if self.local is not None:
            trained = self.local.collect(round_index, cohort, weights)
            rows, records, counts = trained.rows, trained.records, trained.counts
        else:
            messages.send_round(round_index, cohort, weights)
            rows, records, counts = messages.receive_columns(len(cohort))
        columns = self.context.columns(rows)
        norms, finite = self.check(columns, cohort, round_index)
        records[:, RECORD["update_norm"]], records[:, RECORD["finite"]] = norms, finite
        return Updates(cohort, records, counts, shard=columns)

    def stop(self, status: int) -> None:
        if self.local is None:
            self.context.messages.send_stop(status)


def serve(messages: RoundMessages, host: ClientHost, sharded: ShardedWorker | None = None, host_for=None) -> int:
    """A worker: train this rank's slots of every round until STOP; return the exit
    status rank 0 sent with it. ``sharded``: the worker's part of a sharded round
    (and of the state transfers rank 0 calls in). ``host_for(run)``: the host of
    another federation, for RUN orders (membership audit's shadows)."""
    rank, size = messages.comm.rank, messages.size
    rows = np.empty((0, size), dtype=np.float32)
    while True:
        order = messages.receive_round()
        if order.stop:
            return order.status
        if order.command == CMD_RUN:
            host = host_for(order.run)
            continue
        if order.command != CMD_ROUND:
            sharded.command(order)
            continue
        start = sum(order.counts[:rank])
        mine = order.cohort[start:start + order.counts[rank]]
        if rows.shape[0] != len(mine):
            rows = np.empty((len(mine), size), dtype=np.float32)
        records = np.zeros((len(mine), len(RECORD_FIELDS)))
        draws = devices.cohort_draws(host.cfg, order.round_index, order.cohort)
        host.train_slots(order.round_index, mine, order.weights, rows, records,
                         draws[start:start + len(mine)] if draws is not None else None, order.corrections)
        if sharded is None:
            messages.send_updates(rows, records, order.counts)
        else:
            sharded.round(order, rows, records)
