"""Aggregation rules: pure functions of an (n, d) array of client updates.

Each rule takes ``updates`` (n rows, one per client, in cohort order), never
modifies it, and returns an :class:`AggregationResult` holding the (d,)
aggregate and what the rule decided. No MPI, no torch, no hidden state.

- :func:`fedavg`: weighted mean, weights = client sample counts (McMahan et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Columns per block when a float32 array is accumulated in float64: small
# enough that the float64 copy of a block stays in cache.
_BLOCK_BYTES = 1 << 20


@dataclass
class AggregationResult:
    """``vector``: the (d,) float64 aggregate. ``selected``: indices of the rows the
    aggregate used (None when all rows contribute). ``scores``: one score per row
    for rules that score rows (None otherwise)."""

    vector: np.ndarray
    selected: np.ndarray | None = None
    scores: np.ndarray | None = None


def _as_updates(updates: np.ndarray) -> np.ndarray:
    updates = np.asarray(updates)
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) array, got shape {updates.shape}")
    return updates


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


def weighted_sum(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i weights[i] * updates[i], accumulated in float64, one pass over ``updates``."""
    n, d = updates.shape
    if updates.dtype == np.float64:
        return weights @ updates
    out = np.empty(d, dtype=np.float64)
    block = max(1024, _BLOCK_BYTES // (8 * n))
    for start in range(0, d, block):
        out[start:start + block] = weights @ updates[:, start:start + block].astype(np.float64)
    return out


def row_norms(updates: np.ndarray) -> np.ndarray:
    """L2 norm of each row, accumulated in float64 (1e30-scale rows do not overflow)."""
    updates = _as_updates(updates)
    n, d = updates.shape
    if updates.dtype == np.float64:
        return np.sqrt(np.einsum("ij,ij->i", updates, updates))
    sq = np.zeros(n)
    block = max(1024, _BLOCK_BYTES // (8 * n))
    for start in range(0, d, block):
        part = updates[:, start:start + block].astype(np.float64)
        sq += np.einsum("ij,ij->i", part, part)
    return np.sqrt(sq)


def fedavg(updates: np.ndarray, weights: np.ndarray | None = None) -> AggregationResult:
    """Federated averaging (McMahan et al. 2017): the mean of the rows weighted by
    ``weights`` (client sample counts; uniform when None).

    >>> fedavg(np.array([[0.0, 2.0], [4.0, 6.0]]), weights=[1, 3]).vector
    array([3., 5.])
    """
    updates = _as_updates(updates)
    w = _normalised_weights(weights, updates.shape[0])
    return AggregationResult(weighted_sum(updates, w))
