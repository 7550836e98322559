"""A data set from outside fedmpi: rotated digits, split over clients by rotation.

The UCI digits (shipped with scikit-learn); client k's training images are
rotated by k x 90 degrees (mod 360), a feature shift between clients as in the
"rotated MNIST" benchmarks of domain generalisation; the test images each get
one of the four rotations at random.
"""

from __future__ import annotations

import numpy as np

from fedmpi.data import load_digits_arrays


def rotated_digits(*, rng: np.random.Generator, num_clients: int, test_fraction: float = 0.2) -> tuple:
    """(clients, (x_test, y_test)): ``num_clients`` pairs (x, y) of near-equal size (a
    random split), images (1, 8, 8) in [0, 1]. ``rng`` is fedmpi's generator keyed by
    the seed: every rank draws the same split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_arrays()
    x = x / np.float32(16.0)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    turns = rng.integers(0, 4, n_test)
    x_test = np.stack([np.rot90(image, k, axes=(1, 2)) for image, k in zip(x[test], turns)])
    clients = []
    for k, part in enumerate(np.array_split(train, num_clients)):
        clients.append((np.ascontiguousarray(np.rot90(x[part], k % 4, axes=(2, 3))), y[part]))
    return clients, (x_test, y[test])
