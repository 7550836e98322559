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
    "bucketing": 11,  # also a user pre-aggregation step's generator: (round, step index)
    "natural_clients": 12,
    "rule": 13,  # a user aggregation rule's generator on rank 0: (round)
    "dataset": 14,  # a user data set's generator, the same on every rank
    "client_torch": 15,  # torch's global generator while a client trains (dropout): (round, client id)
    "probe": 16,  # inputs on which user code is tried before the run
    "server_attack": 17,  # an on_server attack's generator on rank 0: (round)
    "stragglers": 18,
    "dropout": 19,
    "speed": 20,
    "audit": 21,  # audit canaries (fedmpi.canaries): (what, ...)
    "inversion": 22,  # a gradient-inversion attack's random starts on rank 0: (round, client id)
    "membership": 23,  # membership splits: (0, client) the audited run's, (1, client) the shadows'
    "shadow": 24,  # a shadow federation's experiment seed: (shadow index)
}


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(PURPOSES[purpose], *map(int, keys)))


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for one keyed purpose."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, *keys)))


def torch_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer to seed a ``torch.Generator`` for one keyed purpose."""
    return int(seed_sequence(seed, purpose, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))
