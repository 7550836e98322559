"""Column blocks, their owners, and the fixed order in which per-block partial
results are combined. Pure: no MPI (the distributed combination takes a group
object with point-to-point calls, :class:`fedmpi.comm.MPIComm` or a stand-in).

Blocks. ``d`` coordinates in B = max(1, d // block) blocks of ``block`` columns;
the last block also takes the remainder (d - B * block < block columns), so no
block is narrower than ``block`` unless d itself is. (A one-column block would
be summed along the rows in a different order by numpy than the same column
inside a wider array; blocks of two or more columns are not.)

Owners. Rank r owns blocks [ceil(r B / P), ceil((r + 1) B / P)): contiguous
runs, rank 0 first and never empty, ranks beyond B own none.

The tree. Per-block partial results (a Gram matrix, squared norms...) are added
in a fixed binary tree over the block indices: node [lo, hi) is the sum of
[lo, mid) and [mid, hi), mid = lo + the largest power of two below hi - lo. It
depends on B only. Each rank evaluates the nodes whose first block it owns;
the right child of a node whose blocks span two ranks travels from the rank
owning its first block to the rank owning the parent's (one message per tree
level at most, each way). The root ends on rank 0. Since the tree and every
leaf are independent of the layout, so is every bit of the sum.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class BlockLayout:
    """``size`` coordinates in blocks of ``block`` columns over ``ranks`` ranks."""

    size: int
    block: int
    ranks: int

    @cached_property
    def blocks(self) -> int:
        return max(1, self.size // self.block)

    @cached_property
    def _firsts(self) -> tuple[int, ...]:
        b, p = self.blocks, self.ranks
        return tuple((r * b + p - 1) // p for r in range(p + 1))

    def blocks_of(self, rank: int) -> range:
        """The blocks ``rank`` owns (contiguous)."""
        return range(self._firsts[rank], self._firsts[rank + 1])

    def owner(self, block: int) -> int:
        return bisect.bisect_right(self._firsts, block) - 1

    def columns(self, block: int) -> tuple[int, int]:
        """[start, stop) of ``block``'s coordinates."""
        start = block * self.block
        return start, (self.size if block == self.blocks - 1 else start + self.block)

    def span(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the coordinates ``rank`` owns (empty for a rank without blocks)."""
        owned = self.blocks_of(rank)
        if not owned:
            start = self.size if owned.start >= self.blocks else self.columns(owned.start)[0]
            return start, start
        return self.columns(owned.start)[0], self.columns(owned.stop - 1)[1]

    @cached_property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.span(r) for r in range(self.ranks))

    def width(self, rank: int) -> int:
        start, stop = self.span(rank)
        return stop - start


def split(lo: int, hi: int) -> int:
    """Where the tree cuts node [lo, hi) (hi - lo >= 2): lo + the largest power of two below hi - lo."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


def tree_sum(leaf: Callable[[int], np.ndarray], lo: int, hi: int) -> np.ndarray:
    """The tree's sum of ``leaf(b)`` over blocks [lo, hi), in one process (the reference
    the distributed :func:`reduce_blocks` equals bit for bit). ``leaf`` returns a new array."""
    if hi - lo == 1:
        return leaf(lo)
    mid = split(lo, hi)
    total = tree_sum(leaf, lo, mid)
    total += tree_sum(leaf, mid, hi)
    return total


def _outgoing(layout: BlockLayout, rank: int) -> list[tuple[int, int, int, int]]:
    """(lo, hi, depth, destination) of the nodes ``rank`` sends: right children whose first
    block it owns while their parent's first block belongs to a lower rank. They lie on
    the path from the root to the boundary before ``rank``'s first block, one per depth
    at most; deepest first."""
    owned = layout.blocks_of(rank)
    if not owned or owned.start == 0:
        return []
    first, stop = owned.start, owned.stop
    lo, hi, depth, out = 0, layout.blocks, 0, []
    while hi - lo >= 2:
        mid = split(lo, hi)
        if first <= mid < stop:
            out.append((mid, hi, depth + 1, layout.owner(lo)))
        if mid > first:
            hi = mid
        elif mid < first:
            lo = mid
        else:
            break
        depth += 1
    return out[::-1]


def reduce_blocks(leaf: Callable[[int], np.ndarray], layout: BlockLayout, group, shape: tuple) -> np.ndarray | None:
    """The tree sum over all blocks of ``leaf(b)`` (a new float64 array of ``shape``),
    called on every rank of ``group`` with ``leaf`` evaluated only for the blocks the rank
    owns; the sum on rank 0, None elsewhere.

    ``group``: ``rank``, ``isend(array, dest, tag) -> request``, ``recv(array, source,
    tag)``, ``waitall(requests)``. A rank waits only for higher ranks, which never wait
    for lower ones, so with non-blocking sends no order of the calls can deadlock. At
    most one partial per tree level is held (depth + 2 arrays of ``shape``)."""
    rank = group.rank

    def evaluate(lo: int, hi: int, depth: int) -> np.ndarray:
        if hi - lo == 1:
            return leaf(lo)
        mid = split(lo, hi)
        total = evaluate(lo, mid, depth + 1)
        source = layout.owner(mid)
        if source == rank:
            right = evaluate(mid, hi, depth + 1)
        else:
            right = np.empty(shape)
            group.recv(right, source, depth + 1)
        total += right
        return total

    requests, sent = [], []
    for lo, hi, depth, dest in _outgoing(layout, rank):
        value = np.ascontiguousarray(evaluate(lo, hi, depth), dtype=np.float64)
        sent.append(value)  # alive until its send completes
        requests.append(group.isend(value, dest, depth))
    result = evaluate(0, layout.blocks, 0) if rank == 0 else None
    group.waitall(requests)
    return result
