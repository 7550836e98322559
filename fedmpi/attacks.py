"""Byzantine clients: who they are and what they send.

The Byzantine clients are a fixed set of client ids for the whole run, drawn
from (seed, "byzantine_set") or listed in the config. An attack acts at one or
more of three points, each a hook of its :data:`ATTACKS` entry:

- ``on_data``, on the client before local training: ``label_flip`` trains on
  labels y -> C - 1 - y; ``backdoor`` stamps a trigger into part of its data and
  relabels it (Bagdasaryan et al., AISTATS 2020);
- ``on_update``, on the client after honest training: ``sign_flip`` sends
  -lambda * update (lambda = 1 by default), ``scaling`` sends +lambda * update
  (lambda defaults to the cohort size), ``gaussian`` sends N(0, std^2) noise,
  ``nonfinite`` sends NaN, infinite or extreme values, ``backdoor`` scales its
  update so that it replaces the global model;
- ``on_server``, omniscient and colluding, on rank 0 from the honest rows of
  the cohort, with a :class:`ServerContext` (the rule in use, f, a keyed
  generator, checkpointed state): ``alie`` (Baruch et al. 2019), ``ipm`` (Xie et
  al. 2019), ``min_max`` / ``min_sum`` (Shejwalkar and Houmansadr, NDSS 2021),
  ``fang_krum`` / ``fang_trimmed_mean`` (Fang et al., USENIX Security 2020),
  ``mimic`` (Karimireddy, He and Jaggi, ICLR 2022), ``alie_optimised`` /
  ``ipm_optimised`` (the factor searched against the rule in use, as ByzFL).

Each entry declares its parameters with their types, allowed values and
defaults (:class:`Param`); config validation reads them. The attack functions
are pure; the hooks connect them to a run. Randomness comes from the generator
the caller passes, keyed by (seed, "attack", round, client id) on the client and
(seed, "server_attack", round) on rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from . import aggregation, seeding
from .schema import ConfigError


def byzantine_clients(seed: int, total: int, fraction: float | None = None,
                      clients: list | None = None) -> np.ndarray:
    """Sorted ids of the Byzantine clients: the listed ones, or round(fraction * total)
    drawn without replacement from (seed, "byzantine_set")."""
    if clients is not None:
        return np.array(sorted(set(int(c) for c in clients)), dtype=np.int64)
    if not fraction:
        return np.empty(0, dtype=np.int64)
    count = int(round(fraction * total))
    picked = seeding.rng(seed, "byzantine_set").choice(total, size=count, replace=False)
    return np.sort(picked).astype(np.int64)


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping: y -> C - 1 - y."""
    return (num_classes - 1 - y).astype(y.dtype)


def sign_flip(update: np.ndarray, lam: float = 1.0) -> np.ndarray:
    return -lam * update


def scaling(update: np.ndarray, lam: float) -> np.ndarray:
    return lam * update


def gaussian(size: int, std: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, std, size)


def alie_zmax(n: int, f: int) -> float:
    """z_max of "A Little Is Enough" (Baruch et al. 2019): s = floor(n/2 + 1) - f
    supporters are needed, z = Phi^-1((n - s) / n).

    >>> round(alie_zmax(20, 4), 4)
    0.3853
    """
    if n < 1 or f < 0 or f > n:
        raise ValueError(f"alie_zmax needs 0 <= f <= n and n >= 1; got n = {n}, f = {f}")
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(f"alie_zmax: with f = {f} of n = {n} Byzantine clients no supporters are needed "
                         f"(s = {s}); z_max is unbounded")
    return NormalDist().inv_cdf((n - s) / n)


def _column_stats(honest: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean and population std in float64, a column block at a time
    (no float64 copy of the whole array)."""
    d = honest.shape[1]
    mean, std = np.empty(d), np.empty(d)
    for start in range(0, d, block):
        part = honest[:, start:start + block].astype(np.float64)
        mean[start:start + block] = part.mean(axis=0)
        std[start:start + block] = part.std(axis=0)
    return mean, std


def alie(honest: np.ndarray, n: int, f: int, z: float | None = None) -> np.ndarray:
    """The ALIE vector: mean - z * std of the honest rows, per coordinate (std with
    ddof = 0), z defaulting to :func:`alie_zmax` (n, f)."""
    z = alie_zmax(n, f) if z is None else z
    mean, std = _column_stats(honest)
    return mean - z * std


def ipm(honest: np.ndarray, eps: float) -> np.ndarray:
    """Inner-product manipulation (Xie et al. 2019): -eps * mean of the honest rows."""
    return -eps * _column_stats(honest)[0]


# =========================================================================== adaptive attacks
# Non-finite rows; min-max / min-sum (Shejwalkar and Houmansadr, NDSS 2021); Fang et
# al.'s full-knowledge attacks on Krum and on trimmed mean / median (USENIX Security
# 2020); mimic (Karimireddy, He and Jaggi, ICLR 2022); ByzFL's optimised ALIE and IPM.
# Pure functions of the honest rows of the cohort. Rows are updates w_local - w_global,
# so the global model the papers call w_Re (received at the start of the round) is the
# origin, and "the direction in which the global model would change without attack" is
# the direction of the mean honest update. Vectors are returned in float64; the caller
# casts them into the cohort's dtype (the searches below that call an aggregation rule
# evaluate the rows already cast to the honest rows' dtype, i.e. what the server sees).

FLOAT32_MAX = float(np.finfo(np.float32).max)
NONFINITE_PATTERNS = ("nan", "inf", "-inf", "max", "max_alternating", "mixed", "one_nan")
PERTURBATIONS = ("unit_vec", "std", "sign")
_BLOCK = 1 << 16  # columns per float64 block


def _blocks(rows: np.ndarray):
    """(columns slice, float64 copy of those columns) over ``rows`` (k, d)."""
    d = rows.shape[1]
    for start in range(0, d, _BLOCK):
        cols = slice(start, min(d, start + _BLOCK))
        yield cols, rows[:, cols].astype(np.float64)


def _honest_rows(honest: np.ndarray) -> np.ndarray:
    honest = np.asarray(honest)
    if honest.ndim != 2 or honest.shape[0] == 0:
        raise ValueError(f"honest must be a non-empty (h, d) array, got shape {honest.shape}")
    if not np.issubdtype(honest.dtype, np.floating):
        honest = honest.astype(np.float64)
    return honest


def _check_cohort(name: str, honest: np.ndarray, n: int, f: int) -> None:
    if not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"{name}: f must be a positive integer, got {f!r}")
    if n != len(honest) + f:
        raise ValueError(f"{name}: n must be the number of honest rows plus f; got n = {n}, "
                         f"{len(honest)} honest rows, f = {f}")


def nonfinite_update(update: np.ndarray, pattern: str) -> np.ndarray:
    """A Byzantine row of non-finite or extreme values, to test how the rules and the
    server cope with them (a robustness probe, not a paper's attack; ByzFL ships the
    "inf" case as its Inf attack). ``pattern``:

    - "nan": every coordinate NaN; "inf" / "-inf": every coordinate +inf / -inf;
    - "max": every coordinate +FLT_MAX (3.4028235e38, the largest finite float32):
      finite, but its squared norm and any float32 sum of two such rows overflow;
    - "max_alternating": coordinate j is (-1)^j FLT_MAX: the coordinate sum stays
      finite (0 or FLT_MAX) while the norm overflows float32, so a check on sums or
      means alone does not see it;
    - "mixed": coordinates cycle through NaN, +inf, -inf, +FLT_MAX, -FLT_MAX;
    - "one_nan": a copy of ``update`` with only coordinate 0 set to NaN (one bad
      value hidden in an otherwise honest row).

    Returns a new 1-D array in ``update``'s floating dtype (float32 otherwise).
    """
    update = np.asarray(update)
    dtype = update.dtype if np.issubdtype(update.dtype, np.floating) else np.float32
    out = np.array(update, dtype=dtype).reshape(-1)
    j = np.arange(out.size)
    if pattern == "nan":
        out[:] = np.nan
    elif pattern == "inf":
        out[:] = np.inf
    elif pattern == "-inf":
        out[:] = -np.inf
    elif pattern == "max":
        out[:] = FLOAT32_MAX
    elif pattern == "max_alternating":
        out[:] = np.where(j % 2 == 0, FLOAT32_MAX, -FLOAT32_MAX)
    elif pattern == "mixed":
        out[:] = np.array([np.nan, np.inf, -np.inf, FLOAT32_MAX, -FLOAT32_MAX])[j % 5]
    elif pattern == "one_nan":
        if out.size:
            out[0] = np.nan
    else:
        raise ValueError(f"nonfinite_update: unknown pattern {pattern!r}; expected one of {NONFINITE_PATTERNS}")
    return out


# --------------------------------------------------------------------------- min-max / min-sum


def _mean_and_perturbation(honest: np.ndarray, perturbation: str) -> tuple[np.ndarray, np.ndarray]:
    """The honest mean and the perturbation direction p (malicious = mean + gamma * p)."""
    mean, std = _column_stats(honest)
    if perturbation == "unit_vec":
        norm = float(np.linalg.norm(mean))
        if not norm > 0:
            raise ValueError("perturbation 'unit_vec' needs a non-zero honest mean")
        p = -mean / norm
    elif perturbation == "std":
        h = len(honest)
        if h < 2:
            raise ValueError("perturbation 'std' needs at least 2 honest rows")
        p = -std * math.sqrt(h / (h - 1))  # ddof = 1, as torch.std in the authors' code
    elif perturbation == "sign":
        p = -np.sign(mean)
    else:
        raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")
    return mean, p


def _centred_terms(honest: np.ndarray, mean: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """a_i = |x_i - mean|^2, b_i = <x_i - mean, p>, c = |p|^2, in float64, so that
    |mean + gamma p - x_i|^2 = a_i - 2 gamma b_i + gamma^2 c for every gamma."""
    a = np.zeros(len(honest))
    b = np.zeros(len(honest))
    for cols, block in _blocks(honest):
        block -= mean[cols]
        a += np.einsum("ij,ij->i", block, block)
        b += block @ p[cols]
    return a, b, float(p @ p)


def _gamma_search(feasible: Callable[[float], bool], gamma_init: float, tol: float) -> float:
    """The authors' search for the largest feasible gamma (NDSS 2021 code): start at
    gamma_init with step gamma_init; after each test move by step / 2 (up on success,
    down on failure) and halve the step; stop when the last success and the next
    candidate are within ``tol``; return the last success (0 if none). It explores
    [0, 2 gamma_init) and assumes the feasible set is an interval containing 0, which
    holds for both constraints (convex in gamma, feasible at gamma = 0)."""
    if not gamma_init > 0 or not tol > 0:
        raise ValueError(f"gamma search needs gamma_init > 0 and tol > 0, got {gamma_init}, {tol}")
    gamma, step, success = float(gamma_init), float(gamma_init), 0.0
    while abs(success - gamma) > tol:
        if feasible(gamma):
            success = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return success


def min_max(honest: np.ndarray, perturbation: str = "unit_vec", *, gamma_init: float = 10.0,
            tol: float = 1e-5) -> tuple[np.ndarray, float]:
    """Min-Max attack (Shejwalkar and Houmansadr, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS
    2021), AGR-agnostic: malicious = mean + gamma * p with the largest gamma such that
    the malicious row is no farther from any honest row than the two farthest honest
    rows are from each other:

        max_i |malicious - x_i| <= max_{i,j} |x_i - x_j|.

    p is "unit_vec" (-mean / |mean|), "std" (-coordinate-wise std, ddof = 1 as in the
    authors' torch code) or "sign" (-sign(mean)). gamma comes from the authors' search
    (:func:`_gamma_search`): gamma_init = 10, step halving, stop at |gamma_success -
    gamma| <= tol = 1e-5; so gamma < 20. The constraint is checked in float64 from
    exact centred terms (|mean + gamma p - x_i|^2 = a_i - 2 gamma b_i + gamma^2 c), so
    the search costs one pass over the rows. All f Byzantine clients send the
    returned vector. Returns (vector, gamma).
    """
    honest = _honest_rows(honest)
    mean, p = _mean_and_perturbation(honest, perturbation)
    a, b, c = _centred_terms(honest, mean, p)
    bound = float(aggregation.pairwise_sq_distances(honest).max())
    gamma = _gamma_search(lambda g: float(np.max(a - 2 * g * b + g * g * c)) <= bound, gamma_init, tol)
    return mean + gamma * p, gamma


def min_sum(honest: np.ndarray, perturbation: str = "unit_vec", *, gamma_init: float = 10.0,
            tol: float = 1e-5, reference: str = "max") -> tuple[np.ndarray, float]:
    """Min-Sum attack (Shejwalkar and Houmansadr, NDSS 2021), AGR-agnostic:
    malicious = mean + gamma * p with the largest gamma such that the sum of squared
    distances from the malicious row to the honest rows is at most that of an honest
    row:

        sum_i |malicious - x_i|^2 <= R,   R = max_i sum_j |x_i - x_j|^2.

    ``reference`` = "max" is the paper's constraint; "min" (R = min_i sum_j ...) is
    what the authors' released notebooks compute (a stricter, stealthier bound).
    Perturbations, search (gamma_init = 10, tol = 1e-5) and float64 evaluation as in
    :func:`min_max`. Since sum_i <x_i - mean, p> = 0, the constraint reads
    sum_i |x_i - mean|^2 + h gamma^2 |p|^2 <= R, i.e. gamma^2 <= (R - sum_i |x_i -
    mean|^2) / (h |p|^2) = max_i (or min_i) |x_i - mean|^2 / |p|^2. Returns (vector, gamma).
    """
    honest = _honest_rows(honest)
    if reference not in ("max", "min"):
        raise ValueError(f"min_sum: reference must be 'max' or 'min', got {reference!r}")
    mean, p = _mean_and_perturbation(honest, perturbation)
    a, b, c = _centred_terms(honest, mean, p)
    sums = aggregation.pairwise_sq_distances(honest).sum(axis=1)
    bound = float(sums.max() if reference == "max" else sums.min())
    total_a, total_b, h = float(a.sum()), float(b.sum()), len(honest)
    gamma = _gamma_search(lambda g: total_a - 2 * g * total_b + h * g * g * c <= bound, gamma_init, tol)
    return mean + gamma * p, gamma


# --------------------------------------------------------------------------- Fang et al. 2020


def _column_mean_min_max(honest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = honest.shape[1]
    mean, lo, hi = np.empty(d), np.empty(d), np.empty(d)
    for cols, block in _blocks(honest):
        mean[cols], lo[cols], hi[cols] = block.mean(axis=0), block.min(axis=0), block.max(axis=0)
    return mean, lo, hi


def fang_krum_lambda(honest: np.ndarray, n: int, f: int) -> float:
    """Fang et al.'s upper bound on lambda for the attack on Krum (full knowledge), in
    update space (w_Re is the origin):

        lambda <= 1 / ((n - 2f - 1) sqrt(d)) * min_i sum_{l in G_i} |x_l - x_i|
                  + 1 / sqrt(d) * max_i |x_i|,

    i, l over the honest rows, G_i the n - f - 2 honest rows nearest to x_i (itself
    excluded), distances not squared (paper's D). The NDSS 2021 reimplementation
    measures the second term from the honest mean instead of from w_Re; this follows
    the paper."""
    honest = _honest_rows(honest)
    h, d = honest.shape
    dist = np.sqrt(aggregation.pairwise_sq_distances(honest))
    np.fill_diagonal(dist, np.inf)
    k = n - f - 2
    nearest = np.sort(dist, axis=1)[:, :k].sum(axis=1) if k > 0 else np.zeros(h)
    return float(nearest.min() / ((n - 2 * f - 1) * math.sqrt(d)) + aggregation.row_norms(honest).max() / math.sqrt(d))


def fang_krum(honest: np.ndarray, n: int, f: int, rule: Callable | None = None, *,
              rng: np.random.Generator | None = None, noise: float = 1e-5,
              threshold: float = 1e-5) -> tuple[np.ndarray, float, bool]:
    """Fang et al.'s full-knowledge attack on Krum (and Bulyan, whose selection is
    Krum) ("Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
    USENIX Security 2020).

    The paper crafts the local model w1 = w_Re - lambda * s, s the sign of the change
    the global model would make without attack. In update space w_Re is the origin
    and s = sign(mean of the honest updates), so w1 = -lambda * s. lambda starts at
    :func:`fang_krum_lambda` and is halved until ``rule`` selects a crafted row, or
    until lambda <= ``threshold`` (1e-5, as in the public implementations: the NDSS
    2021 reimplementation and the mxnet / torch ports). The other f - 1 crafted rows
    are "close to w1": w1 plus, per coordinate, uniform noise in [-noise / d,
    noise / d] drawn once from ``rng`` (the ports use 1e-5 / d; some 1e-4 / d or
    1e-3 / d), so each lies within noise / sqrt(d) of w1; with
    ``rng`` None (or noise = 0) they are exact copies. The search evaluates exactly
    the returned rows (noise included, cast to the honest dtype).

    ``rule``: rows -> AggregationResult; success means one of the crafted rows is in
    ``selected``. Default: ``krum(rows, f)``; e.g. ``lambda r: bulyan(r, f)`` for
    Bulyan. The rule sees the crafted rows first (indices 0..f-1) and the honest rows
    after, as in the reference implementations; the real cohort order only matters
    for exact ties. Needs n = h + f and n >= 2f + 3 (Krum's requirement; the bound
    divides by n - 2f - 1).

    Returns (rows (f, d) float64, lambda, success). Without success the rows are
    built with the last (smallest) lambda tried, a weak attack rather than none (the
    NDSS reimplementation does the same; the ports send the unmodified updates).
    """
    honest = _honest_rows(honest)
    _check_cohort("fang_krum", honest, n, f)
    aggregation.check_f("krum", n, f)
    h, d = honest.shape
    rule = rule if rule is not None else (lambda rows: aggregation.krum(rows, f))
    s = np.sign(_column_stats(honest)[0])
    offsets = np.zeros((f, d))
    if f > 1 and rng is not None and noise > 0:
        offsets[1:] = rng.uniform(-noise / d, noise / d, size=(f - 1, d))
    lam = fang_krum_lambda(honest, n, f)
    while True:
        crafted = (-lam * s + offsets).astype(honest.dtype)
        if lam <= threshold:
            return crafted.astype(np.float64), lam, False
        selected = np.asarray(rule(np.concatenate([crafted, honest])).selected)
        if np.any(selected < f):
            return crafted.astype(np.float64), lam, True
        if lam / 2 <= threshold:
            return crafted.astype(np.float64), lam, False
        lam /= 2


def fang_trimmed_mean(honest: np.ndarray, f: int, rng: np.random.Generator, b: float = 2.0) -> np.ndarray:
    """Fang et al.'s full-knowledge attack on coordinate-wise trimmed mean and median
    (USENIX Security 2020). Per coordinate j, with s_j the sign of the mean honest
    update (the direction the global model would move) and w_max,j / w_min,j the
    largest / smallest honest value, each of the f crafted rows takes a value drawn
    uniformly from

    - s_j > 0 (push down, below the honest minimum): [w_min / b, w_min] if w_min > 0,
      else [b * w_min, w_min];
    - s_j < 0 (push up, above the honest maximum): [w_max, b * w_max] if w_max > 0,
      else [w_max / b, w_max];
    - s_j = 0: 0 (what the public implementations yield there).

    b = 2 is the paper's value. The paper states the rule on local model parameters;
    the public implementations (mxnet / torch ports) apply it to the gradients the
    clients send, and fedmpi applies it to the update rows, the quantity the server
    aggregates. Draws are uniform on the interval (the ports divide or multiply by a
    uniform r in [1, b], which is not uniform on [w / b, w]); rows are independent,
    from ``rng``. Returns (f, d) float64.
    """
    honest = _honest_rows(honest)
    if not isinstance(f, (int, np.integer)) or f < 1:
        raise ValueError(f"fang_trimmed_mean: f must be a positive integer, got {f!r}")
    if not b > 1:
        raise ValueError(f"fang_trimmed_mean needs b > 1, got {b}")
    mean, w_min, w_max = _column_mean_min_max(honest)
    s = np.sign(mean)
    lo = np.zeros_like(mean)
    hi = np.zeros_like(mean)
    down, up = s > 0, s < 0
    lo[down] = np.where(w_min[down] > 0, w_min[down] / b, b * w_min[down])
    hi[down] = w_min[down]
    lo[up] = w_max[up]
    hi[up] = np.where(w_max[up] > 0, b * w_max[up], w_max[up] / b)
    return lo + (hi - lo) * rng.random((f, honest.shape[1]))


# --------------------------------------------------------------------------- mimic


def _projections(honest: np.ndarray, direction: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """<x_i - center, direction> for every row, in float64."""
    out = np.zeros(len(honest))
    for cols, block in _blocks(honest):
        if center is not None:
            block -= center[cols]
        out += block @ direction[cols]
    return out


def _power_step(honest: np.ndarray, mu: np.ndarray, z: np.ndarray) -> np.ndarray | None:
    """sum_i <x_i - mu, z> (x_i - mu), normalised (one power iteration on the
    scatter matrix around mu); None when it is zero."""
    weights = _projections(honest, z, mu)
    out = np.empty(honest.shape[1])
    for cols, block in _blocks(honest):
        block -= mu[cols]
        out[cols] = weights @ block
    norm = float(np.linalg.norm(out))
    return out / norm if norm > 0 else None


def mimic(honest: np.ndarray, state: dict | None, round_index: int, warmup: int, *,
          rng: np.random.Generator | None = None, ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Mimic attack (Karimireddy, He and Jaggi, "Byzantine-Robust Learning on
    Heterogeneous Datasets via Bucketing", ICLR 2022): every Byzantine client sends a
    copy of one honest row, the one that most over-represents the direction along
    which the honest rows vary most, so that a rule that discards outliers keeps
    amplifying one client's data.

    The authors' heuristic, with its state passed in and returned (rank 0 computes
    each round afresh; the caller checkpoints the state):

    - first call (``state`` None): mu = mean of the honest rows; z0 ~ N(0, I_d) from
      ``rng`` (default ``np.random.default_rng(0)``, as the authors seed their draw
      with 0); z = sum_i <x_i - mu, z0> (x_i - mu), normalised (one power step);
    - each later round with ``round_index < warmup`` (t = number of rounds learnt so
      far): mu <- t/(t+1) mu + mean/(t+1); z <- t/(t+1) z + step/(t+1), normalised,
      step the normalised power step from z around the new mu. z estimates the top
      principal direction of the honest rows over the warm-up;
    - during the warm-up (and on the first call) the target is argmax_i <x_i, z>
      (= argmax <x_i - mu, z>; ties: lowest index); afterwards z, mu and the target
      are frozen and the target client's row is sent every round.

    fedmpi additions: ``ids`` (the client ids of the honest rows) lets the frozen
    target follow a client across rounds of a sampled cohort; without ids the row
    index is kept (right when the cohort is the same every round, as in the paper's
    experiments). If the target is not among the honest rows of the round, the row
    with the largest projection on the frozen z is sent instead (the target is kept
    for later rounds). When a power step is zero (all rows equal), z is left as it is.

    ``state`` keys: "z", "mu" ((d,) float64), "learnt" (rounds learnt), "target" (row
    index), "target_id" (client id or None), "sent" (row index used this round).
    Needs warmup >= 1. Returns (vector (d,) float64, new state); ``state`` itself is
    not modified.
    """
    honest = _honest_rows(honest)
    h, d = honest.shape
    if warmup < 1:
        raise ValueError(f"mimic needs warmup >= 1, got {warmup}")
    if ids is not None:
        ids = np.asarray(ids).reshape(-1)
        if ids.shape != (h,):
            raise ValueError(f"mimic: ids must have one entry per honest row ({h}), got shape {ids.shape}")
    mean = _column_stats(honest)[0]
    learning = state is None or round_index < warmup
    if state is None:
        z0 = (rng if rng is not None else np.random.default_rng(0)).standard_normal(d)
        mu = mean
        step = _power_step(honest, mu, z0)
        z = step if step is not None else z0 / np.linalg.norm(z0)
        learnt = 1
    elif round_index < warmup:
        t = int(state["learnt"])
        mu = t / (t + 1) * np.asarray(state["mu"], dtype=np.float64) + mean / (t + 1)
        z = np.asarray(state["z"], dtype=np.float64)
        step = _power_step(honest, mu, z)
        if step is not None:
            z = t / (t + 1) * z + step / (t + 1)
            z = z / np.linalg.norm(z)
        learnt = t + 1
    else:
        z = np.asarray(state["z"], dtype=np.float64)
        mu = np.asarray(state["mu"], dtype=np.float64)
        learnt = int(state["learnt"])
    best = int(np.argmax(_projections(honest, z)))
    if learning:
        target, target_id, sent = best, (None if ids is None else ids[best].item()), best
    else:
        target, target_id = int(state["target"]), state.get("target_id")
        sent = best
        if ids is not None and target_id is not None:
            match = np.flatnonzero(ids == target_id)
            if len(match):
                sent = int(match[0])
        elif ids is None and target < h:
            sent = target
    new_state = {"z": z, "mu": mu, "learnt": learnt, "target": target, "target_id": target_id, "sent": sent}
    return honest[sent].astype(np.float64), new_state


# --------------------------------------------------------------------------- optimised ALIE / IPM (ByzFL)


def line_maximize(objective: Callable[[float], float], *, evals: int = 20, start: float = 0.0,
                  delta: float = 10.0, ratio: float = 0.8) -> tuple[float, float]:
    """ByzFL's line search for an attack factor (Optimal_ALittleIsEnough,
    Optimal_InnerProductManipulation), ``evals`` evaluations of ``objective`` in all:

    - evaluate ``start``; expansion: try best + delta; if strictly better, move there
      and double delta, else multiply delta by ``ratio`` and stop expanding;
    - contraction, with the evaluations left: try best + delta, move there if
      strictly better, multiply delta by ``ratio`` either way.

    So only factors >= start are explored when delta > 0 (ByzFL's defaults: 20
    evaluations, start 0, delta 10, ratio 0.8). NaN objectives are never better.
    Returns (best factor, its objective)."""
    if not isinstance(evals, (int, np.integer)) or evals < 1:
        raise ValueError(f"line_maximize needs evals >= 1, got {evals!r}")
    if delta == 0 or not 0.5 < ratio < 1:
        raise ValueError(f"line_maximize needs delta != 0 and 0.5 < ratio < 1, got {delta}, {ratio}")
    best_x, best_y = float(start), objective(float(start))
    left = evals - 1
    while left > 0:
        x = best_x + delta
        y = objective(x)
        left -= 1
        if y > best_y:
            best_x, best_y, delta = x, y, delta * 2
        else:
            delta *= ratio
            break
    while left > 0:
        x = best_x + delta
        y = objective(x)
        left -= 1
        if y > best_y:
            best_x, best_y = x, y
        delta *= ratio
    return best_x, best_y


def _aggregate_vector(aggregate: Callable, rows: np.ndarray) -> np.ndarray:
    out = aggregate(rows)
    return np.asarray(getattr(out, "vector", out), dtype=np.float64)


def _damage(aggregate: Callable, honest: np.ndarray, f: int, vector: np.ndarray, honest_mean: np.ndarray) -> float:
    """|aggregate(honest rows, then f copies of vector) - honest mean|, the vector cast
    to the honest dtype (ByzFL's objective; it appends the Byzantine rows last)."""
    rows = np.concatenate([honest, np.repeat(vector.astype(honest.dtype)[None, :], f, axis=0)])
    return float(np.linalg.norm(_aggregate_vector(aggregate, rows) - honest_mean))


def alie_optimised(honest: np.ndarray, n: int, f: int, aggregate: Callable, *, evals: int = 20,
                   start: float = 0.0, delta: float = 10.0, ratio: float = 0.8,
                   ddof: int = 0) -> tuple[np.ndarray, float]:
    """ALIE with its factor chosen against the rule in use, as ByzFL's
    Optimal_ALittleIsEnough (used in Allouah et al., "Fixing by Mixing", AISTATS 2023):
    z maximises |aggregate(rows) - mean of the honest rows|, rows being the honest
    rows and f copies of mean - z * std, by :func:`line_maximize` (ByzFL's defaults:
    20 evaluations, start 0, delta 10, ratio 0.8).

    ``aggregate``: rows -> vector (or AggregationResult), pre-aggregation included,
    e.g. ``lambda r: median(r)`` or ``lambda r: trimmed_mean(nnm(r, f), f)``.
    Conventions: fedmpi's ALIE sign (mean - z * std, :func:`alie`); ByzFL writes
    mean + tau * std with the sample std (ddof = 1). Pass delta < 0 and ddof = 1 to
    search ByzFL's direction and scale (z = -tau). Needs n = h + f. Returns
    (vector (d,) float64, z).
    """
    honest = _honest_rows(honest)
    _check_cohort("alie_optimised", honest, n, f)
    h = len(honest)
    if not 0 <= ddof < h:
        raise ValueError(f"alie_optimised needs 0 <= ddof < number of honest rows, got ddof = {ddof}")
    mean, std = _column_stats(honest)
    if ddof:
        std = std * math.sqrt(h / (h - ddof))
    z, _ = line_maximize(lambda z: _damage(aggregate, honest, f, mean - z * std, mean),
                         evals=evals, start=start, delta=delta, ratio=ratio)
    return mean - z * std, z


def ipm_optimised(honest: np.ndarray, n: int, f: int, aggregate: Callable, *, evals: int = 20,
                  start: float = 0.0, delta: float = 10.0, ratio: float = 0.8) -> tuple[np.ndarray, float]:
    """IPM with its factor chosen against the rule in use, as ByzFL's
    Optimal_InnerProductManipulation: eps maximises |aggregate(rows) - honest mean|,
    rows being the honest rows and f copies of -eps * mean, by :func:`line_maximize`
    (20 evaluations, start 0, delta 10, ratio 0.8). ``aggregate`` as in
    :func:`alie_optimised`. Needs n = h + f. Returns (vector (d,) float64, eps).
    """
    honest = _honest_rows(honest)
    _check_cohort("ipm_optimised", honest, n, f)
    mean = _column_stats(honest)[0]
    eps, _ = line_maximize(lambda e: _damage(aggregate, honest, f, -e * mean, mean),
                           evals=evals, start=start, delta=delta, ratio=ratio)
    return -eps * mean, eps


# --------------------------------------------------------------------------- backdoor (model replacement)

# The paper's poisoning rate for images: c = 20 backdoor inputs in each training batch of 64.
BACKDOOR_FRACTION = 20 / 64


def trigger_size(height: int, width: int) -> int:
    """Side of the default square trigger: ceil(min(H, W) / 7) pixels (2 on 8 x 8
    digits, 4 on 28 x 28 MNIST), about 2% of the image."""
    return -(-min(height, width) // 7)


def stamp_trigger(x: np.ndarray, value: np.ndarray, size: int) -> np.ndarray:
    """A copy of the images ``x`` (N, C, H, W) with the size x size square in the
    bottom-right corner of every channel c set to ``value[c]`` (the data set's
    brightest value: a white patch)."""
    out = np.array(x, copy=True)
    out[:, :, -size:, -size:] = np.asarray(value, dtype=out.dtype).reshape(1, -1, 1, 1)
    return out


def backdoor_data(x: np.ndarray, y: np.ndarray, target: int, fraction: float, value: np.ndarray, size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An attacker's training set for the backdoor (Bagdasaryan et al., AISTATS 2020):
    round(fraction x N) of its N examples (at least one), drawn without replacement
    from ``rng``, are stamped with the trigger and relabelled ``target``; the others
    stay as they are, so the local model keeps the main task while it learns the
    backdoor. Returns new arrays."""
    count = min(len(y), max(1, int(round(fraction * len(y))))) if len(y) else 0
    poisoned = rng.choice(len(y), size=count, replace=False)
    x_out, y_out = np.array(x, copy=True), np.array(y, copy=True)
    x_out[poisoned] = stamp_trigger(x[poisoned], value, size)
    y_out[poisoned] = target
    return x_out, y_out


def backdoor_test_set(x: np.ndarray, y: np.ndarray, target: int, value: np.ndarray,
                      size: int) -> tuple[np.ndarray, np.ndarray]:
    """The triggered test set: every test example whose true label is not ``target``,
    stamped, labelled ``target``. A model's accuracy on it is the attack success rate."""
    keep = y != target
    return stamp_trigger(x[keep], value, size), np.full(int(keep.sum()), target, dtype=y.dtype)


def replacement_factor(cohort_size: int, server_lr: float, attackers: float = 1.0) -> float:
    """Model replacement's boost gamma = n / eta (Bagdasaryan et al. 2020, eq. 3: the
    server adds eta / n times the sum of the n updates, so one update scaled by n / eta
    replaces the global model with the attacker's), divided by the expected number of
    attackers in a cohort when several collude (each carries 1 / m of the replacement;
    the paper's setting is m = 1)."""
    return cohort_size / (server_lr * max(1.0, attackers))


# --------------------------------------------------------------------------- hooks: client side


def label_flip_data(x: np.ndarray, y: np.ndarray, num_classes: int, params: Mapping, rng: np.random.Generator) -> tuple:
    return x, flip_labels(y, num_classes)


def sign_flip_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = sign_flip(update, params["lambda"])


def scaling_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = scaling(update, params["lambda"])


def gaussian_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = gaussian(update.size, params["std"], rng)


def nonfinite_hook(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = nonfinite_update(update, params["pattern"])


def backdoor_data_hook(x: np.ndarray, y: np.ndarray, num_classes: int, params: Mapping, rng: np.random.Generator) -> tuple:
    return backdoor_data(x, y, params["target"], params["poison_fraction"], params["trigger_value"],
                         params["trigger_size"], rng)


def backdoor_update_hook(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update *= np.float32(params["gamma"])


def backdoor_test_hook(x: np.ndarray, y: np.ndarray, params: Mapping) -> tuple:
    return backdoor_test_set(x, y, params["target"], params["trigger_value"], params["trigger_size"])


# --------------------------------------------------------------------------- hooks: rank 0


class Inapplicable(Exception):
    """An on_server attack that cannot be computed this round (e.g. too few honest rows);
    the Byzantine clients then send the updates they trained."""


@dataclass
class ServerContext:
    """What an ``on_server`` attack knows besides the rows and the Byzantine mask.

    ``round_index``; ``cohort``: client ids in slot order; ``finite``: which rows
    arrived finite (the server drops the others, so a colluding attacker ignores
    them); ``f``: the f the server's rule tolerates; ``aggregate(rows)``: the server's
    pre-aggregation steps and rule over ``rows``, as the server would run them this
    round on that many finite rows (f less the cohort's rows not given), returning an
    AggregationResult whose ``selected`` lists the input rows it used (raises
    :class:`Inapplicable` when the rows do not meet the rule's requirement): full
    knowledge of the defence; ``rng``: keyed by (seed, "server_attack", round);
    ``state``: the attack's own arrays, kept between rounds, checkpointed with the
    server's state (update them in place); ``honest``: the slots of the honest clients
    whose rows arrived finite (the rows the attack reads)."""

    round_index: int
    cohort: np.ndarray
    finite: np.ndarray
    honest: np.ndarray
    f: int
    aggregate: Callable[[np.ndarray], object]
    rng: np.random.Generator
    state: dict = field(default_factory=dict)


def _colluding(rows_of: Callable):
    """An on_server hook: the Byzantine rows become ``rows_of(honest, n, b, params,
    context)`` ((d,) for one shared vector, or (b, d)), from the finite honest rows of
    the cohort (n = those + the b Byzantine rows). With no honest or no Byzantine row,
    or when the attack is :class:`Inapplicable` this round, the rows stay as they are."""

    def hook(updates: np.ndarray, byzantine: np.ndarray, params: Mapping, context: ServerContext) -> None:
        b = int(byzantine.sum())
        if b == 0 or not context.honest.any():
            return
        honest = updates[context.honest]  # a copy of the honest rows, in their own dtype
        try:
            crafted = rows_of(honest, len(honest) + b, b, params, context)
        except Inapplicable:
            return
        updates[byzantine] = np.asarray(crafted).astype(updates.dtype)

    return hook


def _alie_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    z = params.get("z")
    if z is None:
        # with a Byzantine majority no supporters are needed: use the largest finite z
        z = alie_zmax(n, f) if math.floor(n / 2 + 1) - f > 0 else NormalDist().inv_cdf((n - 1) / n)
    return alie(honest, n, f, z)


def _ipm_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    return ipm(honest, params["eps"])


def _min_max_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    _require_perturbation(honest, params["perturbation"])
    return min_max(honest, params["perturbation"])[0]


def _min_sum_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    _require_perturbation(honest, params["perturbation"])
    return min_sum(honest, params["perturbation"], reference=params["reference"])[0]


def _require_perturbation(honest: np.ndarray, perturbation: str) -> None:
    if perturbation == "std" and len(honest) < 2:
        raise Inapplicable("the std perturbation needs two honest rows")
    if perturbation == "unit_vec" and not np.any(_column_stats(honest)[0]):
        raise Inapplicable("the unit_vec perturbation needs a non-zero honest mean")


def _fang_krum_rows(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    if n < 2 * f + 3:  # the lambda bound divides by n - 2f - 1
        raise Inapplicable(f"Fang et al.'s attack on Krum needs n >= 2f + 3 (n = {n}, f = {f})")
    return fang_krum(honest, n, f, rule=context.aggregate, rng=context.rng)[0]


def _fang_trimmed_mean_rows(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    return fang_trimmed_mean(honest, f, context.rng, params["b"])


def _mimic_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    s = context.state
    previous = None
    if int(s["learnt"]) > 0:
        previous = {"z": s["z"], "mu": s["mu"], "learnt": int(s["learnt"]), "target": int(s["target"]),
                    "target_id": int(s["target_id"])}
    vector, new = mimic(honest, previous, context.round_index, params["warmup"], rng=context.rng,
                        ids=context.cohort[context.honest])
    s["z"][...], s["mu"][...] = new["z"], new["mu"]
    s["learnt"][...], s["target"][...], s["target_id"][...] = new["learnt"], new["target"], new["target_id"]
    return vector


def _mimic_state(size: int) -> dict[str, np.ndarray]:
    """Mimic's state, checkpointed: direction z and mean mu (d,), rounds learnt (0: none
    yet), the target's row and client id."""
    return {"z": np.zeros(size), "mu": np.zeros(size), "learnt": np.zeros((), np.int64),
            "target": np.full((), -1, np.int64), "target_id": np.full((), -1, np.int64)}


def _alie_optimised_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    return alie_optimised(honest, n, f, context.aggregate, evals=params["evals"])[0]


def _ipm_optimised_vector(honest: np.ndarray, n: int, f: int, params: Mapping, context: ServerContext) -> np.ndarray:
    return ipm_optimised(honest, n, f, context.aggregate, evals=params["evals"])[0]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Param:
    """One attack parameter: its ``type`` (float, int or str), ``default`` (None: the
    entry's ``resolve`` computes it from the run), the allowed ``choices`` (str), and
    bounds: ``above`` (strictly), ``at_least``, ``at_most``."""

    type: type
    default: object = None
    choices: tuple = ()
    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None

    def convert(self, key: str, value: object) -> object:
        """``value`` as this parameter's type, or ConfigError naming ``key``."""
        if value is None and self.default is None:
            return None
        if self.type is str:
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigError(key, value, "must be one of " + ", ".join(self.choices))
            return value
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(key, value, "expected an integer")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(key, value, "expected a number")
            if not math.isfinite(value):
                raise ConfigError(key, value, "expected a finite number")
            value = float(value)
        for bound, fails, words in ((self.above, lambda b: value <= b, "must be > {}"),
                                    (self.at_least, lambda b: value < b, "must be >= {}"),
                                    (self.at_most, lambda b: value > b, "must be <= {}")):
            if bound is not None and fails(bound):
                raise ConfigError(key, value, words.format(bound))
        return value


@dataclass(frozen=True)
class Attack:
    """One attack: its paper, its typed parameters, and its hooks.

    - ``on_data(x, y, num_classes, params, rng) -> (x, y)``: a Byzantine client's
      training data, before local training;
    - ``on_update(update, params, rng)``: its update, in place, after training (rng
      keyed by (seed, "attack", round, client id));
    - ``on_server(updates, byzantine, params, context)``: rank 0, every row of the
      cohort in place, with a :class:`ServerContext` (the rule in use, f, a keyed
      generator, the attack's checkpointed state);
    - ``triggered_test(x_test, y_test, params) -> (x, y)``: the test set on which rank 0
      measures the attack's success every evaluated round (``/rounds/backdoor_accuracy``).

    ``resolve(params, cfg, data)`` fills the defaults that depend on the run;
    ``check(params, data)`` raises ConfigError for data the attack cannot use;
    ``state(d)``: the arrays of an on_server attack's state (checkpointed);
    ``memory(n, d)``: bytes rank 0 allocates for it beyond a copy of the honest rows."""

    paper: str
    params: Mapping[str, Param] = field(default_factory=dict)
    resolve: Callable | None = None
    check: Callable | None = None
    on_data: Callable | None = None
    on_update: Callable | None = None
    on_server: Callable | None = None
    triggered_test: Callable | None = None
    state: Callable[[int], dict] | None = None
    memory: Callable[[int, int], int] = lambda n, d: 0

    @property
    def needs_rows(self) -> bool:
        """Whether rank 0 must see every row (no pre-summing workers)."""
        return self.on_server is not None


def _default_scaling(params: dict, cfg, data) -> dict:
    if params["lambda"] is None:
        params["lambda"] = float(cfg.clients.per_round)
    return params


def _backdoor_resolve(params: dict, cfg, data) -> dict:
    a, c = cfg.attack, cfg.clients
    if params["gamma"] is None:
        attackers = len(byzantine_clients(cfg.seed, c.total, a.fraction, a.clients)) * c.per_round / c.total
        params["gamma"] = replacement_factor(c.per_round, cfg.server.lr, attackers)
    if data is not None and data.x_train is not None and data.x_train.ndim == 4:
        params["trigger_value"] = data.x_train.max(axis=(0, 2, 3))
        if params["trigger_size"] is None:
            params["trigger_size"] = trigger_size(*data.x_train.shape[2:])
    return params


def _backdoor_check(params: dict, data) -> None:
    if data.x_train is None or data.x_train.ndim != 4:
        raise ConfigError("attack.name", "backdoor", f"stamps a pixel trigger into images; the data set's samples "
                          f"have shape {tuple(data.input_shape)} (use digits, mnist or fashion_mnist)")
    if params["target"] >= data.num_classes:
        raise ConfigError("attack.params.target", params["target"], f"must be a class of the data set (0..{data.num_classes - 1})")
    if params["trigger_size"] is not None and params["trigger_size"] > min(data.input_shape[1:]):
        raise ConfigError("attack.params.trigger_size", params["trigger_size"],
                          f"must fit the images ({data.input_shape[1]} x {data.input_shape[2]})")


_PERTURBATION = Param(str, "unit_vec", PERTURBATIONS)
_EVALS = Param(int, 20, at_least=1)


def _rule_memory(n: int, d: int) -> int:
    return n * d * 12  # the rows the search hands to the rule (float32) and a step's float64 copy


ATTACKS: dict[str, Attack] = {
    "none": Attack("no attack"),
    "label_flip": Attack("label flipping, y -> C - 1 - y", on_data=label_flip_data),
    "sign_flip": Attack("sign flipping, -lambda x update", {"lambda": Param(float, 1.0, above=0)},
                        on_update=sign_flip_update),
    "scaling": Attack("Bagdasaryan et al. 2020 (model replacement scaling)", {"lambda": Param(float, None, above=0)},
                      resolve=_default_scaling, on_update=scaling_update),
    "gaussian": Attack("Gaussian noise N(0, std^2)", {"std": Param(float, 1.0, above=0)}, on_update=gaussian_update),
    "alie": Attack("Baruch et al. 2019 (A Little Is Enough)", {"z": Param(float, None)}, on_server=_colluding(_alie_vector)),
    "ipm": Attack("Xie et al. 2019 (inner product manipulation)", {"eps": Param(float, 0.1, above=0)},
                  on_server=_colluding(_ipm_vector)),
    "nonfinite": Attack("non-finite and extreme values (robustness probe)",
                        {"pattern": Param(str, "nan", NONFINITE_PATTERNS)}, on_update=nonfinite_hook),
    "min_max": Attack("Shejwalkar and Houmansadr 2021 (NDSS, min-max)", {"perturbation": _PERTURBATION},
                      on_server=_colluding(_min_max_vector)),
    "min_sum": Attack("Shejwalkar and Houmansadr 2021 (NDSS, min-sum)",
                      {"perturbation": _PERTURBATION, "reference": Param(str, "max", ("max", "min"))},
                      on_server=_colluding(_min_sum_vector)),
    "fang_krum": Attack("Fang et al. 2020 (USENIX Security, full knowledge, Krum)", on_server=_colluding(_fang_krum_rows),
                        memory=_rule_memory),
    "fang_trimmed_mean": Attack("Fang et al. 2020 (USENIX Security, full knowledge, trimmed mean / median)",
                                {"b": Param(float, 2.0, above=1)}, on_server=_colluding(_fang_trimmed_mean_rows)),
    "mimic": Attack("Karimireddy, He and Jaggi 2022 (ICLR, mimic)", {"warmup": Param(int, 1, at_least=1)},
                    on_server=_colluding(_mimic_vector), state=_mimic_state),
    "alie_optimised": Attack("Allouah et al. 2023 (ByzFL's optimised ALIE)", {"evals": _EVALS},
                             on_server=_colluding(_alie_optimised_vector), memory=_rule_memory),
    "ipm_optimised": Attack("Allouah et al. 2023 (ByzFL's optimised IPM)", {"evals": _EVALS},
                            on_server=_colluding(_ipm_optimised_vector), memory=_rule_memory),
    "backdoor": Attack("Bagdasaryan et al. 2020 (AISTATS, backdoor by model replacement)",
                       {"target": Param(int, 0, at_least=0), "poison_fraction": Param(float, BACKDOOR_FRACTION, above=0, at_most=1),
                        "trigger_size": Param(int, None, at_least=1), "gamma": Param(float, None, above=0)},
                       resolve=_backdoor_resolve, check=_backdoor_check, on_data=backdoor_data_hook,
                       on_update=backdoor_update_hook, triggered_test=backdoor_test_hook),
}


def resolved_params(cfg, data=None, entry: Attack | None = None) -> dict:
    """The configured attack's parameters with every default filled in (``data``: the
    run's FederatedData, for what depends on it; ``entry``: the attack's registry
    entry, default ``ATTACKS[cfg.attack.name]``; user attacks pass theirs)."""
    entry = entry or ATTACKS[cfg.attack.name]
    params = {name: spec.default for name, spec in entry.params.items()}
    params.update(cfg.attack.params)
    return entry.resolve(params, cfg, data) if entry.resolve else params


def client_rng(seed: int, round_index: int, client_id: int) -> np.random.Generator:
    """The generator of a Byzantine client's attack randomness in one round."""
    return seeding.rng(seed, "attack", round_index, client_id)
