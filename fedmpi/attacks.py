"""Byzantine clients: who they are and what they send.

The Byzantine clients are a fixed set of client ids for the whole run, drawn
from (seed, "byzantine_set") or listed in the config. They behave in one of
three ways:

- data side, on the worker: ``label_flip`` trains on labels y -> C - 1 - y;
- update side, on the worker, after honest training: ``sign_flip`` sends
  -lambda * update (lambda = 1 by default), ``scaling`` sends +lambda * update
  (model replacement, Bagdasaryan et al. 2020; lambda defaults to the cohort
  size), ``gaussian`` sends N(0, std^2) noise;
- omniscient and colluding, on rank 0, from the honest rows of the cohort (all
  Byzantine rows equal): ``alie`` (Baruch et al. 2019) sends mean - z * std per
  coordinate, ``ipm`` (Xie et al. 2019) sends -eps * mean.

The functions here are pure; :func:`apply_update_attack` and
:func:`apply_omniscient_attack` connect them to the config.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from . import seeding

WORKER_SIDE = ("label_flip", "sign_flip", "scaling", "gaussian")
OMNISCIENT = ("alie", "ipm")

# attack name -> {parameter: default}; None means "computed from the run".
PARAMS = {
    "none": {},
    "label_flip": {},
    "sign_flip": {"lambda": 1.0},
    "scaling": {"lambda": None},
    "gaussian": {"std": 1.0},
    "alie": {"z": None},
    "ipm": {"eps": 0.1},
}


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


def resolved_params(name: str, given: dict, cohort_size: int) -> dict:
    """The attack's parameters with defaults filled in."""
    params = dict(PARAMS[name])
    params.update(given)
    if name == "scaling" and params["lambda"] is None:
        params["lambda"] = float(cohort_size)
    return params


def apply_update_attack(name: str, params: dict, update: np.ndarray, seed: int, round_index: int, client_id: int) -> None:
    """Replace a Byzantine client's trained update in place (worker side)."""
    if name == "sign_flip":
        update[:] = sign_flip(update, params["lambda"])
    elif name == "scaling":
        update[:] = scaling(update, params["lambda"])
    elif name == "gaussian":
        update[:] = gaussian(update.size, params["std"], seeding.rng(seed, "attack", round_index, client_id))


def apply_omniscient_attack(name: str, params: dict, updates: np.ndarray, byzantine: np.ndarray) -> None:
    """Overwrite the Byzantine rows of ``updates`` in place with the colluding vector
    computed from the honest rows (rank 0). With no honest row in the cohort the
    Byzantine rows are left as they are."""
    n_byz = int(byzantine.sum())
    if n_byz == 0 or n_byz == len(byzantine):
        return
    honest = updates[~byzantine]  # a copy of the honest rows, in their own dtype
    if name == "alie":
        vector = alie(honest, len(byzantine), n_byz, params.get("z"))
    else:
        vector = ipm(honest, params["eps"])
    updates[byzantine] = vector.astype(updates.dtype)
