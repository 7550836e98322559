"""State that clients keep between rounds, held by rank 0 and keyed by client id.

:class:`ClientStateStore` holds one float32 row of ``d`` values per client and per
named array (SCAFFOLD: ``control``, its control variate c_i), for every client
of the run, in client id order, whichever rank trains the client in a round:

- ``memory``: a numpy array (pages that no client has touched cost nothing);
- ``file``: the same rows in a sparse file (:class:`FileRows`, beside the results
  file, removed when the run ends), for state that does not fit rank 0's memory
  budget: a row is read into a fresh buffer and written back with ``pread`` /
  ``pwrite``, so the process holds only the rows of the round in hand and the
  operating system's page cache, which it can drop, holds the rest. (An
  ``np.memmap`` would count every row ever touched in rank 0's resident memory.)

The store also records the round in which each client's row last changed, so a
checkpoint writes only the rows that changed since the checkpoint slot it
overwrites was written (:meth:`fedmpi.results.ResultsWriter.checkpoint`), and
:meth:`load` reads back only the rows that were ever written.
"""

from __future__ import annotations

import os

import numpy as np

BLOCK_BYTES = 64 << 20  # rows moved per block when loading a checkpoint


class FileRows:
    """A (rows, size) float32 array in a file, indexed by a row or a slice of rows:
    reading returns a new array, assigning writes through. Rows never written read as 0."""

    def __init__(self, path: str, rows: int, size: int):
        self.path, self.shape, self.size = path, (rows, size), size
        self.nbytes = rows * size * 4
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, self.nbytes)  # sparse: no block is allocated until written

    def _span(self, key) -> tuple[int, int]:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("FileRows takes a row or a slice of consecutive rows")
            return start, max(start, stop)
        row = int(key)
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"row {row} out of range 0..{self.shape[0] - 1}")
        return row, row + 1

    def __getitem__(self, key) -> np.ndarray:
        start, stop = self._span(key)
        out = np.empty((stop - start, self.size), dtype=np.float32)
        if out.nbytes:
            got = os.preadv(self.fd, [out], start * self.size * 4)
            if got != out.nbytes:
                raise OSError(f"{self.path}: short read of rows {start}..{stop - 1}")
        return out if isinstance(key, slice) else out[0]

    def __setitem__(self, key, values) -> None:
        start, stop = self._span(key)
        data = np.ascontiguousarray(np.broadcast_to(values, (stop - start, self.size)), dtype=np.float32)
        written = os.pwrite(self.fd, data, start * self.size * 4)
        if written != data.nbytes:
            raise OSError(f"{self.path}: short write of rows {start}..{stop - 1}")

    def close(self) -> None:
        os.close(self.fd)


class ClientStateStore:
    """``arrays[name]``: (clients, size) float32, row ``cid`` is client ``cid``'s;
    ``last_round[cid]``: the round its rows last changed (-1: never)."""

    def __init__(self, names: tuple[str, ...], clients: int, size: int, path: str | None = None):
        self.path, self.size = path, size
        self.kind = "memory" if path is None else "file"
        self.arrays: dict[str, np.ndarray | FileRows] = {}
        for i, name in enumerate(names):
            if path is None:
                self.arrays[name] = np.zeros((clients, size), dtype=np.float32)
            else:
                self.arrays[name] = FileRows(f"{path}.{i}" if i else path, clients, size)
        self.last_round = np.full(clients, -1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def row(self, name: str, client_id: int) -> np.ndarray:
        """Client ``client_id``'s row, to read (a view in memory, a copy from a file)."""
        return self.arrays[name][client_id]

    def write(self, name: str, client_id: int, values: np.ndarray, round_index: int) -> None:
        self.arrays[name][client_id] = values
        self.last_round[client_id] = round_index

    def changed_since(self, round_index: int) -> np.ndarray:
        """Sorted ids of the clients whose rows changed after ``round_index`` (every
        client ever written when it is negative)."""
        return np.flatnonzero(self.last_round > max(round_index, -1))

    def blocks(self, ids: np.ndarray):
        """Slices of consecutive ids covering the sorted ``ids``, each at most about
        :data:`BLOCK_BYTES` of rows: HDF5 reads and writes slices fast, and a list of
        scattered rows (a point selection) some ten times slower."""
        step = max(1, BLOCK_BYTES // max(1, 4 * self.size))
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        for run in np.split(ids, breaks) if len(ids) else []:
            for start in range(int(run[0]), int(run[-1]) + 1, step):
                yield slice(start, min(start + step, int(run[-1]) + 1))

    def load(self, group) -> None:
        """Read the rows a checkpoint group (``checkpoint/slot<k>/clients``) holds."""
        self.last_round[:] = group["last_round"][:]
        ids = self.changed_since(-1)
        for name, array in self.arrays.items():
            for block in self.blocks(ids):
                array[block] = group[name][block]

    def close(self) -> None:
        """Drop a file store's files (the checkpoint in the results file is the durable copy)."""
        if self.path is None:
            return
        for i, name in enumerate(list(self.arrays)):
            self.arrays.pop(name).close()
            try:
                os.remove(f"{self.path}.{i}" if i else self.path)
            except FileNotFoundError:
                pass
