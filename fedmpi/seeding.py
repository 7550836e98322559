"""Keyed randomness: every random draw is a pure function of (seed, purpose, keys...).

Nothing in fedmpi draws from an ambient generator. A client's shuffling in
round 7 comes from ``rng(seed, "shuffle", 7, client_id)`` whichever rank hosts
it, which is what makes runs with 2, 3 or 16 ranks bitwise identical.
"""

from __future__ import annotations

import numpy as np

# Stable small integers per purpose: part of the key, so never renumber them.
PURPOSES = {
    "init": 1,
    "cohort": 2,
    "split": 3,
    "partition": 4,
    "synthetic": 5,
    "shuffle": 6,
    "dp_noise": 7,
    "byzantine_set": 8,
    "attack": 9,
    "server_noise": 10,
    "bucketing": 11,
    "inversion": 12,
    "membership": 13,
    "shadow": 14,
}


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(PURPOSES[purpose], *map(int, keys)))


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for one keyed purpose."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *keys)))


def torch_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer to seed a ``torch.Generator`` for one keyed purpose."""
    return int(seed_sequence(seed, purpose, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))
