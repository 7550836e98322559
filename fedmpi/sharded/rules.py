"""Every rule and pre-aggregation step of :mod:`fedmpi.aggregation` over
:class:`~fedmpi.sharded.columns.Columns`: called on every rank, in the same
order, with the same arguments as the rule itself (``weights`` already on every
rank).

A rule returns an :class:`~fedmpi.aggregation.AggregationResult` whose
``vector`` is this rank's columns of the aggregate; ``selected``, ``scores`` and
``info`` are rank 0's (None elsewhere). A step returns a
:class:`~fedmpi.aggregation.Regrouped` whose ``rows`` are the new rows' columns
(float64) and whose ``groups`` every rank knows.

What is decided from whole rows (Krum's choice, Bulyan's selection, the
Weiszfeld weights, clipping factors, neighbours, buckets) rank 0 decides from the
block-combined quantities and shares; everything coordinate-wise runs per block
with the rule's own kernel, so a column of the aggregate is computed exactly as
:mod:`fedmpi.aggregation` computes it from that column's values. Column sums over
the blocks (norms, Gram matrices) are added in the fixed tree order, so results
do not depend on the rank count and match the one-process rules to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import aggregation as agg
from ..aggregation import AggregationResult, Regrouped
from .columns import (
    Columns,
    centered_gram,
    finite_sq_distances,
    mean_of,
    pairwise_sq_distances,
    sq_distances_to,
    sq_norms,
    weighted_sum,
)


def _decided_on_root(columns: Columns, fn: Callable[[], object]):
    """``fn()`` evaluated on rank 0 and shared with every rank; a ValueError it raises
    (a rule's refusal) is raised on every rank."""
    if columns.root:
        try:
            value = fn()
        except ValueError as exc:
            columns.share(exc)
            raise
        return columns.share(value)
    value = columns.share(None)
    if isinstance(value, ValueError):
        raise ValueError(str(value))
    return value


def _columnwise(columns: Columns, kernel: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> AggregationResult:
    """A coordinate-wise rule: ``kernel(block) -> (values, kept counts per row)`` on each
    block; the counts, summed over the blocks (exact: integers), give each row's fraction
    of kept coordinates (rank 0)."""
    counts: dict[int, np.ndarray] = {}

    def values(block: np.ndarray, local: slice) -> np.ndarray:
        vector, kept = kernel(block)
        counts[local.start] = kept
        return vector

    vector = columns.map(values)
    kept = columns.reduce(lambda block, local: counts.pop(local.start), (columns.n,))
    if not columns.root:
        return AggregationResult(vector)
    kept /= columns.layout.size
    return AggregationResult(vector, selected=np.flatnonzero(kept > 0), scores=kept)


# --------------------------------------------------------------------------- rules


def fedavg(columns: Columns, weights: np.ndarray | None = None) -> AggregationResult:
    """:func:`fedmpi.aggregation.fedavg` per block."""
    w = agg._normalised_weights(weights, columns.n)
    return AggregationResult(weighted_sum(columns, w), selected=np.flatnonzero(w > 0), scores=w)


def krum(columns: Columns, f: int) -> AggregationResult:
    """:func:`fedmpi.aggregation.krum`: block-combined distances, rank 0's choice."""
    agg.check_f("krum", columns.n, f)
    dist = pairwise_sq_distances(columns)
    scores = agg.krum_scores(dist, f) if columns.root else None
    best = _decided_on_root(columns, lambda: int(agg._rank(scores)[0]))
    return AggregationResult(columns.rows[best].astype(np.float64), selected=np.array([best]), scores=scores)


def multi_krum(columns: Columns, f: int, m: int | None = None) -> AggregationResult:
    """:func:`fedmpi.aggregation.multi_krum`: rank 0 chooses, every block averages."""
    n = columns.n
    agg.check_f("multi_krum", n, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum needs 1 <= m <= n; got m = {m}, n = {n}")
    dist = pairwise_sq_distances(columns)
    scores = agg.krum_scores(dist, f) if columns.root else None
    chosen = _decided_on_root(columns, lambda: np.sort(agg._rank(scores)[:m]))
    weights = np.zeros(n)
    weights[chosen] = 1.0 / m
    return AggregationResult(weighted_sum(columns, weights), selected=chosen, scores=scores)


def median(columns: Columns) -> AggregationResult:
    n = columns.n
    return _columnwise(columns, lambda block: agg._coordinatewise(block, (n - 1) // 2, n // 2 + 1))


def trimmed_mean(columns: Columns, f: int) -> AggregationResult:
    n = columns.n
    agg.check_f("trimmed_mean", n, f)
    return _columnwise(columns, lambda block: agg._coordinatewise(block, f, n - f))


def meamed(columns: Columns, f: int) -> AggregationResult:
    n = columns.n
    agg.check_f("meamed", n, f)
    return _columnwise(columns, lambda block: agg.closest_to_median(block, n - f))


def geometric_median(columns: Columns, weights: np.ndarray | None = None, *, smoothing: float = 1e-6,
                     tol: float = 1e-10, max_iter: int = 1000) -> AggregationResult:
    """:func:`fedmpi.aggregation.geometric_median`: rank 0 runs the Weiszfeld iterations on
    the block-combined Gram matrix; a recentring combines a new one around the iterate."""
    w = agg._normalised_weights(weights, columns.n)
    run = agg.Weiszfeld(w, columns.layout.size, smoothing, tol, max_iter) if columns.root else None
    centre = None
    while True:
        gram = centered_gram(columns, centre=centre)
        done, alpha = _decided_on_root(columns, lambda gram=gram: (run.iterate(gram), run.alpha))
        if done:
            break
        centre = weighted_sum(columns, alpha)
    outcome = run.outcome() if columns.root else {}
    return AggregationResult(weighted_sum(columns, alpha), **outcome)


def bulyan(columns: Columns, f: int) -> AggregationResult:
    """:func:`fedmpi.aggregation.bulyan`: rank 0 selects, every block averages around its median."""
    n = columns.n
    agg.check_f("bulyan", n, f)
    dist = pairwise_sq_distances(columns)
    chosen = _decided_on_root(columns, lambda: agg.bulyan_selection(dist, f))
    selected = columns.with_rows(columns.rows[chosen])
    vector = selected.map(lambda block, local: agg.closest_to_median(block, n - 4 * f)[0])
    return AggregationResult(vector, selected=chosen, scores=agg.krum_scores(dist, f) if columns.root else None)


def centered_clipping(columns: Columns, tau: float, iterations: int = 1,
                      center: np.ndarray | None = None) -> AggregationResult:
    """:func:`fedmpi.aggregation.centered_clipping` with ``center`` (this rank's columns of
    the previous aggregate): squared distances combined from the blocks, rank 0's
    clipping factors, the step per block."""
    n, width = columns.rows.shape
    v = agg.clipping_start(tau, iterations, center, width)  # this rank's columns
    factors = np.ones(n)
    for _ in range(iterations):
        sq = columns.reduce(lambda block, local, v=v: agg.sq_to_center(block, v[local]), (n,))
        factors = _decided_on_root(columns, lambda sq=sq: np.minimum(1.0, tau / np.maximum(np.sqrt(sq), np.finfo(float).tiny)))
        v = v + columns.map(lambda block, local, v=v, factors=factors: agg.clipped_step(block, v[local], factors))
    return AggregationResult(v, selected=agg._all_rows(n), scores=factors)


def mda(columns: Columns, f: int, max_subsets: int = agg.MDA_MAX_SUBSETS) -> AggregationResult:
    """:func:`fedmpi.aggregation.mda`: the exhaustive search on rank 0 over the
    block-combined distances, the mean of the chosen rows per block."""
    n = columns.n
    agg.check_f("mda", n, f)
    subsets = math.comb(n, f)
    if subsets > max_subsets:
        raise ValueError(f"mda: C(n, f) = C({n}, {f}) = {subsets} subsets of n - f = {n - f} rows to search, "
                         f"more than the bound max_subsets = {max_subsets} (MDA_MAX_SUBSETS)")
    sq = finite_sq_distances(columns)
    found = _decided_on_root(columns, lambda: agg.mda_search(sq, f))
    chosen, best_rows, best, ties = found
    info = {"diameter": math.sqrt(best), "subsets": subsets, "ties": ties}
    return AggregationResult(mean_of(columns, chosen), selected=chosen, scores=np.sqrt(best_rows) if columns.root else None,
                             info=info if columns.root else {})


def monna(columns: Columns, f: int, pivot: int | np.ndarray | None = None) -> AggregationResult:
    """:func:`fedmpi.aggregation.monna`: the pivot per block (the coordinate-wise median by
    default; a row; or this rank's columns of a vector), distances to it combined from the
    blocks, rank 0's n - f nearest rows averaged per block."""
    n, width = columns.rows.shape
    agg.check_f("monna", n, f)
    pivot_row = None
    if pivot is None:
        kind, point = "median", columns.map(lambda block, local: agg._coordinatewise(block, (n - 1) // 2, n // 2 + 1)[0])
    elif isinstance(pivot, (int, np.integer)):
        if not 0 <= pivot < n:
            raise ValueError(f"monna: pivot row must be in [0, {n}), got {pivot}")
        kind, pivot_row, point = "row", int(pivot), columns.rows[int(pivot)].astype(np.float64)
    else:
        kind, point = "vector", np.asarray(pivot, dtype=np.float64)
        if point.shape != (width,):
            raise ValueError(f"monna: pivot must be a row index or this rank's {width} columns of a vector, got shape "
                             f"{point.shape}")
    bad = columns.reduce(lambda block, local: np.array([float((~np.isfinite(point[local])).sum())]), (1,))
    if columns.share(bool(bad[0]) if columns.root else None):
        raise ValueError(f"monna: the pivot ({kind}) has non-finite coordinates")
    sq = sq_distances_to(columns, point)
    chosen = _decided_on_root(columns, lambda: np.sort(agg._rank(sq)[: n - f]))
    return AggregationResult(mean_of(columns, chosen), selected=chosen, scores=np.sqrt(sq) if columns.root else None,
                             info={"pivot": kind, "pivot_row": pivot_row})


# --------------------------------------------------------------------------- pre-aggregation


def average_groups(columns: Columns, groups: list) -> Columns:
    """The columns of :func:`fedmpi.aggregation.average_groups` (float64), block by block."""
    out = np.empty((len(groups), columns.rows.shape[1]))
    for _, local in columns.blocks:
        out[:, local] = agg.average_groups(columns.rows[:, local], groups)
    return columns.with_rows(out)


def nnm_step(columns: Columns, f: int) -> Regrouped:
    n = columns.n
    agg.check_f("nnm", n, f)
    dist = pairwise_sq_distances(columns)
    groups = _decided_on_root(columns, lambda: list(agg.nearest_rows(dist, n - f)))
    return Regrouped(average_groups(columns, groups), groups)


def bucketing_step(columns: Columns, bucket_size: int, rng: np.random.Generator) -> Regrouped:
    groups = _decided_on_root(columns, lambda: agg.bucket_assignment(columns.n, bucket_size, rng))
    position = np.empty(columns.n, dtype=np.int64)
    for b, group in enumerate(groups):
        position[group] = b
    return Regrouped(average_groups(columns, groups), groups, position)


def clip_step(columns: Columns, max_norm: float) -> Regrouped:
    """:func:`fedmpi.aggregation.clip`: norms combined from the blocks, rank 0's factors."""
    if max_norm <= 0:
        raise ValueError(f"clip needs max_norm > 0, got {max_norm}")
    sq = sq_norms(columns)
    factors = _decided_on_root(columns, lambda: agg.clip_factors(np.sqrt(sq), max_norm))
    return Regrouped(columns.with_rows(columns.rows * factors[:, None]))


def arc_step(columns: Columns, f: int) -> Regrouped:
    """:func:`fedmpi.aggregation.arc`: norms combined from the blocks, rank 0's factors."""
    agg.check_f("arc", columns.n, f)
    sq = sq_norms(columns)
    factors = _decided_on_root(columns, lambda: agg.arc_factors(np.sqrt(sq), f))
    with np.errstate(invalid="ignore"):
        return Regrouped(columns.with_rows(columns.rows * factors[:, None]))


# --------------------------------------------------------------------------- registries

# Keyed like fedmpi.aggregation.RULES and PRE_STEPS, with the same keyword arguments
# (each entry's ``reads``); config validation refuses transport: sharded for a name
# missing here.
SHARDED_RULES: dict[str, Callable[..., AggregationResult]] = {
    "fedavg": fedavg,
    "krum": krum,
    "multi_krum": multi_krum,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "meamed": meamed,
    "geometric_median": geometric_median,
    "bulyan": bulyan,
    "centered_clipping": centered_clipping,
    "mda": mda,
    "monna": monna,
}

SHARDED_STEPS: dict[str, Callable[..., Regrouped]] = {
    "nnm": nnm_step,
    "bucketing": bucketing_step,
    "clip": clip_step,
    "arc": arc_step,
}

# Omniscient attacks (fedmpi.attacks.ATTACKS entries with an ``on_server`` hook) whose
# hook treats each coordinate on its own (per-coordinate means and deviations of the
# honest rows), so that applying it to a rank's columns gives those columns exactly.
COLUMNWISE_ATTACKS = frozenset({"alie", "ipm"})


def aggregate_norm(columns: Columns, vector: np.ndarray) -> float | None:
    """The L2 norm of an aggregate from its columns, combined in the tree order (rank 0)."""
    sq = columns.with_rows(vector[None, :]).reduce(lambda block, local: np.einsum("ij,ij->i", block, block), (1,))
    return math.sqrt(float(sq[0])) if columns.root else None
