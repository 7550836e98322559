"""User code for tests/test_extensions.py, named by import path (tests/helpers on
PYTHONPATH): extensions that break their contract in one way each, a stateful rule,
and the built-ins written as user code. No torch here (usermodels.py has the models),
so that the jobs refused before training do not pay for importing it."""

from __future__ import annotations

import numpy as np

from fedmpi.aggregation import AggregationResult, clip, krum, median
from fedmpi.attacks import ATTACKS, Attack, Param
from fedmpi.data import load_digits_arrays, split_train_test
from fedmpi.extensions import declare


def no_rows() -> AggregationResult:  # a rule must take the rows
    return AggregationResult(np.zeros(1))


def short_vector(rows: np.ndarray) -> AggregationResult:  # one coordinate short
    return AggregationResult(rows[0, :-1].astype(np.float64))


@declare(state=lambda d, params: {"calls": np.zeros(1)})
def nan_after_first(rows: np.ndarray, *, state: dict) -> AggregationResult:
    """The mean of the rows, then NaN from its second call on (the probe is a first call)."""
    state["calls"] += 1
    vector = rows.astype(np.float64).mean(axis=0)
    if state["calls"][0] > 1:
        vector[::3] = np.nan
    return AggregationResult(vector)


@declare(paper="median of the rows, moved towards a running mean of past aggregates",
         state=lambda d, params: {"average": np.zeros(d), "rounds": np.zeros(1, dtype=np.int64)})
def smoothed_median(rows: np.ndarray, *, state: dict, beta: float = 0.5) -> AggregationResult:
    """v = (1 - beta) median + beta a, then a <- mean of every v so far: state that a
    resume must restore exactly."""
    result = median(rows)
    vector = (1 - beta) * result.vector + beta * state["average"]
    state["rounds"] += 1
    state["average"] += (vector - state["average"]) / state["rounds"][0]
    return AggregationResult(vector, result.selected, result.scores)


def mismatched(*, rng: np.random.Generator) -> tuple:
    x = rng.normal(size=(100, 5)).astype(np.float32)
    return x, rng.integers(0, 3, 99), x[:20], rng.integers(0, 3, 20)


def _on_update_two_args(update, params):  # hooks are called as on_update(update, params, rng)
    update *= -1


wrong_hook = Attack("a hook with a missing argument", on_update=_on_update_two_args)


# The built-in rule, step, optimizer, attack, data set and model, written as user code:
# a run with these must give the bytes of the same run with the built-ins.

def krum_rule(rows: np.ndarray, *, f: int) -> AggregationResult:
    return krum(rows, f)


def clip_step(rows: np.ndarray, *, max_norm: float) -> np.ndarray:
    return clip(rows, max_norm)


@declare(state=lambda d, params: {"momentum": np.zeros(d)}, default_lr=1.0)
def server_momentum(update: np.ndarray, *, state: dict, beta: float = 0.9) -> np.ndarray:
    state["momentum"] *= beta
    state["momentum"] += update
    return state["momentum"]


alie_attack = Attack("ALIE, as user code", {"z": Param(float, None)}, on_server=ATTACKS["alie"].on_server)


def digits(*, test_fraction: float = 0.2) -> tuple:
    x, y = load_digits_arrays()
    return split_train_test(x / np.float32(16.0), y, test_fraction, 0)


def needs_threshold(rows: np.ndarray, *, threshold: float, label: str | None = None) -> AggregationResult:
    return AggregationResult(rows.astype(np.float64).mean(axis=0))


def takes_state_undeclared(rows: np.ndarray, *, state: dict) -> AggregationResult:
    return AggregationResult(rows.astype(np.float64).mean(axis=0))


def not_an_attack(update: np.ndarray, params: dict, rng: np.random.Generator) -> None:  # a hook, not an Attack
    update *= -1
