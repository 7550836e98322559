"""Aggregation rules: pure functions of an (n, d) array of client updates.

Each rule takes ``updates`` (n rows, one per client, in cohort order), never
modifies it, and returns an :class:`AggregationResult`: the (d,) float64
aggregate, the rows it used (``selected``) and, where the rule scores rows,
``scores``. No MPI, no torch, no hidden state: stateful rules take their state
as an argument and the caller keeps it.

Rules
- :func:`fedavg`: weighted mean (McMahan et al. 2017).
- :func:`krum`, :func:`multi_krum`: Blanchard et al. 2017.
- :func:`median`, :func:`trimmed_mean`: coordinate-wise (Yin et al. 2018).
- :func:`meamed`: mean around the coordinate-wise median (Xie et al. 2018).
- :func:`geometric_median`: smoothed Weiszfeld, RFA (Pillutla et al. 2022).
- :func:`bulyan`: El Mhamdi et al. 2018.
- :func:`centered_clipping`: Karimireddy et al. 2021.
- :func:`mda`: minimum diameter averaging (El Mhamdi et al. 2021).
- :func:`monna`: MoNNA's nearest-neighbour averaging (Farhadkhani et al. 2023).

Pre-aggregation (rows in, rows out): :func:`nnm` (Allouah et al. 2023),
:func:`bucketing` (Karimireddy et al. 2022), :func:`clip`, :func:`arc` (adaptive
robust clipping, Allouah et al. 2024).

Every row a run aggregates has passed :func:`norms_and_finite`: a row with a
non-finite coordinate never reaches a rule (:mod:`fedmpi.rounds`).

:data:`RULES` and :data:`PRE_STEPS` register each rule and step with what the
run needs to know about it (its paper, the config keys it reads, what it
requires of n and f, the state it keeps, whether it needs every row). Config
validation, the round, the memory estimate and the docs checks read them; a
new rule is one function plus one entry.

Numerics. Norms and distances are float64. Pairwise squared distances come from
one Gram-matrix product of the rows after subtracting the mean row, computed in
float64 over column blocks that stay in cache. Centering matters: the
uncentered float32 Gram trick loses most of its digits on near-identical
clients. Where an attacker's 1e30-scale row drags the mean far from a tight
group of rows, the distances inside that group are recomputed around the
group's own mean (see :func:`pairwise_sq_distances`), so they stay exact too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .system import usable_cores

# Columns per block when float32 rows are processed in float64: the float64
# copy of one block stays in cache.
_BLOCK_BYTES = 1 << 21
# Below this many elements, thread start-up costs more than it saves.
_THREADED_ELEMENTS = 1 << 22
# A Gram-derived distance below this fraction of (|c_i|^2 + |c_j|^2), scaled by
# sqrt(d), has lost too many digits to cancellation and is recomputed.
_RECENTER_RTOL = 1e-9
# Scores closer than this (relative) are ties, broken by the lowest row index.
_TIE_RTOL = 1e-12


@dataclass
class AggregationResult:
    """``vector``: the (d,) float64 aggregate. ``selected``: sorted indices of the
    rows the aggregate used. ``scores``: one float per row where the rule scores
    rows (Krum scores, kept fractions, weights...), else None. ``info``: extras
    such as iteration counts."""

    vector: np.ndarray
    selected: np.ndarray | None = None
    scores: np.ndarray | None = None
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _as_updates(updates: np.ndarray) -> np.ndarray:
    updates = np.asarray(updates)
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) array, got shape {updates.shape}")
    if not np.issubdtype(updates.dtype, np.floating):
        updates = updates.astype(np.float64)
    return updates


def _for_blocks(updates: np.ndarray, fn) -> list:
    """``fn(cols, block)`` for every column block of ``updates``, ``block`` being a
    float64 copy (n, width) that stays in cache; returns the results in block order.

    Runs of blocks go to several threads (BLAS single-threaded inside). The block
    width depends only on n, so whatever the thread count each block, and each sum
    over blocks taken in block order, is computed the same way."""
    n, d = updates.shape
    width = max(256, _BLOCK_BYTES // (8 * n))
    threads = _worker_threads() if n * d >= _THREADED_ELEMENTS else 1
    blocks = -(-d // width)
    span = width * max(1, -(-blocks // (4 * threads)))  # about 4 runs per thread; results do not depend on it

    def run(first: int) -> list:
        buf = np.empty((n, min(width, d)))
        results = []
        for start in range(first, min(d, first + span), width):
            block = updates[:, start:start + width]
            copy = buf[:, :block.shape[1]]
            copy[...] = block
            results.append(fn(slice(start, start + block.shape[1]), copy))
        return results

    return [r for part in _map_blocks(run, list(range(0, d, span)), threads) for r in part]


def _normalised_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"weights must have one entry per row ({n}), got shape {w.shape}")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return w / total


def _all_rows(n: int) -> np.ndarray:
    return np.arange(n)


def weighted_sum(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i weights[i] * updates[i], accumulated in float64, one pass over ``updates``."""
    updates = _as_updates(updates)
    weights = np.asarray(weights, dtype=np.float64)
    out = np.empty(updates.shape[1])

    def block_sum(cols, block):
        out[cols] = weights @ block

    _for_blocks(updates, block_sum)
    return out


def row_norms(updates: np.ndarray) -> np.ndarray:
    """L2 norm of each row, accumulated in float64 (1e30-scale rows do not overflow)."""
    return norms_and_finite(updates)[0]


def norms_and_finite(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norms, finite): each row's L2 norm, accumulated in float64, and whether every
    coordinate of the row is finite, in one pass over the rows by column block.

    Every update a run receives goes through this check (rank 0 for gathered rows,
    the workers before they pre-sum for ``transport: reduce``). A row holding a NaN
    has norm NaN, one holding an infinity (and no NaN) norm inf. For float32 (or
    narrower) rows the float64 sum of squares is finite exactly when every
    coordinate is: |x| <= 3.4e38 gives x^2 <= 1.2e77, far below float64's overflow,
    so the finite test costs nothing beyond the norm. Wider rows, whose finite
    values can overflow when squared, are tested coordinate by coordinate.

    >>> norms_and_finite(np.array([[3.0, 4.0], [np.inf, 0.0], [np.nan, 1.0]], dtype=np.float32))
    (array([ 5., inf, nan]), array([ True, False, False]))
    """
    updates = _as_updates(updates)
    narrow = updates.dtype.itemsize <= 4

    def block_stats(cols, block):
        with np.errstate(over="ignore", invalid="ignore"):
            sq = np.einsum("ij,ij->i", block, block)
        return sq, None if narrow else np.isfinite(block).all(axis=1)

    sq = np.zeros(updates.shape[0])
    finite = np.ones(updates.shape[0], dtype=bool)
    for part, ok in _for_blocks(updates, block_stats):
        sq += part
        if ok is not None:
            finite &= ok
    if narrow:
        finite = np.isfinite(sq)
    return np.sqrt(sq), finite


def _worker_threads() -> int:
    """Threads for block-parallel work: the usable cores, capped by OMP_NUM_THREADS
    or OPENBLAS_NUM_THREADS when set; 1 without threadpoolctl (needed to keep
    BLAS itself single-threaded inside each worker)."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return 1
    cores = usable_cores()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            cores = min(cores, int(value))
    return max(1, cores)


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, built once (building it scans them)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _map_blocks(fn, starts: list, threads: int):
    """``fn`` over column starts, results in order whatever ``threads`` is."""
    if threads <= 1 or len(starts) < 2:
        return map(fn, starts)
    with _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(min(threads, len(starts))) as pool:
        return list(pool.map(fn, starts))


def _centered_gram(updates: np.ndarray, rows: np.ndarray | None = None, center: np.ndarray | None = None) -> np.ndarray:
    """Gram matrix of the chosen rows after subtracting ``center`` (default: their
    mean row), in float64.

    The mean row is taken once, summed in the rows' own precision: any center
    gives the same distances, one near the rows keeps their digits. Then column
    block by block, each block's float64 copy staying in cache: copy, subtract
    the center, symmetric rank-k update (syrk). Runs of blocks go to several threads; their (k, k) parts are
    summed in a fixed order, so the result does not depend on the thread count.
    """
    sub = updates if rows is None else updates[rows]
    k = sub.shape[0]
    if center is None:
        center = mean_row(sub)
        if not np.isfinite(center).all():  # float32 rows near the top of their range overflowed the sum
            center = mean_row(sub, wide=True)

    def block_gram(cols, block):
        block -= center[cols]
        return block @ block.T

    gram = np.zeros((k, k))
    for part in _for_blocks(sub, block_gram):
        gram += part
    return gram


def mean_row(rows: np.ndarray, wide: bool = False) -> np.ndarray:
    """The mean row, float64, summed row by row in the rows' own precision (in float64
    when ``wide``); column by column, so any column block of the rows gives the same
    values for its columns."""
    k = rows.shape[0]
    if wide:
        return rows.sum(axis=0, dtype=np.float64) / k
    with np.errstate(over="ignore"):
        return rows.sum(axis=0, dtype=rows.dtype).astype(np.float64) / k


def _gram_to_sq_distances(gram: np.ndarray) -> np.ndarray:
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return (dist + dist.T) / 2.0


def pairwise_sq_distances(updates: np.ndarray, max_depth: int = 8) -> np.ndarray:
    """(n, n) float64 squared Euclidean distances between rows.

    One centered Gram product gives them all. A pair whose distance is tiny
    compared with the rows' squared distances from the center has lost digits
    to cancellation; such pairs form groups (connected components), and each
    group smaller than the whole is recomputed from a Gram product centered on
    its own mean, recursively. This keeps, e.g., honest clients exact next to a
    1e30-scale attacker, and makes identical rows exactly 0 apart.
    """
    updates = _as_updates(updates)
    n = updates.shape[0]
    dist = np.zeros((n, n))
    _fill_distances(updates, np.arange(n), dist, max_depth)
    return dist


def _fill_distances(updates: np.ndarray, rows: np.ndarray, dist: np.ndarray, depth: int) -> None:
    gram = _centered_gram(updates, None if len(rows) == len(updates) else rows)
    sub = _gram_to_sq_distances(gram)
    dist[np.ix_(rows, rows)] = sub
    if depth == 0:
        return
    diag = np.diag(gram)
    tol = _RECENTER_RTOL * math.sqrt(updates.shape[1]) * (diag[:, None] + diag[None, :])
    suspicious = (sub < tol) & ~np.eye(len(rows), dtype=bool)
    if suspicious.any():
        for component in _components(suspicious):
            if 2 <= len(component) < len(rows):
                _fill_distances(updates, rows[component], dist, depth - 1)


def _components(adjacency: np.ndarray) -> list[np.ndarray]:
    """Connected components of an undirected boolean adjacency matrix."""
    n = len(adjacency)
    label = -np.ones(n, dtype=np.int64)
    current = 0
    for start in range(n):
        if label[start] >= 0:
            continue
        stack = [start]
        label[start] = current
        while stack:
            node = stack.pop()
            for nxt in np.flatnonzero(adjacency[node] & (label < 0)):
                label[nxt] = current
                stack.append(nxt)
        current += 1
    return [np.flatnonzero(label == c) for c in range(current)]


def _rank(scores: np.ndarray) -> np.ndarray:
    """Row indices by increasing score; scores within _TIE_RTOL are ties, lowest index first."""
    order = np.argsort(scores, kind="stable")
    key = scores.astype(np.float64).copy()
    sorted_scores = key[order]
    group_min = sorted_scores[0]
    for pos in range(1, len(order)):
        value = sorted_scores[pos]
        if value - group_min <= _TIE_RTOL * max(abs(group_min), abs(value)) or value == group_min:
            key[order[pos]] = group_min
        else:
            group_min = value
    return np.lexsort((np.arange(len(key)), key))


# --------------------------------------------------------------------------- requirements


def check_f(name: str, n: int, f: int) -> None:
    """Raise ValueError when the rule or pre-aggregation step ``name`` cannot
    tolerate f Byzantine rows out of n (its registry entry states what it needs)."""
    if not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"{name}: f must be a non-negative integer, got {f!r}")
    entry = RULES.get(name) or PRE_STEPS.get(name)
    if entry is not None and entry.min_rows is not None and n < entry.min_rows(f):
        raise ValueError(f"{name} needs {entry.requirement}; got n = {n}, f = {f}")


def unmet_requirement(aggregator: Any, n: int, f: int, rule: Rule | None = None,
                      steps: list | None = None) -> str | None:
    """Why the pre-aggregation steps and then the rule of ``aggregator`` (the
    ``aggregator`` config section: ``name``, ``pre``, ``m``...) cannot run on n rows
    of which f may be Byzantine; None when they can. The registry entries say what each
    needs (``rule``, ``steps``: the entries, given for user code; default: the
    built-in ones by name); config validation (n: the cohort size) and the round (n:
    the finite rows it received) both ask here."""
    steps = steps if steps is not None else [PRE_STEPS[step.name] for step in aggregator.pre]
    for step, entry in zip(aggregator.pre, steps):
        if entry.min_rows is not None and n < entry.min_rows(f):
            return f"{step.name} needs {entry.requirement} (rows reaching it: {n})"
        n = entry.rows_after(n, step)
    entry = rule if rule is not None else RULES[aggregator.name]
    if entry.min_rows is not None and n < entry.min_rows(f):
        return (f"{aggregator.name} needs {entry.requirement or 'more rows'}; got n = {n}, f = {f} "
                "(n: rows per round reaching the aggregator)")
    return entry.limit(n, f, aggregator) if entry.limit is not None else None


# --------------------------------------------------------------------------- rules


def fedavg(updates: np.ndarray, weights: np.ndarray | None = None) -> AggregationResult:
    """Federated averaging (McMahan et al. 2017): the mean of the rows weighted by
    ``weights`` (client sample counts; uniform when None).

    >>> fedavg(np.array([[0.0, 2.0], [4.0, 6.0]]), weights=[1, 3]).vector
    array([3., 5.])
    """
    updates = _as_updates(updates)
    w = _normalised_weights(weights, updates.shape[0])
    return AggregationResult(weighted_sum(updates, w), selected=np.flatnonzero(w > 0), scores=w)


def krum_scores(sq_dist: np.ndarray, f: int) -> np.ndarray:
    """score(i) = sum of squared distances from row i to its n - f - 2 nearest other rows."""
    n = len(sq_dist)
    k = max(0, n - f - 2)
    others = sq_dist + np.diag(np.full(n, np.inf))
    if k == 0:
        return np.zeros(n)
    nearest = np.sort(others, axis=1)[:, :k]
    return nearest.sum(axis=1)


def krum(updates: np.ndarray, f: int) -> AggregationResult:
    """Krum (Blanchard et al. 2017): the row with the smallest score, where
    score(i) is the sum of squared distances to its n - f - 2 nearest other rows.

    Needs n >= 2f + 3; ties go to the lowest index. This follows the paper's
    n - f - 2 neighbours (some libraries use n - f - 1).

    >>> krum(np.array([[0.0], [0.1], [0.2], [0.3], [9.0]]), f=1).selected
    array([1])
    """
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("krum", n, f)
    scores = krum_scores(pairwise_sq_distances(updates), f)
    best = int(_rank(scores)[0])
    return AggregationResult(updates[best].astype(np.float64), selected=np.array([best]), scores=scores)


def _multi_krum_limit(n: int, m: int | None) -> str | None:
    return None if m is None or m <= n else f"multi_krum averages m = {m} rows; got n = {n}"


def multi_krum(updates: np.ndarray, f: int, m: int | None = None) -> AggregationResult:
    """Multi-Krum (Blanchard et al. 2017): the mean of the m rows with the best
    Krum scores (default m = n - f); ties by lowest index. Needs n >= 2f + 3."""
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("multi_krum", n, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum needs 1 <= m <= n; got m = {m}, n = {n}")
    scores = krum_scores(pairwise_sq_distances(updates), f)
    chosen = np.sort(_rank(scores)[:m])
    weights = np.zeros(n)
    weights[chosen] = 1.0 / m
    return AggregationResult(weighted_sum(updates, weights), selected=chosen, scores=scores)


def _coordinatewise(updates: np.ndarray, keep_lo: int, keep_hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate, sort the n values and average positions keep_lo..keep_hi-1.
    Also return, per row, the number of coordinates where its value was kept."""
    n, d = updates.shape
    out = np.empty(d)

    def block_stats(cols, block):
        order = np.argsort(block, axis=0, kind="stable")
        out[cols] = np.take_along_axis(block, order[keep_lo:keep_hi], axis=0).mean(axis=0)
        return np.bincount(order[keep_lo:keep_hi].ravel(), minlength=n)

    kept = np.zeros(n)
    for part in _for_blocks(updates, block_stats):
        kept += part
    return out, kept


def median(updates: np.ndarray) -> AggregationResult:
    """Coordinate-wise median (Yin et al. 2018); for even n the mean of the two
    middle values. ``scores``: fraction of coordinates where the row is a middle value."""
    updates = _as_updates(updates)
    n = updates.shape[0]
    lo, hi = (n - 1) // 2, n // 2 + 1
    vector, kept = _coordinatewise(updates, lo, hi)
    return AggregationResult(vector, selected=np.flatnonzero(kept > 0), scores=kept / updates.shape[1])


def trimmed_mean(updates: np.ndarray, f: int) -> AggregationResult:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f lowest and f
    highest values of each coordinate, average the rest. Needs 2f < n.
    ``scores``: fraction of coordinates where the row's value was kept."""
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("trimmed_mean", n, f)
    vector, kept = _coordinatewise(updates, f, n - f)
    return AggregationResult(vector, selected=np.flatnonzero(kept > 0), scores=kept / updates.shape[1])


def meamed(updates: np.ndarray, f: int) -> AggregationResult:
    """Mean around median (Xie, Koyejo and Gupta 2018, "Generalized Byzantine-tolerant
    SGD"): per coordinate, the mean of the n - f values closest to that coordinate's
    median (the mean of the two middle values for even n). Needs 2f < n.

    Ties in the distance to the median go to the lowest row index. ``scores``: the
    fraction of coordinates where the row's value was among those averaged.

    >>> meamed(np.array([[0.0], [1.0], [2.0], [3.0], [100.0]]), f=1).vector
    array([1.5])
    """
    updates = _as_updates(updates)
    n, d = updates.shape
    check_f("meamed", n, f)
    vector, kept = closest_to_median(updates, n - f)
    kept /= d
    return AggregationResult(vector, selected=np.flatnonzero(kept > 0), scores=kept)


def closest_to_median(updates: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate, the mean of the ``keep`` values closest to the coordinate's median
    (ties to the lowest row), in float64; and per row, the number of coordinates where
    its value was among them. Column by column: a column block gives its columns' values."""
    n, d = updates.shape
    out = np.empty(d)

    def block_mean(cols, block):
        order = np.argsort(np.abs(block - np.median(block, axis=0)), axis=0, kind="stable")[:keep]
        out[cols] = np.take_along_axis(block, order, axis=0).mean(axis=0)
        return np.bincount(order.ravel(), minlength=n)

    kept = np.zeros(n)
    for part in _for_blocks(updates, block_mean):
        kept += part
    return out, kept


def geometric_median(updates: np.ndarray, weights: np.ndarray | None = None, *, smoothing: float = 1e-6,
                     tol: float = 1e-10, max_iter: int = 1000) -> AggregationResult:
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

    v <- sum_i b_i x_i / sum_i b_i with b_i = w_i / max(smoothing, |v - x_i|),
    from the weighted mean, until a step moves v by at most ``tol`` times the
    median distance from v to the rows (a scale that outliers do not inflate,
    unlike the objective sum_i w_i |v - x_i|), at most ``max_iter`` iterations.

    The iterate is kept as a convex combination of the rows, v = sum_i a_i x_i,
    so each step costs O(n^2) on a float64 Gram matrix of the rows centered at
    some point c: |v - x_j|^2 = a^T G a - 2 (G a)_j + G_jj. When the distances
    that matter are tiny next to the rows' distances from c (a 1e30 outlier
    pulls the mean away), the Gram matrix is rebuilt around the current v and
    the iterations go on from there, so honest distances keep their digits.
    ``scores``: the final normalised b_i (small = down-weighted). ``info``:
    iterations, whether ``tol`` was reached, the objective, the re-centerings.
    """
    updates = _as_updates(updates)
    n, d = updates.shape
    w = _normalised_weights(weights, n)
    run = Weiszfeld(w, d, smoothing, tol, max_iter)
    center = None
    while not run.iterate(_centered_gram(updates, center=center)):
        center = weighted_sum(updates, run.alpha)
    return AggregationResult(weighted_sum(updates, run.alpha), **run.outcome())


class Weiszfeld:
    """The smoothed Weiszfeld iterations of :func:`geometric_median` on the iterate's
    weights ``alpha`` over the rows, given Gram matrices of the rows centered at some
    point; the caller computes each Gram matrix (over the whole rows, or combined from
    column blocks) and the new center, the weighted sum of the rows by ``alpha``."""

    def __init__(self, w: np.ndarray, d: int, smoothing: float, tol: float, max_iter: int):
        self.w, self.d, self.smoothing, self.tol, self.max_iter = w, d, smoothing, tol, max_iter
        self.alpha = w.copy()
        self.iterations, self.converged, self.recenters = 0, False, 0
        self.dist = None

    def iterate(self, gram: np.ndarray) -> bool:
        """Iterate on ``gram``; True when done, False when the Gram matrix must be rebuilt
        around the current iterate (``alpha``) first."""
        w, smoothing = self.w, self.smoothing
        diag = np.diag(gram)

        def sq_distances(a: np.ndarray) -> np.ndarray:
            ga = gram @ a
            return np.maximum(a @ ga - 2.0 * ga + diag, 0.0)

        alpha = self.alpha
        dist = np.sqrt(sq_distances(alpha))
        self.converged = False
        while self.iterations < self.max_iter:
            self.iterations += 1
            beta = w / np.maximum(smoothing, dist)
            new_alpha = beta / beta.sum()
            step = new_alpha - alpha
            moved = math.sqrt(max(float(step @ (gram @ step)), 0.0))  # |v_new - v_old|
            alpha = new_alpha
            dist = np.sqrt(sq_distances(alpha))
            if moved <= self.tol * float(np.median(dist)):
                self.converged = True
                break
        self.alpha, self.dist = alpha, dist
        # digits left in each |v - x_j|^2 after cancelling terms of size G_jj and a^T G a
        spread = diag + float(alpha @ (gram @ alpha))
        lost = dist ** 2 < _RECENTER_RTOL * math.sqrt(self.d) * spread
        if not lost[alpha > 0].any() or self.recenters == 3 or self.iterations >= self.max_iter:
            return True
        self.recenters += 1
        return False

    def outcome(self) -> dict:
        """``selected``, ``scores`` and ``info`` of the result."""
        beta = self.w / np.maximum(self.smoothing, self.dist)
        return {"selected": np.flatnonzero(self.alpha > 0), "scores": beta / beta.sum(),
                "info": {"iterations": self.iterations, "converged": self.converged,
                         "objective": float(self.w @ self.dist), "recenters": self.recenters}}


def bulyan(updates: np.ndarray, f: int) -> AggregationResult:
    """Bulyan (El Mhamdi et al. 2018), needs n >= 4f + 3.

    1. Select theta = n - 2f rows by Krum applied repeatedly to the rows not yet
       selected (each time with n_remaining - f - 2 neighbours).
    2. Per coordinate, average the beta = theta - 2f selected values closest to
       their median.
    ``selected``: the theta rows of step 1; ``scores``: Krum scores on all n rows.
    """
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("bulyan", n, f)
    dist = pairwise_sq_distances(updates)
    chosen = bulyan_selection(dist, f)
    out = closest_to_median(updates[chosen], n - 4 * f)[0]
    return AggregationResult(out, selected=chosen, scores=krum_scores(dist, f))


def bulyan_selection(dist: np.ndarray, f: int) -> np.ndarray:
    """Bulyan's step 1 on the (n, n) squared distances: theta = n - 2f rows, each the
    Krum choice among the rows not yet selected; sorted."""
    n = len(dist)
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        sub = dist[np.ix_(remaining, remaining)]
        scores = krum_scores(sub, f)
        pick = remaining[int(_rank(scores)[0])]
        chosen.append(pick)
        remaining.remove(pick)
    return np.sort(np.array(chosen))


def centered_clipping(updates: np.ndarray, tau: float, iterations: int = 1,
                      center: np.ndarray | None = None) -> AggregationResult:
    """Centered clipping (Karimireddy et al. 2021).

    v <- v + mean_i (x_i - v) * min(1, tau / |x_i - v|), ``iterations`` times,
    from ``center`` (the previous round's aggregate, held by the caller; zeros
    when None). ``scores``: each row's clipping factor in the last iteration.
    """
    updates = _as_updates(updates)
    n, d = updates.shape
    v = clipping_start(tau, iterations, center, d)
    factors = np.ones(n)
    for _ in range(iterations):
        factors = np.minimum(1.0, tau / np.maximum(np.sqrt(sq_to_center(updates, v)), np.finfo(float).tiny))
        v = v + clipped_step(updates, v, factors)
    return AggregationResult(v, selected=_all_rows(n), scores=factors)


def clipping_start(tau: float, iterations: int, center: np.ndarray | None, d: int) -> np.ndarray:
    """Centered clipping's checks, and its starting point (float64 (d,): ``center``, or zeros)."""
    if tau <= 0:
        raise ValueError(f"centered_clipping needs tau > 0, got {tau}")
    if iterations < 1:
        raise ValueError(f"centered_clipping needs iterations >= 1, got {iterations}")
    v = np.zeros(d) if center is None else np.array(center, dtype=np.float64)
    if v.shape != (d,):
        raise ValueError(f"center must have shape ({d},), got {v.shape}")
    return v


def sq_to_center(updates: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n,) float64 |x_i - v|^2, summed by column block in order."""
    sq = np.zeros(updates.shape[0])
    for part in _for_blocks(updates, lambda cols, block: np.einsum("ij,ij->i", block - v[cols], block - v[cols])):
        sq += part
    return sq


def clipped_step(updates: np.ndarray, v: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(d,) float64 mean_i (x_i - v) * factors[i]: centered clipping's step."""
    step = np.empty(updates.shape[1])

    def block_step(cols, block):
        block -= v[cols]
        step[cols] = factors @ block / len(factors)

    _for_blocks(updates, block_step)
    return step


# --------------------------------------------------------------------------- pre-aggregation


def nnm_neighbours(updates: np.ndarray, f: int) -> np.ndarray:
    """(n, n - f) indices: for each row, its n - f nearest rows (itself included), ties by index."""
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("nnm", n, f)
    return nearest_rows(pairwise_sq_distances(updates), n - f)


def nearest_rows(dist: np.ndarray, keep: int) -> np.ndarray:
    """(n, keep) indices: for each row of the (n, n) squared distances, its ``keep``
    nearest rows (itself included), ties by index, sorted."""
    return np.stack([np.sort(_rank(dist[i])[:keep]) for i in range(len(dist))])


def average_groups(updates: np.ndarray, groups: list) -> np.ndarray:
    """Row g of the result is the mean of ``updates[groups[g]]``, in float64."""
    updates = _as_updates(updates)
    mix = np.zeros((len(groups), updates.shape[0]))
    for g, rows in enumerate(groups):
        mix[g, rows] = 1.0 / len(rows)
    out = np.empty((len(groups), updates.shape[1]))

    def mix_block(cols, block):
        out[:, cols] = mix @ block

    _for_blocks(updates, mix_block)
    return out


def nnm(updates: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour mixing (Allouah et al. 2023): each row becomes the mean of
    its n - f nearest rows (itself included). Returns a new (n, d) float64 array."""
    return average_groups(updates, list(nnm_neighbours(updates, f)))


def bucket_assignment(n: int, s: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle 0..n-1 with ``rng`` and cut into ceil(n/s) buckets of at most s rows."""
    if s < 1:
        raise ValueError(f"bucketing needs s >= 1, got {s}")
    order = rng.permutation(n)
    return [np.sort(order[i:i + s]) for i in range(0, n, s)]


def bucketing(updates: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Bucketing (Karimireddy et al. 2022): shuffle the rows, average them in
    buckets of s. Returns a new (ceil(n/s), d) float64 array."""
    updates = _as_updates(updates)
    return average_groups(updates, bucket_assignment(updates.shape[0], s, rng))


def clip_factors(norms: np.ndarray, max_norm: float) -> np.ndarray:
    """Per row, the factor min(1, max_norm / norm) that clips it to ``max_norm``."""
    return np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(float).tiny))


def clip(updates: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale every row whose L2 norm exceeds ``max_norm`` down to ``max_norm``.
    Returns a new float64 array."""
    updates = _as_updates(updates)
    if max_norm <= 0:
        raise ValueError(f"clip needs max_norm > 0, got {max_norm}")
    factors = clip_factors(row_norms(updates), max_norm)
    out = np.empty(updates.shape)

    def scale_block(cols, block):
        np.multiply(block, factors[:, None], out=out[:, cols])

    _for_blocks(updates, scale_block)
    return out


# --------------------------------------------------------------------------- MDA, MoNNA, ARC
# Minimum Diameter Averaging, MoNNA and Adaptive Robust Clipping. Same conventions as
# the rules above: (n, d) rows in, never modified, float64 distances, ties by lowest
# index, ValueError on an invalid f.

# MDA enumerates every subset of n - f rows (equivalently every set of f rows left
# out): C(n, f) of them. Measured on one shared core: about 1.5 microseconds per
# subset (C(22, 9) = 497420 subsets in 0.8 s, C(50, 4) in 0.4 s), so this bound keeps
# one call under about one second. Raise it per call through ``max_subsets``.
MDA_MAX_SUBSETS = 500_000
# Subsets scored per vectorised batch (a (batch, n) mask and a (batch, pairs) mask).
_MDA_BATCH = 1 << 13


def _mda_limit(n: int, f: int, aggregator: Any = None) -> str | None:
    """Why a run refuses MDA on n rows with f: more than MDA_MAX_SUBSETS subsets."""
    subsets = math.comb(n, f)
    if subsets <= MDA_MAX_SUBSETS:
        return None
    return (f"mda searches C(n, f) = C({n}, {f}) = {subsets} subsets, more than its bound of {MDA_MAX_SUBSETS} "
            "(about one second a round); lower aggregator.f or clients.per_round")


def _sq_distances_finite(updates: np.ndarray) -> np.ndarray:
    """:func:`pairwise_sq_distances`, except that a row with a non-finite coordinate is
    +inf away from every other row (0 from itself) instead of turning every distance
    into NaN through the shared mean row."""
    n = updates.shape[0]
    ok = norms_and_finite(updates)[1]
    if ok.all():
        return pairwise_sq_distances(updates)
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    good = np.flatnonzero(ok)
    if len(good):
        dist[np.ix_(good, good)] = pairwise_sq_distances(updates[good])
    return dist


def _combinations(n: int, k: int) -> np.ndarray:
    """All k-subsets of range(n) as a (C(n, k), k) int32 array, rows in the
    lexicographic order of ``itertools.combinations`` (built with numpy: several
    times faster than iterating the tuples)."""
    if k == 0:
        return np.zeros((1, 0), dtype=np.int32)
    combos = np.arange(n - k + 1, dtype=np.int32)[:, None]
    for pos in range(1, k):
        last = combos[:, -1]
        counts = (n - k + pos) - last  # choices for position pos after ``last``
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        following = np.repeat(last, counts) + 1 + (np.arange(int(counts.sum())) - starts)
        combos = np.concatenate([np.repeat(combos, counts, axis=0), following[:, None].astype(np.int32)], axis=1)
    return combos


def _lexicographic_first(masks: np.ndarray) -> int:
    """Index of the row of ``masks`` (k, n) whose set of True columns is lexicographically
    smallest as a sorted index tuple, all sets having the same size: at the first column
    where two such sets differ, the one containing that column comes first."""
    keys = tuple(~masks[:, j] for j in reversed(range(masks.shape[1])))
    return int(np.lexsort(keys)[0]) if keys else 0


def _mean_of(updates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean of ``updates[rows]`` in float64, touching only those rows (a zero weight
    on a non-finite row would still give NaN in :func:`weighted_sum`)."""
    w = np.full(len(rows), 1.0 / len(rows))
    out = np.empty(updates.shape[1])

    def block_mean(cols, block):
        out[cols] = w @ block[rows]

    _for_blocks(updates, block_mean)
    return out


def mda(updates: np.ndarray, f: int, max_subsets: int = MDA_MAX_SUBSETS) -> AggregationResult:
    """Minimum Diameter Averaging (El Mhamdi, Guerraoui and Rouault, "Distributed
    Momentum for Byzantine-resilient Stochastic Gradient Descent", ICLR 2021; first
    stated in El Mhamdi et al., "Genuinely Distributed Byzantine Machine Learning",
    PODC 2020): among all subsets of n - f rows, the one with the smallest diameter
    (largest pairwise Euclidean distance) is averaged.

    Choices (the paper leaves them open):

    - Requirement: 2f < n, as the paper's analysis and the authors' implementation
      (which also allows only f >= 1; here f = 0 is accepted and gives the mean).
    - Exhaustive search over the C(n, f) subsets, refused with ValueError when C(n, f)
      exceeds ``max_subsets`` (default :data:`MDA_MAX_SUBSETS`, about one second).
    - Ties: diameters are compared as squared distances; those within a relative
      1e-12 of the smallest (``_TIE_RTOL``, as :func:`krum`) are ties, and the
      lexicographically smallest index set wins (e.g. {0, 1, 3} before {0, 2, 3}),
      which is also what a strict-minimum scan in ``itertools.combinations`` order
      (the authors' code, ByzFL) returns for exact ties.
    - Distances: float64, from :func:`pairwise_sq_distances` (exact next to 1e30 rows
      and for near-identical rows). A row with a non-finite coordinate is +inf away
      from all others, so a subset containing it is never chosen while another exists
      (the authors' code drops such subsets too); with more than f such rows every
      subset has an infinite diameter and ValueError is raised.

    ``selected``: the chosen n - f rows. ``scores``: for each row, the smallest
    diameter (a distance, not squared) of an (n - f)-subset containing it, so the
    selected rows score the chosen diameter and an outlier scores high. ``info``:
    ``diameter``, ``subsets`` (C(n, f)), ``ties`` (subsets tied with the best).

    >>> mda(np.array([[0.0], [1.0], [1.5], [10.0]]), f=1).selected
    array([0, 1, 2])
    """
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("mda", n, f)
    subsets = math.comb(n, f)
    if subsets > max_subsets:
        raise ValueError(f"mda: C(n, f) = C({n}, {f}) = {subsets} subsets of n - f = {n - f} rows to search, "
                         f"more than the bound max_subsets = {max_subsets} (MDA_MAX_SUBSETS)")
    chosen, best_rows, best, ties = mda_search(_sq_distances_finite(updates), f)
    return AggregationResult(_mean_of(updates, chosen), selected=chosen, scores=np.sqrt(best_rows),
                             info={"diameter": math.sqrt(best), "subsets": subsets, "ties": ties})


def mda_search(sq: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """MDA's exhaustive search on the (n, n) squared distances (+inf for a non-finite
    row): (the chosen n - f rows, per row the smallest squared diameter of a subset
    containing it, the chosen squared diameter, the subsets tied with it)."""
    n = len(sq)
    subsets = math.comb(n, f)
    keep = n - f
    iu = np.triu_indices(n, 1)
    pair_sq = sq[iu]
    order = np.argsort(-pair_sq, kind="stable")
    # A set R of f left-out rows touches at most f(n - 1) - f(f - 1)/2 pairs, so the
    # largest pair inside the kept rows is among the first that many + 1 pairs.
    scan = min(len(order), f * (n - 1) - f * (f - 1) // 2 + 1)
    first, second, sorted_sq = iu[0][order[:scan]], iu[1][order[:scan]], pair_sq[order[:scan]]

    best = np.inf
    best_rows = np.full(n, np.inf)
    candidates: list[tuple[np.ndarray, np.ndarray]] = []  # (diameters, kept masks) near the running best
    combos = _combinations(n, f)  # the rows left out
    for done in range(0, subsets, _MDA_BATCH):
        left_out = combos[done:done + _MDA_BATCH]
        m = len(left_out)
        kept = np.ones((m, n), dtype=bool)
        if f:
            kept[np.arange(m)[:, None], left_out] = False
        if keep >= 2:
            inside = kept[:, first] & kept[:, second]
            diam = sorted_sq[inside.argmax(axis=1)]
        else:
            diam = np.zeros(m)
        np.minimum(best_rows, np.where(kept, diam[:, None], np.inf).min(axis=0), out=best_rows)
        best = min(best, float(diam.min()))
        near = (diam <= best * (1.0 + _TIE_RTOL)) | (diam == best)
        if near.any():
            candidates.append((diam[near], kept[near]))
    if not math.isfinite(best):
        raise ValueError(f"mda: more than f = {f} rows have non-finite coordinates; every subset of "
                         f"n - f = {keep} rows has an infinite diameter")
    diam = np.concatenate([c[0] for c in candidates])
    masks = np.concatenate([c[1] for c in candidates])
    tied = (diam <= best * (1.0 + _TIE_RTOL)) | (diam == best)
    chosen = np.flatnonzero(masks[tied][_lexicographic_first(masks[tied])])
    return chosen, best_rows, best, int(tied.sum())


def sq_distances_to(updates: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(n,) float64 squared distances from each row to ``point`` (d,), from the
    differences themselves (no Gram cancellation: exact up to one rounding per
    coordinate, next to 1e30 rows too). NaN (a row with a NaN) becomes +inf."""
    updates = _as_updates(updates)
    point = np.asarray(point, dtype=np.float64)
    sq = np.zeros(updates.shape[0])

    def block_sq(cols, block):
        block -= point[cols]
        return np.einsum("ij,ij->i", block, block)

    with np.errstate(invalid="ignore", over="ignore"):
        for part in _for_blocks(updates, block_sq):
            sq += part
    sq[np.isnan(sq)] = np.inf
    return sq


def monna(updates: np.ndarray, f: int, pivot: int | np.ndarray | None = None) -> AggregationResult:
    """MoNNA's nearest-neighbour averaging (Farhadkhani, Guerraoui, Gupta, Hoang,
    Pinot and Stephan, "Robust Collaborative Learning with Linear Gradient
    Overhead", ICML 2023): the mean of the n - f rows nearest to a pivot.

    In the paper each honest node is its own pivot (peer-to-peer: a node trusts its
    own vector). A federated server has no vector of its own, so ``pivot`` is:

    - an int: that row (the paper's setting, when the caller knows a trusted row);
    - a (d,) array: that vector (e.g. a server-side reference gradient or the
      previous round's aggregate);
    - None (default): the coordinate-wise :func:`median` of the rows. With 2f < n
      every coordinate of the median lies between the smallest and largest honest
      value, so the pivot cannot be dragged outside the honest coordinate ranges,
      whatever the Byzantine rows; it is deterministic and needs no extra state.
      A Krum-selected row was not chosen: Krum can select a Byzantine row (ALIE,
      Fang et al.), which would centre the neighbourhood on the attacker, and it
      needs n >= 2f + 3. The authors' code also allows the pivot to be the output
      of another rule in the server setting, which is what this default is.

    Requirement: 2f < n (then the n - f neighbours hold at least n - 2f >= 1 honest
    rows and the median default is bounded as above). Distances: float64 squared
    distances to the pivot computed from the differences (:func:`sq_distances_to`);
    a row with a non-finite coordinate is +inf away (ranked last); a non-finite
    pivot raises ValueError. Ties: distances within a relative 1e-12 are ties,
    lowest index first (:func:`_rank`).

    ``selected``: the n - f rows averaged. ``scores``: each row's distance (not
    squared) to the pivot. ``info``: ``pivot`` ("median", "row" or "vector") and
    ``pivot_row`` (the index, or None).

    >>> monna(np.array([[0.0], [1.0], [2.0], [9.0]]), f=1, pivot=0).selected
    array([0, 1, 2])
    """
    updates = _as_updates(updates)
    n, d = updates.shape
    check_f("monna", n, f)
    pivot_row = None
    if pivot is None:
        kind, point = "median", median(updates).vector
    elif isinstance(pivot, (int, np.integer)):
        if not 0 <= pivot < n:
            raise ValueError(f"monna: pivot row must be in [0, {n}), got {pivot}")
        kind, pivot_row, point = "row", int(pivot), updates[int(pivot)].astype(np.float64)
    else:
        kind, point = "vector", np.asarray(pivot, dtype=np.float64)
        if point.shape != (d,):
            raise ValueError(f"monna: pivot must be a row index or a vector of shape ({d},), got shape {point.shape}")
    if not np.isfinite(point).all():
        raise ValueError(f"monna: the pivot ({kind}) has non-finite coordinates")
    sq = sq_distances_to(updates, point)
    chosen = np.sort(_rank(sq)[: n - f])
    return AggregationResult(_mean_of(updates, chosen), selected=chosen, scores=np.sqrt(sq),
                             info={"pivot": kind, "pivot_row": pivot_row})


def arc_count(n: int, f: int) -> int:
    """k = floor(2 (f / n) (n - f)), the number of rows ARC clips, in exact integer
    arithmetic (ByzFL computes it in floating point, which can round one lower)."""
    return (2 * f * (n - f)) // n


def arc_factors(norms: np.ndarray, f: int) -> np.ndarray:
    """ARC's per-row scaling factors from the rows' norms: the k = arc_count(n, f) largest
    scaled to the (k+1)-th largest norm, the others 1."""
    n = len(norms)
    k = arc_count(n, f)
    factors = np.ones(n)
    if k:
        key = np.where(np.isnan(norms), np.inf, norms)
        order = np.lexsort((np.arange(n), -key))  # largest norm first, ties by lowest index
        threshold = float(norms[order[k]])
        top = order[:k]
        with np.errstate(invalid="ignore", divide="ignore"):
            factors[top] = np.where(norms[top] > threshold, threshold / norms[top], 1.0)
    return factors


def arc(updates: np.ndarray, f: int) -> np.ndarray:
    """Adaptive Robust Clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk and
    Stephan, "Boosting Robustness by Clipping Gradients in Distributed Learning",
    2024, arXiv:2405.14432): the k = floor(2 (f / n) (n - f)) rows of largest L2 norm
    are scaled down to the norm of the (k+1)-th largest; the others are unchanged.
    Returns a new (n, d) float64 array, like :func:`clip`.

    Choices: needs 2f < n (the paper's setting; k <= n/2 always, so the (k+1)-th
    row exists); k in exact integers (:func:`arc_count`); norms in float64
    (:func:`row_norms`, no overflow for 1e30 or float32-max rows). Ties in the norm
    order are broken by lowest index, but they cannot change the output: rows tied
    with the threshold have exactly the threshold norm and scaling them to it leaves
    them as they are. A NaN norm ranks as the largest, so a non-finite row is among
    the clipped ones when k > 0, but it stays non-finite (inf * 0 = NaN): ARC does
    not sanitise rows. A threshold of 0 (the (k+1)-th largest row is all zeros)
    zeroes the k largest rows.

    >>> arc(np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]), f=1)[0].round(12).tolist()
    [1.2, 1.6]
    """
    updates = _as_updates(updates)
    n = updates.shape[0]
    check_f("arc", n, f)
    factors = arc_factors(row_norms(updates), f)
    out = np.empty(updates.shape)

    def scale_block(cols, block):
        with np.errstate(invalid="ignore"):
            np.multiply(block, factors[:, None], out=out[:, cols])

    _for_blocks(updates, scale_block)
    return out


# --------------------------------------------------------------------------- pre-aggregation as steps


@dataclass
class Regrouped:
    """What a pre-aggregation step did to the rows: the new rows; for steps that mix
    rows, ``groups[r]`` lists the input rows averaged into new row r; ``row_of[i]``
    is the new row that stands for input row i (None: the same index)."""

    rows: np.ndarray
    groups: list | None = None
    row_of: np.ndarray | None = None


def nnm_step(updates: np.ndarray, f: int) -> Regrouped:
    groups = list(nnm_neighbours(updates, f))
    return Regrouped(average_groups(updates, groups), groups)


def bucketing_step(updates: np.ndarray, bucket_size: int, rng: np.random.Generator) -> Regrouped:
    groups = bucket_assignment(len(updates), bucket_size, rng)
    position = np.empty(len(updates), dtype=np.int64)
    for b, group in enumerate(groups):
        position[group] = b
    return Regrouped(average_groups(updates, groups), groups, position)


def clip_step(updates: np.ndarray, max_norm: float) -> Regrouped:
    return Regrouped(clip(updates, max_norm))


def arc_step(updates: np.ndarray, f: int) -> Regrouped:
    return Regrouped(arc(updates, f))


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class Rule:
    """A robust aggregation rule as the run uses it.

    ``function(rows, **kwargs)`` returns an :class:`AggregationResult`; ``reads`` names
    its keyword arguments: ``weights`` (client sample counts), ``f``, ``aggregator.*``
    keys, and the names of the state it keeps. ``min_rows(f)`` / ``requirement``: the
    rows it needs. ``init_state(d)`` / ``next_state(result)``: state kept between rounds
    (checkpointed). ``needs_rows``: False only where a pre-summed weighted total is
    enough (``transport: reduce``). ``memory(n, d, f)``: bytes it allocates beyond
    the rows, for rank 0's memory estimate. ``limit(n, f, aggregator)``: why it refuses
    n rows with f beyond ``min_rows`` (MDA's subset count, Multi-Krum's m), or None.
    """

    function: Callable[..., AggregationResult]
    paper: str
    reads: tuple[str, ...] = ()
    min_rows: Callable[[int], int] | None = None
    requirement: str = ""
    init_state: Callable[[int], dict] | None = None
    next_state: Callable[[AggregationResult], dict] | None = None
    needs_rows: bool = True
    memory: Callable[[int, int, int], int] = lambda n, d, f: 0
    limit: Callable[[int, int, Any], str | None] | None = None


@dataclass(frozen=True)
class PreStep:
    """A pre-aggregation step: ``function(rows, **kwargs)`` returns :class:`Regrouped`;
    ``reads``: ``f``, ``rng`` (keyed by seed, round and step) and ``aggregator.pre[i].*``
    keys; ``rows_after(n, step)``: rows it hands on; it allocates a float64 copy of them."""

    function: Callable[..., Regrouped]
    paper: str
    reads: tuple[str, ...] = ()
    rows_after: Callable[[int, Any], int] = lambda n, step: n
    min_rows: Callable[[int], int] | None = None
    requirement: str = ""


RULES: dict[str, Rule] = {
    "fedavg": Rule(fedavg, "McMahan et al. 2017", reads=("weights",), needs_rows=False),
    "krum": Rule(krum, "Blanchard et al. 2017", reads=("f",), min_rows=lambda f: 2 * f + 3, requirement="n >= 2f + 3"),
    "multi_krum": Rule(multi_krum, "Blanchard et al. 2017", reads=("f", "m"), min_rows=lambda f: 2 * f + 3,
                       requirement="n >= 2f + 3", limit=lambda n, f, g: _multi_krum_limit(n, g.m)),
    "median": Rule(median, "Yin et al. 2018"),
    "trimmed_mean": Rule(trimmed_mean, "Yin et al. 2018", reads=("f",), min_rows=lambda f: 2 * f + 1, requirement="2f < n"),
    "meamed": Rule(meamed, "Xie et al. 2018 (mean around median)", reads=("f",), min_rows=lambda f: 2 * f + 1,
                   requirement="2f < n"),
    "geometric_median": Rule(geometric_median, "Pillutla et al. 2022 (RFA)", reads=("weights", "smoothing", "tol", "max_iter")),
    "bulyan": Rule(bulyan, "El Mhamdi et al. 2018", reads=("f",), min_rows=lambda f: 4 * f + 3, requirement="n >= 4f + 3",
                   memory=lambda n, d, f: max(0, n - 2 * f) * d * 4),
    "centered_clipping": Rule(centered_clipping, "Karimireddy et al. 2021", reads=("tau", "iterations", "center"),
                              init_state=lambda d: {"center": np.zeros(d)},
                              next_state=lambda result: {"center": result.vector.copy()}),
    "mda": Rule(mda, "El Mhamdi et al. 2021 (minimum diameter averaging)", reads=("f",), min_rows=lambda f: 2 * f + 1,
                requirement="2f < n", limit=_mda_limit,
                memory=lambda n, d, f: min(math.comb(n, f), MDA_MAX_SUBSETS) * f * 4 + _MDA_BATCH * n * (n + 1)),
    "monna": Rule(monna, "Farhadkhani et al. 2023 (MoNNA)", reads=("f",), min_rows=lambda f: 2 * f + 1,
                  requirement="2f < n", memory=lambda n, d, f: 2 * d * 8),
}

PRE_STEPS: dict[str, PreStep] = {
    "nnm": PreStep(nnm_step, "Allouah et al. 2023", reads=("f",), min_rows=lambda f: f + 1, requirement="f < n"),
    "bucketing": PreStep(bucketing_step, "Karimireddy et al. 2022", reads=("bucket_size", "rng"),
                         rows_after=lambda n, step: math.ceil(n / step.bucket_size)),
    "clip": PreStep(clip_step, "static norm clipping", reads=("max_norm",)),
    "arc": PreStep(arc_step, "Allouah et al. 2024 (adaptive robust clipping)", reads=("f",), min_rows=lambda f: 2 * f + 1,
                   requirement="2f < n"),
}
