"""The only module that touches MPI.

Model tensors travel as contiguous numpy buffers through the uppercase mpi4py
calls (``Bcast``, ``Gatherv``) with a derived "row" datatype, so a cohort of
rows is counted in rows, not elements (no 2**31 element limit). Only small
control records (error strings) are pickled.

:class:`SingleProcess` is the same interface for one process without mpi4py,
so ``python -m fedmpi.run`` works on a machine that has no MPI at all.

Waiting is done asleep where waits are long (the next round's header, the
workers finishing their training): a non-blocking call polled with growing
sleeps, so idle ranks leave the cores to the ranks that train. The bulk
transfers then run blocking, with every rank ready. (What this is worth, as
measured, is in docs/performance.md.)

Before MPI is initialised, :func:`prepare_environment` reads the launcher's
variables and, when this node runs more ranks than it has cores, enables
MPICH's heavy yield (``MPIR_CVAR_ENABLE_HEAVY_YIELD=1``) so that ranks waiting
in a collective sleep instead of spinning on the cores the others train on.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .system import usable_cores

_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE")


def _env_int(names: Sequence[str]) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            match = re.match(r"\d+", value)  # SLURM writes e.g. "8(x2)"
            if match:
                return int(match.group())
    return None


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 when not launched by MPI)."""
    return _env_int(_RANK_VARS) or 0


def launcher_size() -> int:
    return _env_int(_SIZE_VARS) or 1


def launcher_local_size() -> int:
    """Ranks the launcher started on this node (all of them when it does not say)."""
    return _env_int(_LOCAL_SIZE_VARS) or launcher_size()


def prepare_environment() -> bool:
    """Enable MPICH heavy yield when ranks on this node outnumber its cores.

    Must run before mpi4py initialises MPI. A value the user set is left alone.
    Returns whether heavy yield is on.
    """
    var = "MPIR_CVAR_ENABLE_HEAVY_YIELD"
    if var not in os.environ:
        if launcher_local_size() > usable_cores():
            os.environ[var] = "1"
    return os.environ.get(var) == "1"


class SingleProcess:
    """One process, no MPI: every collective is a local copy."""

    rank = 0
    size = 1

    def bcast(self, array: np.ndarray) -> None:
        pass

    def bcast_idle(self, array: np.ndarray) -> None:
        pass

    def barrier_idle(self) -> None:
        pass

    def gather_rows(self, local: np.ndarray, out: np.ndarray | None, counts: Sequence[int]) -> None:
        if out is not None and out is not local and len(local):
            out[: len(local)] = local

    def allgather(self, obj: Any) -> list:
        return [obj]

    def reduce_sum(self, local: np.ndarray, out: np.ndarray | None) -> None:
        if out is not None and out is not local:
            out[...] = local

    def local_rank(self) -> int:
        return 0

    # ---- transport: sharded (one rank holds every block)

    def share(self, value: Any) -> Any:
        return value

    def isend(self, array: np.ndarray, dest: int, tag: int):
        raise RuntimeError("one process sends to no other rank")  # the block tree never sends with one rank

    recv = isend

    def waitall(self, requests: list) -> None:
        pass

    def exchange_columns(self, local: np.ndarray, counts: Sequence[int], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        return local

    def gather_columns(self, local: np.ndarray, out: np.ndarray | None, spans: Sequence[tuple[int, int]]) -> None:
        if out is not None and not np.shares_memory(local, out):
            out[spans[0][0]:spans[0][1]] = local

    def scatter_columns(self, full: np.ndarray | None, local: np.ndarray, spans: Sequence[tuple[int, int]]) -> None:
        if full is not None and not np.shares_memory(local, full):
            local[...] = full[spans[0][0]:spans[0][1]]

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        os._exit(code)

    def close(self) -> None:
        pass

    # ---- groups of an in-job sweep (fedmpi.sweep --in-job): one process is one group of one

    def split(self, color: int) -> SingleProcess:
        return self

    def for_run(self, local_rank: int) -> SingleProcess:
        return self

    def notify_failure(self) -> None:
        pass

    def release(self, clean: bool) -> bool:
        return True


class MPIComm:
    """A communicator (COMM_WORLD unless ``comm`` is given) through mpi4py's buffer interface."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._row_types: dict = {}
        self._layouts: dict = {}

    def _row_type(self, dtype: np.dtype, width: int):
        key = (np.dtype(dtype).str, width)
        if key not in self._row_types:
            base = self.MPI._typedict[np.dtype(dtype).char]
            self._row_types[key] = base.Create_contiguous(width).Commit()
        return self._row_types[key]

    def bcast(self, array: np.ndarray) -> None:
        """Broadcast a contiguous array from rank 0 into every rank's array, in place."""
        self.comm.Bcast(array, root=0)

    def _wait_idle(self, request) -> None:
        """Wait for ``request`` sleeping between polls (20 us, doubling to 0.5 ms): a rank
        that waits gives its core to the ranks that compute, instead of spinning in MPI."""
        delay = 2e-5
        while not request.Test():
            time.sleep(delay)
            delay = min(2 * delay, 5e-4)

    def bcast_idle(self, array: np.ndarray) -> None:
        """Bcast of a small array for which the receivers may wait long (the next round's
        header): non-blocking, waited for while sleeping."""
        self._wait_idle(self.comm.Ibcast(array, root=0))

    def barrier_idle(self) -> None:
        """A barrier waited for while sleeping: the ranks meet here once every worker has
        finished training, so the bulk transfer that follows runs at full speed."""
        self._wait_idle(self.comm.Ibarrier())

    def gather_rows(self, local: np.ndarray, out: np.ndarray | None, counts: Sequence[int]) -> None:
        """Gatherv the (k_r, d) row blocks of every rank into ``out`` (K, d) on rank 0,
        rank by rank; ``counts[r]`` is rank r's number of rows."""
        width = local.shape[1] if local.ndim == 2 else out.shape[1]
        row = self._row_type(local.dtype, width)
        key = tuple(counts)
        layout = self._layouts.get(key)
        if layout is None:  # reused every round with the same cohort split
            displs = [0]
            for c in key[:-1]:
                displs.append(displs[-1] + c)
            layout = self._layouts[key] = (list(key), displs)
        recv = [out, layout, row] if self.rank == 0 else None
        self.comm.Gatherv([local, len(local), row], recv, root=0)

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def reduce_sum(self, local: np.ndarray, out: np.ndarray | None) -> None:
        """Element-wise sum of every rank's ``local`` into ``out`` on rank 0 (MPI Reduce)."""
        self.comm.Reduce(local, out if self.rank == 0 else None, op=self.MPI.SUM, root=0)

    # ---- transport: sharded

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank: a small control record (a decision), pickled."""
        return self.comm.bcast(value, root=0)

    def isend(self, array: np.ndarray, dest: int, tag: int):
        """Non-blocking send of a contiguous float64 array (a partial of the block tree)."""
        return self.comm.Isend(array, dest=dest, tag=tag)

    def recv(self, array: np.ndarray, source: int, tag: int) -> None:
        self.comm.Recv(array, source=source, tag=tag)

    def waitall(self, requests: list) -> None:
        if requests:
            self.MPI.Request.Waitall(requests)

    def exchange_columns(self, local: np.ndarray, counts: Sequence[int], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """Every rank's rows (counts[r], d) float32 in, this rank's columns of all of them
        out: (sum(counts), width), rows in rank order, i.e. cohort order (one Alltoallw;
        what goes to rank q is a strided vector type over the rows, so nothing is packed)."""
        d = local.shape[1]
        lo, hi = spans[self.rank]
        width = hi - lo
        out = np.empty((sum(counts), width), dtype=np.float32)
        base = self.MPI.FLOAT
        send_types, send_counts, send_displs, vectors = [], [], [], []
        for q_lo, q_hi in spans:
            if len(local) and q_hi > q_lo:
                vector = base.Create_vector(len(local), q_hi - q_lo, d).Commit()
                vectors.append(vector)
                send_types.append(vector)
                send_counts.append(1)
                send_displs.append(q_lo * 4)
            else:
                send_types.append(base)
                send_counts.append(0)
                send_displs.append(0)
        row = self._row_type(np.float32, width) if width else base
        recv_counts = [c if width else 0 for c in counts]
        recv_displs = [sum(counts[:s]) * width * 4 for s in range(len(counts))]
        try:
            self._alltoallw([local, send_counts, send_displs, send_types], [out, recv_counts, recv_displs, [row] * len(counts)])
        finally:
            for vector in vectors:
                vector.Free()
        return out

    def _column_layout(self, spans: Sequence[tuple[int, int]]) -> tuple[list, list]:
        return [hi - lo for lo, hi in spans], [lo for lo, _ in spans]

    def gather_columns(self, local: np.ndarray, out: np.ndarray | None, spans: Sequence[tuple[int, int]]) -> None:
        """Each rank's columns (its ``spans`` entry) of a (d,) vector into ``out`` on rank 0,
        where ``local`` is already ``out``'s own span (gathered in place)."""
        counts, displs = self._column_layout(spans)
        if self.rank == 0:
            self._gatherv(self.MPI.IN_PLACE, [out, counts, displs, self.MPI._typedict[out.dtype.char]])
        else:
            self._gatherv(local, None)

    def scatter_columns(self, full: np.ndarray | None, local: np.ndarray, spans: Sequence[tuple[int, int]]) -> None:
        """Rank 0's (d,) vector ``full``, each rank's span of it into its ``local`` (rank 0's
        own span copied locally)."""
        counts, displs = self._column_layout(spans)
        if self.rank == 0:
            lo, hi = spans[0]
            local[...] = full[lo:hi]
            self._scatterv([full, counts, displs, self.MPI._typedict[full.dtype.char]], self.MPI.IN_PLACE)
        else:
            self._scatterv(None, local)

    # the blocking calls under the column transfers (RunComm makes them non-blocking)

    def _alltoallw(self, send: list, recv: list) -> None:
        self.comm.Alltoallw(send, recv)

    def _gatherv(self, send, recv) -> None:
        self.comm.Gatherv(send, recv, root=0)

    def _scatterv(self, send, recv) -> None:
        self.comm.Scatterv(send, recv, root=0)

    def local_rank(self) -> int:
        """This rank's index among the ranks on its node (shared-memory split)."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def close(self) -> None:
        for t in self._row_types.values():
            t.Free()
        self._row_types.clear()

    def split(self, color: int) -> MPIComm:
        """The ranks that pass the same ``color`` as one communicator, in rank order
        (collective over this communicator)."""
        return MPIComm(self.comm.Split(color, self.rank))

    def for_run(self, local_rank: int) -> RunComm:
        """A private communicator for one run of these ranks (collective over them);
        ``local_rank``: this rank's index on its node in the whole job (picks its GPU)."""
        return RunComm(self.comm.Dup(), local_rank)


class PeerFailed(RuntimeError):
    """Another rank of this run raised: the run is abandoned on every rank."""


class RunComm(MPIComm):
    """One run of an in-job sweep group (``python -m fedmpi.sweep --in-job``): the same
    interface over a private duplicate of the group's communicator, made so that a rank
    that raises cannot leave its peers waiting in a collective.

    A rank that fails sends every peer a failure notice (:meth:`notify_failure`); each
    rank keeps a receive for it posted, and every wait of a collective also tests it
    and raises :class:`PeerFailed`. So every collective is non-blocking and waited for
    by polling: asleep where waits are long, yielding the core where they are short.
    The sum of ``transport: reduce`` stays a blocking ``Reduce`` (the algorithm, and so
    the floating-point order, of a stand-alone run), entered only once every rank has
    met at a barrier that watches for the notice. A communicator left with requests
    that will never complete (after a failure) is abandoned, not freed. A collective
    added to :class:`MPIComm` needs its watching version here (inherited as it is,
    it works, but a failed peer would leave this rank waiting in it)."""

    NOTICE_TAG = 7001

    def __init__(self, comm, local_rank: int):
        super().__init__(comm)
        self._local_rank = local_rank
        self._notice_buf = np.zeros(1, dtype=np.int64)
        self._notice = self.comm.Irecv(self._notice_buf, source=self.MPI.ANY_SOURCE, tag=self.NOTICE_TAG)
        self._abandoned: list = []
        self.failed_rank: int | None = None

    def _check(self) -> None:
        if self.failed_rank is None and self._notice.Test():
            self.failed_rank = int(self._notice_buf[0])
        if self.failed_rank is not None:
            raise PeerFailed(f"rank {self.failed_rank} of this run failed")

    def _wait(self, request, idle: bool) -> None:
        delay = 2e-5 if idle else 0.0
        while not request.Test():
            try:
                self._check()
            except PeerFailed:
                self._abandoned.append(request)  # it holds its buffers: they must outlive it
                raise
            time.sleep(delay)
            if idle:
                delay = min(2 * delay, 5e-4)

    def bcast(self, array: np.ndarray) -> None:
        self._wait(self.comm.Ibcast(array, root=0), idle=False)

    def bcast_idle(self, array: np.ndarray) -> None:
        self._wait(self.comm.Ibcast(array, root=0), idle=True)

    def barrier_idle(self) -> None:
        self._wait(self.comm.Ibarrier(), idle=True)

    def gather_rows(self, local: np.ndarray, out: np.ndarray | None, counts: Sequence[int]) -> None:
        width = local.shape[1] if local.ndim == 2 else out.shape[1]
        row = self._row_type(local.dtype, width)
        displs = [0]
        for c in counts[:-1]:
            displs.append(displs[-1] + c)
        recv = [out, (list(counts), displs), row] if self.rank == 0 else None
        self._wait(self.comm.Igatherv([local, len(local), row], recv, root=0), idle=False)

    def allgather(self, obj: Any) -> list:
        self.barrier_idle()
        return self.comm.allgather(obj)

    def reduce_sum(self, local: np.ndarray, out: np.ndarray | None) -> None:
        self.barrier_idle()
        super().reduce_sum(local, out)

    def local_rank(self) -> int:
        return self._local_rank

    # transport: sharded: the same calls, waited for while watching for a failure notice

    def share(self, value: Any) -> Any:
        self.barrier_idle()
        return super().share(value)

    def recv(self, array: np.ndarray, source: int, tag: int) -> None:
        self._wait(self.comm.Irecv(array, source=source, tag=tag), idle=False)

    def waitall(self, requests: list) -> None:
        for request in requests:
            self._wait(request, idle=False)

    def _alltoallw(self, send: list, recv: list) -> None:
        self._wait(self.comm.Ialltoallw(send, recv), idle=False)

    def _gatherv(self, send, recv) -> None:
        self._wait(self.comm.Igatherv(send, recv, root=0), idle=False)

    def _scatterv(self, send, recv) -> None:
        self._wait(self.comm.Iscatterv(send, recv, root=0), idle=False)

    def notify_failure(self) -> None:
        """This rank failed: tell every peer (they raise PeerFailed in their next wait)."""
        mine = np.array([self.rank], dtype=np.int64)
        self._abandoned += [self.comm.Isend(mine, dest=r, tag=self.NOTICE_TAG) for r in range(self.size) if r != self.rank]

    def release(self, clean: bool) -> bool:
        """After the run: free the communicator when every rank finished it cleanly
        (``clean``: the group agreed on it) or it has no other rank; else abandon it
        and return False: the caller keeps this object (and so the buffers of its
        unfinished requests) referenced."""
        if self.failed_rank is None:  # no notice came (or it came unseen): withdraw the receive
            self._notice.Cancel()
            self._notice.Wait()
        if not clean and self.size > 1:
            return False
        self.close()
        self.comm.Free()
        return True


def connect() -> SingleProcess | MPIComm:
    """Initialise MPI if it is available (or required); else a single process."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if launcher_size() > 1:
            raise RuntimeError("launched as one of several MPI ranks, but mpi4py is not installed: "
                               "pip install 'fedmpi[mpi]' (or build mpi4py against your MPI)") from None
        return SingleProcess()
    return MPIComm()
