"""Byzantine clients: who they are and what they send.

The Byzantine clients are a fixed set of client ids for the whole run, drawn
from (seed, "byzantine_set") or listed in the config. An attack acts at one or
more of three points, each a hook of its :data:`ATTACKS` entry:

- ``on_data``, on the client before local training: ``label_flip`` trains on
  labels y -> C - 1 - y;
- ``on_update``, on the client after honest training: ``sign_flip`` sends
  -lambda * update (lambda = 1 by default), ``scaling`` sends +lambda * update
  (model replacement, Bagdasaryan et al. 2020; lambda defaults to the cohort
  size), ``gaussian`` sends N(0, std^2) noise;
- ``on_server``, omniscient and colluding, on rank 0 from the honest rows of
  the cohort (all Byzantine rows equal): ``alie`` (Baruch et al. 2019) sends
  mean - z * std per coordinate, ``ipm`` (Xie et al. 2019) sends -eps * mean.

The attack functions are pure; the hooks connect them to a run. Randomness
comes from the generator the caller passes, keyed by (seed, "attack", round,
client id) on the client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from . import seeding


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


# --------------------------------------------------------------------------- hooks


def label_flip_data(x: np.ndarray, y: np.ndarray, num_classes: int, params: Mapping, rng: np.random.Generator) -> tuple:
    return x, flip_labels(y, num_classes)


def sign_flip_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = sign_flip(update, params["lambda"])


def scaling_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = scaling(update, params["lambda"])


def gaussian_update(update: np.ndarray, params: Mapping, rng: np.random.Generator) -> None:
    update[:] = gaussian(update.size, params["std"], rng)


def _colluding(vector_of: Callable[[np.ndarray, int, int, Mapping], np.ndarray]):
    """An on_server hook: every Byzantine row becomes ``vector_of(honest, n, f, params)``.
    With no honest row (or no Byzantine row) in the cohort the rows stay as they are."""

    def hook(updates: np.ndarray, byzantine: np.ndarray, params: Mapping) -> None:
        n, f = len(byzantine), int(byzantine.sum())
        if f == 0 or f == n:
            return
        honest = updates[~byzantine]  # a copy of the honest rows, in their own dtype
        updates[byzantine] = vector_of(honest, n, f, params).astype(updates.dtype)

    return hook


def _alie_vector(honest: np.ndarray, n: int, f: int, params: Mapping) -> np.ndarray:
    z = params.get("z")
    if z is None:
        # with a Byzantine majority no supporters are needed: use the largest finite z
        z = alie_zmax(n, f) if math.floor(n / 2 + 1) - f > 0 else NormalDist().inv_cdf((n - 1) / n)
    return alie(honest, n, f, z)


def _ipm_vector(honest: np.ndarray, n: int, f: int, params: Mapping) -> np.ndarray:
    return ipm(honest, params["eps"])


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Attack:
    """One attack: its paper, its parameters (name -> default; None: computed from
    the run by ``resolve``), which must be > 0, and its hooks:
    ``on_data(x, y, num_classes, params, rng) -> (x, y)`` before local training,
    ``on_update(update, params, rng)`` in place after it, ``on_server(updates,
    byzantine, params)`` in place on rank 0 with every row of the cohort."""

    paper: str
    params: Mapping[str, float | None] = field(default_factory=dict)
    positive: tuple[str, ...] = ()
    resolve: Callable[[dict, int], dict] | None = None
    on_data: Callable | None = None
    on_update: Callable | None = None
    on_server: Callable | None = None

    @property
    def needs_rows(self) -> bool:
        """Whether rank 0 must see every row (no pre-summing workers)."""
        return self.on_server is not None


def _default_scaling(params: dict, cohort_size: int) -> dict:
    if params["lambda"] is None:
        params["lambda"] = float(cohort_size)
    return params


ATTACKS: dict[str, Attack] = {
    "none": Attack("no attack"),
    "label_flip": Attack("label flipping, y -> C - 1 - y", on_data=label_flip_data),
    "sign_flip": Attack("sign flipping, -lambda x update", {"lambda": 1.0}, ("lambda",), on_update=sign_flip_update),
    "scaling": Attack("Bagdasaryan et al. 2020 (model replacement scaling)", {"lambda": None}, ("lambda",),
                      resolve=_default_scaling, on_update=scaling_update),
    "gaussian": Attack("Gaussian noise N(0, std^2)", {"std": 1.0}, ("std",), on_update=gaussian_update),
    "alie": Attack("Baruch et al. 2019 (A Little Is Enough)", {"z": None}, on_server=_colluding(_alie_vector)),
    "ipm": Attack("Xie et al. 2019 (inner product manipulation)", {"eps": 0.1}, ("eps",), on_server=_colluding(_ipm_vector)),
}


def resolved_params(name: str, given: Mapping, cohort_size: int) -> dict:
    """The attack's parameters with defaults filled in."""
    entry = ATTACKS[name]
    params = dict(entry.params)
    params.update(given)
    return entry.resolve(params, cohort_size) if entry.resolve else params


def client_rng(seed: int, round_index: int, client_id: int) -> np.random.Generator:
    """The generator of a Byzantine client's attack randomness in one round."""
    return seeding.rng(seed, "attack", round_index, client_id)
