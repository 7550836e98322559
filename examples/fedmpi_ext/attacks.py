"""An attack from outside fedmpi: ByzMean over ALIE.

Xu, Huang, Song and Lan, "Byzantine-robust Federated Learning through
Collaborative Malicious Gradient Filtering" (SignGuard), ICDCS 2022.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmpi.attacks import Attack, Param, ServerContext, alie, alie_zmax


def byzmean_rows(honest: np.ndarray, f: int, z: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two Byzantine vectors of ByzMean: (target, balance). The first m1 = floor(f / 2)
    Byzantine clients send ``target``, the other m2 = f - m1 send ``balance``, chosen so
    that the mean of all n = h + f rows equals ``target``:
    m2 balance = n target - m1 target - sum(honest).

    Choices the paper leaves open: the target is the ALIE vector (mean - z std of the
    honest rows, z = z_max(n, f) of Baruch et al. 2019 unless given), as in the
    paper's experiments; with f = 1 (m1 = 0) the one Byzantine row is the balance
    row, which still makes the mean equal the target; float64 arithmetic."""
    h = len(honest)
    n = h + f
    m1 = f // 2
    target = alie(honest, n, f, z if z is not None else alie_zmax(n, f))
    balance = ((n - m1) * target - honest.astype(np.float64).sum(axis=0)) / (f - m1)
    return target, balance


def _on_server(updates: np.ndarray, byzantine: np.ndarray, params: Mapping, context: ServerContext) -> None:
    """Rank 0, every row of the cohort: the Byzantine rows, in slot order, become
    m1 target rows then m2 balance rows, computed from the honest rows that arrived
    finite (``context.honest``; the server drops the others). Nothing changes
    without such an honest row or without a Byzantine one."""
    slots = np.flatnonzero(byzantine)
    if len(slots) == 0 or not context.honest.any():
        return
    target, balance = byzmean_rows(updates[context.honest], len(slots), params["z"])
    m1 = len(slots) // 2
    updates[slots[:m1]] = target.astype(updates.dtype)
    updates[slots[m1:]] = balance.astype(updates.dtype)


byzmean = Attack("Xu et al. 2022 (ByzMean, SignGuard paper) over ALIE", params={"z": Param(float, None)},
                 on_server=_on_server)
