"""The contract between rank 0 and the workers: commands, per-client records,
exit codes, and the messages of one round, both halves side by side.

One round, message by message::

    rank 0                                         ranks >= 1
    header (ROUND, round, cohort size)  --Ibcast-->  waited for asleep; STOP ends the worker
    cohort client ids (int64)           --Bcast-->
    global weights (flat float32)       --Bcast-->
                                                     train my contiguous block of slots
                                                     (slot_counts), in slot order
    Ibarrier, waited for asleep         <-------->   (every worker done training)
    gather: rows (K, d) float32         <-Gatherv--  my rows, one buffer
            records (K, R) float64      <-Gatherv--  one row of RECORD_FIELDS per slot
    reduce: records                     <-Gatherv--
            sum_i n_i update_i (d,)     <-Reduce---  float64, my slots pre-summed

A STOP header carries the exit status every rank then ends with. A RUN
header (membership audit only) switches the workers to another federation:
run 0 is the audited run, runs 1..N its shadow federations
(:mod:`fedmpi.leakage_audit`); the rounds that follow train that run's clients. Which slots a
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
EXIT_FAILED = 1  # a rank raised; the job was aborted with its traceback
EXIT_BAD_INPUT = 2  # config, data, results file or budget refused before any work
EXIT_FINISHED = 3  # python -m fedmpi.sweep --args: the entry has finished, nothing to run
EXIT_CHECKPOINTED = 75  # SIGTERM / SIGUSR1: checkpoint written, continue with --resume (job scripts requeue)

CMD_STOP, CMD_ROUND, CMD_RUN = 0, 1, 2

# One float64 row per cohort slot, sent by the rank that trained it.
RECORD_FIELDS = ("num_samples", "train_loss", "steps", "train_s", "clipped_fraction", "update_norm")
RECORD = {name: i for i, name in enumerate(RECORD_FIELDS)}


def slot_counts(cohort_size: int, world_size: int) -> list[int]:
    """Rows per rank: with one process rank 0 trains everything; otherwise rank 0
    trains nothing and the workers split the cohort into near-equal contiguous blocks."""
    if world_size == 1:
        return [cohort_size]
    base, extra = divmod(cohort_size, world_size - 1)
    return [0] + [base + (1 if w < extra else 0) for w in range(world_size - 1)]


def weighted_total(rows: np.ndarray, records: np.ndarray) -> np.ndarray:
    """transport: reduce: sum_i n_i * update_i over one rank's slots, float64 (d,)."""
    if not len(rows):
        return np.zeros(rows.shape[1])
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
    run: int | None = None  # a RUN order: the federation whose clients the next rounds train


class RoundMessages:
    """The messages of a round over ``comm`` (an MPI communicator wrapper from
    :mod:`fedmpi.comm`), for a model of ``size`` parameters. ``reduce``: workers
    send the pre-summed weighted total instead of their rows."""

    def __init__(self, comm, size: int, reduce: bool):
        self.comm, self.size, self.reduce = comm, size, reduce
        self.header = np.zeros(3, dtype=np.int64)
        self.weights = np.empty(size, dtype=np.float32)  # a worker's copy of the global weights
        self.no_rows = np.empty((0, size), dtype=np.float32)
        self.no_records = np.empty((0, len(RECORD_FIELDS)))

    # ---- rank 0 -> workers

    def send_round(self, round_index: int, cohort: np.ndarray, weights: np.ndarray) -> None:
        """Rank 0: the header, the cohort and the global weights."""
        self.header[:] = (CMD_ROUND, round_index, len(cohort))
        self.comm.bcast_idle(self.header)
        self.comm.bcast(cohort)
        self.comm.bcast(weights)

    def send_stop(self, status: int) -> None:
        """Rank 0: every worker stops and exits with ``status``."""
        self.header[:] = (CMD_STOP, status, 0)
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
        if self.header[0] == CMD_RUN:
            return RoundOrder(False, run=int(self.header[1]))
        round_index, cohort_size = int(self.header[1]), int(self.header[2])
        cohort = np.empty(cohort_size, dtype=np.int64)
        self.comm.bcast(cohort)
        self.comm.bcast(self.weights)
        return RoundOrder(False, round_index=round_index, cohort=cohort, weights=self.weights,
                          counts=slot_counts(cohort_size, self.comm.size))

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
