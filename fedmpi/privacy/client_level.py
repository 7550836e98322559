"""Client-level DP: DP-FedAvg (McMahan et al. 2018).

Each client update is clipped to L2 norm S (``max_grad_norm``); Gaussian noise
with std z S (z = ``noise_multiplier``) is added to the sum on the server
(``client_central``, :class:`CentralDP`, which clips every row itself so the
bound holds whatever clients send) or by each client to its own update
(``client_local``, :func:`privatise_update`). The clipping factor is
aggregation's (:func:`fedmpi.aggregation.clip_factors`).
"""

from __future__ import annotations

import numpy as np

from .. import seeding
from ..aggregation import AggregationResult, clip, clip_factors, weighted_sum
from ..rounds import Aggregate, Updates, finite_rows


def clip_update(update: np.ndarray, clip_norm: float) -> bool:
    """Scale ``update`` in place to L2 norm <= clip_norm (norm in float64); return whether it was clipped."""
    norm = float(np.sqrt(np.dot(update.astype(np.float64), update.astype(np.float64))))
    if norm > clip_norm:
        update *= np.float32(clip_factors(np.array([norm]), clip_norm)[0])
        return True
    return False


def privatise_update(update: np.ndarray, clip_norm: float, noise_multiplier: float, seed: int, round_index: int,
                     client_id: int) -> bool:
    """Local client-level DP: clip the update to S in place, add N(0, z^2 S^2) from the
    client's key (seed, "dp_noise", round, client id). Returns whether it was clipped."""
    clipped = clip_update(update, clip_norm)
    noise = seeding.rng(seed, "dp_noise", round_index, client_id).standard_normal(update.size)
    update += (noise_multiplier * clip_norm * noise).astype(np.float32)
    return clipped


class CentralDP:
    """Central client-level DP as an aggregator (DP-FedAvg with a trusted server,
    McMahan et al. 2018): clip every finite row to S here (so the bound holds whatever
    clients send), sum, add N(0, z^2 S^2) keyed by (seed, "server_noise", round) and
    divide by the expected cohort size. An empty cohort still gets the noise. A row
    with a non-finite coordinate is left out: it adds 0 to the sum, which is within
    the bound S that calibrates the noise, and the divisor stays the expected cohort
    size, so the accounting is unchanged."""

    def __init__(self, cfg, size: int):
        self.cfg, self.size = cfg, size
        self.state: dict[str, np.ndarray] = {}

    def __call__(self, updates: Updates, round_index: int) -> Aggregate:
        p, k, kept = self.cfg.privacy, len(updates.cohort), updates.kept
        rows = finite_rows(updates.rows, kept)
        clipped = np.full(k, np.nan)
        clipped[kept] = [clip_update(row, p.max_grad_norm) for row in rows]
        total = weighted_sum(rows, np.ones(len(rows))) if len(rows) else np.zeros(self.size)
        noise = seeding.rng(self.cfg.seed, "server_noise", round_index).standard_normal(self.size)
        vector = (total + p.noise_multiplier * p.max_grad_norm * noise) / self.cfg.clients.per_round
        selected = np.zeros(k, dtype=bool)
        selected[kept] = True
        scores = np.full(k, np.inf)
        scores[kept] = np.nan
        return Aggregate(vector, selected, scores, clipped)

    def simulate(self, rows: np.ndarray, f: int, round_index: int) -> AggregationResult:
        """The noise-free aggregate of ``rows`` (clipped copies), for full-knowledge attacks."""
        clipped = clip(rows, self.cfg.privacy.max_grad_norm)
        return AggregationResult(clipped.sum(axis=0) / self.cfg.clients.per_round, selected=np.arange(len(rows)))
