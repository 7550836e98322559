"""A robust aggregation rule from outside fedmpi: Divide-and-Conquer (DnC).

Shejwalkar and Houmansadr, "Manipulating the Byzantine: Optimizing Model
Poisoning Attacks and Defenses for Federated Learning", NDSS 2021, Algorithm 2.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.aggregation import AggregationResult
from fedmpi.extensions import declare


@declare(paper="Shejwalkar and Houmansadr 2021 (DnC)", min_rows=lambda f: f + 1, requirement="f < n")
def dnc(rows: np.ndarray, *, f: int, rng: np.random.Generator, iterations: int = 1, filter_fraction: float = 1.0,
        subsample: int = 10000) -> AggregationResult:
    """Divide-and-Conquer: in each of ``iterations`` rounds, draw ``subsample`` of the d
    coordinates, center the rows' sub-vectors on their mean, project them on the top
    right singular vector of the centered matrix and score each row by its squared
    projection; keep the n - ceil(``filter_fraction`` x f) rows of lowest score. The
    aggregate is the mean of the rows kept in every iteration.

    Choices the paper leaves open: the kept set starts as all rows and is intersected
    with each iteration's (the paper writes the intersection); the coordinates are
    drawn without replacement from ``rng`` (fedmpi's generator keyed by seed and
    round), all d of them when d <= ``subsample``; ceil(c f) rows are removed when
    c f is not an integer; ties in the score go to the lower row index; sums in
    float64. Defaults (ours; set them per run): one iteration, c = 1, b = 10000.
    ``scores``: the last iteration's outlier scores (higher is more suspicious).
    """
    if iterations < 1 or not 0 < filter_fraction or subsample < 1:
        raise ValueError(f"dnc needs iterations >= 1, filter_fraction > 0 and subsample >= 1; got {iterations}, "
                         f"{filter_fraction}, {subsample}")
    n, d = rows.shape
    keep = n - math.ceil(filter_fraction * f)
    if keep < 1:
        raise ValueError(f"dnc removes ceil({filter_fraction} x f) = {n - keep} of {n} rows; none would be left")
    kept = np.ones(n, dtype=bool)
    scores = np.zeros(n)
    for _ in range(iterations):
        columns = np.sort(rng.choice(d, size=subsample, replace=False)) if d > subsample else np.arange(d)
        sub = rows[:, columns].astype(np.float64)
        centered = sub - sub.mean(axis=0)
        top = np.linalg.svd(centered, full_matrices=False)[2][0]
        scores = (centered @ top) ** 2
        lowest = np.argsort(scores, kind="stable")[:keep]
        mask = np.zeros(n, dtype=bool)
        mask[lowest] = True
        kept &= mask
    selected = np.flatnonzero(kept)
    return AggregationResult(rows[selected].astype(np.float64).mean(axis=0), selected=selected, scores=scores)
