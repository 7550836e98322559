"""The contract between rank 0 and the workers: commands, per-client records,
exit codes, and the messages of one round, both halves side by side.

One round, message by message::

    rank 0                                         ranks >= 1
    header (ROUND, round, cohort size)  --Ibcast-->  waited for asleep; STOP ends the worker
    cohort client ids (int64)           --Bcast-->
    global weights (flat float32)       --Bcast-->
    SCAFFOLD: c - c_i per slot (K, d)   --Scatterv->  my slots' rows only
                                                     train my contiguous block of slots
                                                     (slot_counts), in slot order
    Ibarrier, waited for asleep         <-------->   (every worker done training)
    gather: rows (K, d) float32         <-Gatherv--  my rows, one buffer
            records (K, R) float64      <-Gatherv--  one row of RECORD_FIELDS per slot
    reduce: records                     <-Gatherv--  with each row's norm and finite flag
            sum_i n_i update_i (d,)     <-Reduce---  float64, my finite slots pre-summed
    sharded: records                    <-Gatherv--
            my blocks' columns (K, w)   <Alltoallw>  every rank: its blocks' columns of every row
            (then every rank checks and aggregates its blocks, fedmpi.sharded.round;
            rank 0 gathers the new weights' columns; STATE / LOAD headers move the
            sharded server state for checkpoints)

Only algorithms that keep client state (SCAFFOLD) send the per-slot rows; the
state itself stays on rank 0 (:mod:`fedmpi.client_state`).

A STOP header carries the exit status every rank then ends with (the end of the
run, a checkpoint after a signal, or divergence). A RUN header (membership audit
only) switches the workers to another federation: run 0 is the audited run, runs
1..N its shadow federations (:mod:`fedmpi.leakage_audit`); the rounds that follow
train that run's clients. Which slots a
rank trains depends on the world size, but what a client computes does not
(its randomness is keyed by seed, round and client id), so the gathered (K, d)
array is the same for any number of ranks.

:class:`RoundMessages` holds both halves; :class:`fedmpi.worker.RemoteClients`
(rank 0) and :func:`fedmpi.worker.serve` (ranks >= 1) use it, and
:class:`fedmpi.worker.LocalClients` is the same interface in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aggregation import weighted_sum

# Exit status of every rank (and of python -m fedmpi.run / fedmpi.sweep / fedmpi.analyze).
EXIT_OK = 0
EXIT_FAILED = 1  # a rank raised (the job was aborted with its traceback), or user code broke its contract (one line)
EXIT_BAD_INPUT = 2  # config, data, results file or budget refused before any work
EXIT_FINISHED = 3  # python -m fedmpi.sweep --args: the entry has finished, nothing to run
EXIT_CHECKPOINTED = 75  # SIGTERM / SIGUSR1: checkpoint written, continue with --resume (job scripts requeue)
EXIT_DIVERGED = 4  # the global model (or every honest client's update) became non-finite; the run stopped after that round

CMD_STOP, CMD_ROUND = 0, 1
CMD_STATE, CMD_LOAD = 2, 3  # transport: sharded: gather / scatter one part of the server state (header[1]: the part)
CMD_RUN = 4  # membership audit: the federation (header[1]) whose clients the next rounds train

# One float64 row per cohort slot, sent by the rank that trained it. update_norm and
# finite (1.0 / 0.0) are the worker's check of the row, filled for transport: reduce only
# (rank 0 checks gathered rows itself); dropped: why the update did not arrive
# (fedmpi.devices; 0: it did).
RECORD_FIELDS = ("num_samples", "train_loss", "steps", "train_s", "clipped_fraction", "update_norm", "finite", "dropped")
RECORD = {name: i for i, name in enumerate(RECORD_FIELDS)}


def slot_counts(cohort_size: int, world_size: int) -> list[int]:
    """Rows per rank: with one process rank 0 trains everything; otherwise rank 0
    trains nothing and the workers split the cohort into near-equal contiguous blocks."""
    if world_size == 1:
        return [cohort_size]
    base, extra = divmod(cohort_size, world_size - 1)
    return [0] + [base + (1 if w < extra else 0) for w in range(world_size - 1)]


def weighted_total(rows: np.ndarray, records: np.ndarray) -> np.ndarray:
    """transport: reduce: sum_i n_i * update_i over one rank's slots whose row is finite
    (``records``' finite flag) and was not dropped (:mod:`fedmpi.devices`), float64
    (d,). A non-finite row never enters the sum."""
    keep = (records[:, RECORD["finite"]] > 0) & (records[:, RECORD["dropped"]] == 0)
    if not keep.any():
        return np.zeros(rows.shape[1])
    if not keep.all():
        rows, records = rows[keep], records[keep]
    return weighted_sum(rows, records[:, RECORD["num_samples"]])


@dataclass
class RoundOrder:
    """What a worker receives: a round to train, or the status to stop with."""

    stop: bool
    status: int = EXIT_OK
    round_index: int = -1
    cohort: np.ndarray | None = None
    weights: np.ndarray | None = None
    counts: list | None = None
    command: int = CMD_ROUND  # CMD_STATE / CMD_LOAD (transport: sharded), with ``part``
    part: int = 0
    corrections: np.ndarray | None = None  # this rank's per-slot rows (SCAFFOLD), or None
    run: int | None = None  # a RUN order: the federation whose clients the next rounds train


class RoundMessages:
    """The messages of a round over ``comm`` (an MPI communicator wrapper from
    :mod:`fedmpi.comm`), for a model of ``size`` parameters. ``reduce``: workers
    send the pre-summed weighted total instead of their rows. ``layout`` (a
    :class:`fedmpi.sharded.layout.BlockLayout`, ``transport: sharded``): the rows
    end as column blocks on every rank. ``per_slot``: rank 0 sends each slot a row
    of ``size`` float32 values with the round (SCAFFOLD)."""

    def __init__(self, comm, size: int, reduce: bool, layout=None, per_slot: bool = False):
        self.comm, self.size, self.reduce, self.layout, self.per_slot = comm, size, reduce, layout, per_slot
        self.slot_rows = np.empty((0, size), dtype=np.float32)  # a worker's received per-slot rows
        self.header = np.zeros(3, dtype=np.int64)
        self.weights = np.empty(size, dtype=np.float32)  # a worker's copy of the global weights
        self.no_rows = np.empty((0, size), dtype=np.float32)
        self.no_records = np.empty((0, len(RECORD_FIELDS)))

    # ---- rank 0 -> workers

    def send_round(self, round_index: int, cohort: np.ndarray, weights: np.ndarray,
                   slot_rows: np.ndarray | None = None) -> None:
        """Rank 0: the header, the cohort, the global weights (and each slot's row)."""
        self.header[:] = (CMD_ROUND, round_index, len(cohort))
        self.comm.bcast_idle(self.header)
        self.comm.bcast(cohort)
        self.comm.bcast(weights)
        if self.per_slot:
            self.comm.scatter_rows(slot_rows, self.no_rows, slot_counts(len(cohort), self.comm.size))

    def send_stop(self, status: int) -> None:
        """Rank 0: every worker stops and exits with ``status``."""
        self.header[:] = (CMD_STOP, status, 0)
        self.comm.bcast_idle(self.header)

    def send_command(self, command: int, part: int) -> None:
        """Rank 0: a STATE or LOAD header (transport: sharded)."""
        self.header[:] = (command, part, 0)
        self.comm.bcast_idle(self.header)

    def send_run(self, run: int) -> None:
        """Rank 0: the rounds that follow train the clients of federation ``run``."""
        self.header[:] = (CMD_RUN, run, 0)
        self.comm.bcast_idle(self.header)

    def receive_round(self) -> RoundOrder:
        """A worker: the next order (asleep until it comes)."""
        self.comm.bcast_idle(self.header)
        if self.header[0] == CMD_STOP:
            return RoundOrder(stop=True, status=int(self.header[1]))
        if self.header[0] in (CMD_STATE, CMD_LOAD):
            return RoundOrder(False, command=int(self.header[0]), part=int(self.header[1]))
        if self.header[0] == CMD_RUN:
            return RoundOrder(False, command=CMD_RUN, run=int(self.header[1]))
        round_index, cohort_size = int(self.header[1]), int(self.header[2])
        cohort = np.empty(cohort_size, dtype=np.int64)
        self.comm.bcast(cohort)
        self.comm.bcast(self.weights)
        counts = slot_counts(cohort_size, self.comm.size)
        corrections = None
        if self.per_slot:
            mine = counts[self.comm.rank]
            if self.slot_rows.shape[0] != mine:
                self.slot_rows = np.empty((mine, self.size), dtype=np.float32)
            self.comm.scatter_rows(None, self.slot_rows, counts)
            corrections = self.slot_rows
        return RoundOrder(False, round_index=round_index, cohort=cohort, weights=self.weights, counts=counts,
                          corrections=corrections)

    # ---- workers -> rank 0

    def send_updates(self, rows: np.ndarray, records: np.ndarray, counts: list) -> None:
        """A worker: its slots' rows (or their weighted total) and records."""
        self.comm.barrier_idle()
        if self.reduce:
            self.comm.gather_rows(records, None, counts)
            self.comm.reduce_sum(weighted_total(rows, records), None)
        else:
            self.comm.gather_rows(rows, None, counts)
            self.comm.gather_rows(records, None, counts)

    def receive_updates(self, cohort_size: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, list]:
        """Rank 0: (rows (K, d) or None, weighted total (d,) or None, records (K, R), slots per rank)."""
        counts = slot_counts(cohort_size, self.comm.size)
        records = np.zeros((cohort_size, len(RECORD_FIELDS)))
        self.comm.barrier_idle()
        if self.reduce:
            total = np.zeros(self.size)
            self.comm.gather_rows(self.no_records, records, counts)
            self.comm.reduce_sum(np.zeros(self.size), total)
            return None, total, records, counts
        rows = np.empty((cohort_size, self.size), dtype=np.float32)
        self.comm.gather_rows(self.no_rows, rows, counts)
        self.comm.gather_rows(self.no_records, records, counts)
        return rows, None, records, counts

    # ---- transport: sharded, both sides

    def send_columns(self, rows: np.ndarray, records: np.ndarray, counts: list) -> np.ndarray:
        """A worker: its slots' records to rank 0; its rows' columns to their blocks'
        owners; returns this rank's columns of every row (K, w)."""
        self.comm.barrier_idle()
        self.comm.gather_rows(records, None, counts)
        return self.comm.exchange_columns(rows, counts, self.layout.spans)

    def receive_columns(self, cohort_size: int) -> tuple[np.ndarray, np.ndarray, list]:
        """Rank 0: (its columns of every row (K, w), records (K, R), slots per rank)."""
        counts = slot_counts(cohort_size, self.comm.size)
        records = np.zeros((cohort_size, len(RECORD_FIELDS)))
        self.comm.barrier_idle()
        self.comm.gather_rows(self.no_records, records, counts)
        return self.comm.exchange_columns(self.no_rows, counts, self.layout.spans), records, counts
