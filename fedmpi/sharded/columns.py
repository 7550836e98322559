"""One rank's columns of a round's rows, and the quantities that need whole rows,
combined from per-block partials in the fixed tree order.

:class:`Columns` holds, for every block a rank owns, every row's slice: an
(n, width) array whose column ranges are the rank's blocks. Its collective
calls (every rank calls them, in the same order) are :meth:`Columns.reduce`
(per-block partials summed by :func:`fedmpi.sharded.layout.reduce_blocks`, the
sum on rank 0) and :meth:`Columns.share` (rank 0's decision on every rank).

The block-combined quantities follow :mod:`fedmpi.aggregation` step by step,
with the same numerics: float64 norms and centered Gram matrices, the center
taken in the rows' own precision unless that overflows anywhere (a global
decision), and the recentring of :func:`fedmpi.aggregation.pairwise_sq_distances`
(rank 0 finds the groups from the combined matrix; each group's Gram matrix is
combined from the blocks again). Per-block kernels are the functions of
:mod:`fedmpi.aggregation` applied to one block, so a block's partial does not
depend on which rank computes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import aggregation as agg
from .layout import BlockLayout, reduce_blocks


class Columns:
    """This rank's columns of n rows: ``rows`` (n, width), its blocks' columns side by
    side in block order; ``layout`` and ``group`` (the collectives: ``rank``,
    ``share``, ``isend``, ``recv``, ``waitall``)."""

    def __init__(self, rows: np.ndarray, layout: BlockLayout, group):
        self.rows, self.layout, self.group = rows, layout, group
        start = layout.span(group.rank)[0]
        self.blocks = [(b, slice(lo - start, hi - start)) for b in layout.blocks_of(group.rank)
                       for lo, hi in [layout.columns(b)]]
        self._local = dict(self.blocks)

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def root(self) -> bool:
        return self.group.rank == 0

    def with_rows(self, rows: np.ndarray) -> Columns:
        """The same columns of other rows (e.g. after a pre-aggregation step)."""
        return Columns(rows, self.layout, self.group)

    def share(self, value):
        """Rank 0's ``value`` on every rank (others pass anything)."""
        return self.group.share(value if self.root else None)

    def reduce(self, leaf: Callable[[np.ndarray, slice], np.ndarray], shape: tuple) -> np.ndarray | None:
        """Sum over every block of ``leaf(block, local)`` (``block``: the rows' columns of
        one block; ``local``: its slice of this rank's columns), a new float64 array of
        ``shape``, in the fixed tree order; on rank 0, None elsewhere."""
        def leaf_of(b: int) -> np.ndarray:
            local = self._local[b]
            return np.asarray(leaf(self.rows[:, local], local), dtype=np.float64).reshape(shape)

        return reduce_blocks(leaf_of, self.layout, self.group, shape)

    def map(self, fn: Callable[[np.ndarray, slice], np.ndarray]) -> np.ndarray:
        """(width,) float64: ``fn(block, local)`` (a block's values) for each block, side by side."""
        out = np.empty(self.rows.shape[1])
        for _, local in self.blocks:
            out[local] = fn(self.rows[:, local], local)
        return out


def _sq_norms(block: np.ndarray, local: slice) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return sum(agg._for_blocks(block, lambda cols, b: np.einsum("ij,ij->i", b, b)))


def sq_norms(columns: Columns) -> np.ndarray | None:
    """(n,) float64 squared L2 norms of the rows, on rank 0 (NaN or inf for a row with a
    non-finite coordinate; float32 rows cannot overflow in float64)."""
    return columns.reduce(_sq_norms, (columns.n,))


def weighted_sum(columns: Columns, weights: np.ndarray) -> np.ndarray:
    """This rank's columns of sum_i weights[i] * row_i (float64)."""
    return columns.map(lambda block, local: agg.weighted_sum(block, weights))


def mean_of(columns: Columns, rows: np.ndarray) -> np.ndarray:
    """This rank's columns of the mean of ``rows`` (float64), touching only those rows."""
    w = np.full(len(rows), 1.0 / len(rows))
    return columns.map(lambda block, local: agg.weighted_sum(block[rows], w))


def sq_distances_to(columns: Columns, point: np.ndarray) -> np.ndarray | None:
    """(n,) float64 squared distances from each row to a point (this rank's columns of
    it), from the differences (no cancellation), on rank 0; NaN (a row with a NaN)
    becomes +inf, as :func:`fedmpi.aggregation.sq_distances_to`."""
    def partial(block: np.ndarray, local: slice) -> np.ndarray:
        centre = point[local]
        with np.errstate(invalid="ignore", over="ignore"):
            return sum(agg._for_blocks(block, lambda cols, b: _diff_sq(b, centre[cols])))

    sq = columns.reduce(partial, (columns.n,))
    if sq is not None:
        sq[np.isnan(sq)] = np.inf
    return sq


def finite_flags(columns: Columns) -> np.ndarray:
    """(n,) bool on every rank: whether each row's every coordinate is finite (checked
    per block, combined, shared)."""
    bad = columns.reduce(lambda block, local: (~np.isfinite(block)).any(axis=1).astype(np.float64), (columns.n,))
    return columns.share(bad == 0 if columns.root else None)


def finite_sq_distances(columns: Columns) -> np.ndarray | None:
    """:func:`fedmpi.aggregation._sq_distances_finite` (MDA's distances) on rank 0: a row
    with a non-finite coordinate is +inf away from every other row."""
    ok = finite_flags(columns)
    if ok.all():
        return pairwise_sq_distances(columns)
    n = columns.n
    good = np.flatnonzero(ok)
    sub = pairwise_sq_distances(columns.with_rows(columns.rows[good])) if len(good) else None
    if not columns.root:
        return None
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    if len(good):
        dist[np.ix_(good, good)] = sub
    return dist


def _diff_sq(block: np.ndarray, point: np.ndarray) -> np.ndarray:
    block -= point
    return np.einsum("ij,ij->i", block, block)


def center(columns: Columns, rows: np.ndarray | None = None) -> np.ndarray:
    """This rank's columns of the mean of ``rows`` (all when None) as
    :func:`fedmpi.aggregation._centered_gram` takes it: summed in the rows' own
    precision, or in float64 on every rank when that overflows on any (one decision)."""
    sub = columns.rows if rows is None else columns.rows[rows]
    if sub.dtype == np.float64:
        return agg.mean_row(sub)
    mean = agg.mean_row(sub)
    overflow = columns.reduce(lambda block, local: np.array([float((~np.isfinite(mean[local])).sum())]), (1,))
    if columns.share(bool(overflow[0]) if columns.root else None):
        mean = agg.mean_row(sub, wide=True)
    return mean


def centered_gram(columns: Columns, rows: np.ndarray | None = None, centre: np.ndarray | None = None) -> np.ndarray | None:
    """The (k, k) float64 Gram matrix of the chosen rows (all when None) after
    subtracting ``centre`` (this rank's columns; default :func:`center` of the rows),
    on rank 0: each block's partial is :func:`fedmpi.aggregation._centered_gram` of
    the block."""
    k = columns.n if rows is None else len(rows)
    if centre is None:
        centre = center(columns, rows)
    return columns.reduce(lambda block, local: agg._centered_gram(block, rows, centre[local]), (k, k))


def pairwise_sq_distances(columns: Columns, max_depth: int = 8) -> np.ndarray | None:
    """(n, n) float64 squared distances between the rows, on rank 0, recentred as
    :func:`fedmpi.aggregation.pairwise_sq_distances` (rank 0 finds the groups that lost
    digits; every rank then combines each group's own Gram matrix)."""
    n = columns.n
    dist = np.zeros((n, n)) if columns.root else None
    _fill_distances(columns, np.arange(n), dist, max_depth)
    return dist


def _fill_distances(columns: Columns, rows: np.ndarray, dist: np.ndarray | None, depth: int) -> None:
    whole = len(rows) == columns.n
    gram = centered_gram(columns, None if whole else rows)
    groups = None
    if columns.root:
        sub = agg._gram_to_sq_distances(gram)
        dist[np.ix_(rows, rows)] = sub
        groups = []
        if depth:
            diag = np.diag(gram)
            tol = agg._RECENTER_RTOL * math.sqrt(columns.layout.size) * (diag[:, None] + diag[None, :])
            suspicious = (sub < tol) & ~np.eye(len(rows), dtype=bool)
            if suspicious.any():
                groups = [rows[c] for c in agg._components(suspicious) if 2 <= len(c) < len(rows)]
    for group in columns.share(groups):
        _fill_distances(columns, group, dist, depth - 1)
