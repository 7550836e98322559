"""A test-only fault: DP noise smaller than configured, to check that an audit notices.

``FEDMPI_TEST_ONLY_NOISE_SCALE`` (an environment variable, never a config key, so no
experiment file can turn it on) multiplies every DP noise draw (DP-SGD, local and
central client-level DP) by its value. The tests set it to 0.1 to inject the bug the
one-run audit must catch: noise 10 times smaller than the calibrated multiplier,
while the accountant still reports the calibrated epsilon. A run with it set prints
a warning and its results file carries the root attribute ``test_only_noise_scale``.
"""

from __future__ import annotations

import os

NOISE_SCALE_ENV = "FEDMPI_TEST_ONLY_NOISE_SCALE"


def noise_scale() -> float:
    """1.0, or the value of FEDMPI_TEST_ONLY_NOISE_SCALE (a number > 0) where a test set it."""
    raw = os.environ.get(NOISE_SCALE_ENV)
    if raw is None:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{NOISE_SCALE_ENV} = {raw!r}: must be a number > 0 (test-only)") from None
    if not value > 0:
        raise ValueError(f"{NOISE_SCALE_ENV} = {raw!r}: must be a number > 0 (test-only)")
    return value
