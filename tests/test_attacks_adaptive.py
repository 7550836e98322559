"""Adaptive attacks as pure functions: non-finite rows, min-max / min-sum, Fang et al.
(Krum, trimmed mean), mimic, ByzFL's optimised ALIE / IPM. Hand-computed cases,
ByzFL's published examples, and checks against the rules they target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmpi import aggregation as agg
from fedmpi import attacks

FMAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- non-finite rows


def test_nonfinite_update_patterns():
    u = np.arange(1, 8, dtype=np.float32)
    for pattern, expected in (("nan", [np.nan] * 7), ("inf", [np.inf] * 7), ("-inf", [-np.inf] * 7),
                              ("max", [FMAX] * 7), ("max_alternating", [FMAX, -FMAX] * 3 + [FMAX]),
                              ("mixed", [np.nan, np.inf, -np.inf, FMAX, -FMAX, np.nan, np.inf]),
                              ("one_nan", [np.nan, 2, 3, 4, 5, 6, 7])):
        out = attacks.nonfinite_update(u, pattern)
        assert out.dtype == np.float32 and out.shape == (7,)
        np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32), err_msg=pattern)
    assert u.tolist() == [1, 2, 3, 4, 5, 6, 7]  # input untouched
    assert attacks.nonfinite_update(np.zeros(3, dtype=np.float64), "max").dtype == np.float64
    assert attacks.nonfinite_update(np.zeros(3, dtype=np.int64), "inf").dtype == np.float32
    # "max_alternating": finite float32 sum, overflowing float32 squared norm
    alt = attacks.nonfinite_update(np.zeros(6, dtype=np.float32), "max_alternating")
    with np.errstate(over="ignore"):
        assert alt.sum() == 0 and np.isinf(np.float32(alt[0]) * alt[0])
    with pytest.raises(ValueError, match="unknown pattern"):
        attacks.nonfinite_update(u, "zero")


# --------------------------------------------------------------------------- min-max / min-sum

# mean (3, 0.5); |x_i - mean|^2 = 9.25, 9.25, 6.25, 2.25; largest pairwise squared distance 36 (rows 0, 1)
H4 = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 3.0], [3.0, -1.0]])


def _gamma_star_min_max(honest, p):
    """Largest gamma with max_i |mean + gamma p - x_i|^2 <= max_ij |x_i - x_j|^2 (closed form)."""
    mean = honest.mean(0)
    bound = max(np.sum((a - b) ** 2) for a in honest for b in honest)
    a = np.sum((honest - mean) ** 2, axis=1)
    b = (honest - mean) @ p
    c = p @ p
    return min((b_i + math.sqrt(b_i ** 2 - c * (a_i - bound))) / c for a_i, b_i in zip(a, b))


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_max_gamma_is_the_constraint_boundary(perturbation):
    mean = H4.mean(0)
    p = {"unit_vec": -mean / np.linalg.norm(mean), "std": -H4.std(0, ddof=1), "sign": -np.sign(mean)}[perturbation]
    vector, gamma = attacks.min_max(H4, perturbation)
    star = _gamma_star_min_max(H4, p)
    assert star - 3e-5 <= gamma <= star  # the search stops within its 1e-5 tolerance, on the feasible side
    np.testing.assert_allclose(vector, mean + gamma * p, rtol=1e-12)
    bound = 36.0
    assert max(np.sum((vector - x) ** 2) for x in H4) <= bound
    assert max(np.sum((mean + (gamma + 1e-4) * p - x) ** 2) for x in H4) > bound
    if perturbation == "unit_vec":  # worst row is row 1: 9.25 + 2 gamma 8.75 / sqrt(9.25) + gamma^2 = 36
        s = math.sqrt(9.25)
        assert star == pytest.approx((-8.75 / s + math.sqrt((8.75 / s) ** 2 + 4 * 26.75 / 4)), rel=1e-12)


@pytest.mark.parametrize("perturbation,reference,expected", [
    # gamma*^2 = max_i (or min_i) |x_i - mean|^2 / |p|^2
    ("unit_vec", "max", math.sqrt(9.25)), ("unit_vec", "min", 1.5),
    ("std", "max", math.sqrt(9.25 / 9)), ("std", "min", 0.5),  # |std (ddof 1)|^2 = 6 + 3 = 9
])
def test_min_sum_gamma(perturbation, reference, expected):
    vector, gamma = attacks.min_sum(H4, perturbation, reference=reference)
    assert expected - 3e-5 <= gamma <= expected
    # sum_j |x_i - x_j|^2 = h |x_i - mean|^2 + sum_j |x_j - mean|^2 = 4 * (9.25, 9.25, 6.25, 2.25) + 27
    sums = [sum(np.sum((a - b) ** 2) for b in H4) for a in H4]
    assert sums == [64.0, 64.0, 52.0, 36.0]
    bound = max(sums) if reference == "max" else min(sums)
    mean = H4.mean(0)
    p = (vector - mean) / gamma
    assert sum(np.sum((vector - x) ** 2) for x in H4) <= bound
    assert sum(np.sum((mean + (gamma + 1e-4) * p - x) ** 2) for x in H4) > bound


def test_min_max_search_is_capped_below_twice_gamma_init():
    # gamma* is about 141 here, the authors' search only reaches [0, 2 * 10)
    honest = np.array([[100.0, 0.0], [-100.0, 0.0], [0.0, 100.0], [0.0, -99.0]])
    _, gamma = attacks.min_max(honest, "sign")
    assert 20 - 3e-5 <= gamma < 20
    with pytest.raises(ValueError, match="non-zero honest mean"):
        attacks.min_max(np.array([[1.0, 1.0], [-1.0, -1.0]]), "unit_vec")


# --------------------------------------------------------------------------- Fang et al.


def test_fang_krum_lambda_bound_by_hand():
    # 1-D honest rows 1..5, n = 7, f = 2: n - f - 2 = 3 nearest others; sums 6, 4, 4, 4, 6 -> min 4;
    # 4 / ((7 - 4 - 1) * sqrt(1)) + max |x_i| / sqrt(1) = 2 + 5 = 7
    honest = np.arange(1.0, 6.0)[:, None]
    assert attacks.fang_krum_lambda(honest, 7, 2) == pytest.approx(7.0, rel=1e-12)


def test_fang_krum_failure_path_keeps_last_lambda():
    # In 1-D the crafted copies never win Krum here: lambda halves from 7 until 7 / 2^20 <= 1e-5.
    honest = np.arange(1.0, 6.0)[:, None]
    rows, lam, success = attacks.fang_krum(honest, 7, 2)
    assert not success and lam == 7 / 2 ** 19
    np.testing.assert_array_equal(rows, [[-lam], [-lam]])


def test_fang_krum_makes_krum_select_a_crafted_row():
    # honest x_i = 0.1 + e_i in d = 5 (h = 5, f = 2, n = 7): s = +1 everywhere, honest pairwise
    # distance sqrt(2), |x_i| = sqrt(1.25). lambda0 = 3 sqrt(2) / (2 sqrt(5)) + sqrt(1.25) / sqrt(5).
    # Crafted c = -lambda 1, g = |c - x_i|^2 = (1.1 + lambda)^2 + 4 (0.1 + lambda)^2; crafted Krum score 2g,
    # honest score min(6, ...): lambda0 (g = 16.1) and lambda0 / 2 (g = 6.04) lose, lambda0 / 4 (g = 2.99,
    # 5.98 < 6) wins.
    honest = (0.1 + np.eye(5)).astype(np.float32)
    lam0 = 3 * math.sqrt(2) / (2 * math.sqrt(5)) + math.sqrt(1.25) / math.sqrt(5)
    assert attacks.fang_krum_lambda(honest, 7, 2) == pytest.approx(lam0, rel=1e-6)
    rows, lam, success = attacks.fang_krum(honest, 7, 2)
    assert success and lam == pytest.approx(lam0 / 4, rel=1e-6)
    np.testing.assert_array_equal(rows, np.full((2, 5), np.float32(-lam)))
    cohort = np.concatenate([honest, rows.astype(np.float32)])  # crafted rows last this time
    assert agg.krum(cohort, 2).selected[0] in (5, 6)
    # with noise: the second row lies within 1e-5 / d per coordinate of the first, and still wins
    rows, lam2, success = attacks.fang_krum(honest, 7, 2, rng=np.random.default_rng(0))
    assert success and lam2 == lam
    assert 0 < np.abs(rows[1] - rows[0]).max() <= 1e-5 / 5 + 1e-7
    assert agg.krum(np.concatenate([rows.astype(np.float32), honest]), 2).selected[0] in (0, 1)


def test_fang_krum_against_bulyan():
    rng = np.random.default_rng(1)
    honest = (0.05 + rng.normal(size=(9, 100))).astype(np.float32)  # n = 11 = 4f + 3 with f = 2
    rows, lam, success = attacks.fang_krum(honest, 11, 2, lambda r: agg.bulyan(r, 2), rng=rng)
    assert success and lam > 0
    assert np.any(agg.bulyan(np.concatenate([rows.astype(np.float32), honest]), 2).selected < 2)
    with pytest.raises(ValueError, match="n must be the number of honest rows plus f"):
        attacks.fang_krum(honest, 12, 2)


def test_fang_trimmed_mean_intervals():
    honest = np.array([
        # col0: s > 0, min 1 > 0 -> [0.5, 1]; col1: s < 0, max -1 <= 0 -> [-1, -0.5];
        # col2: s > 0, min -1 <= 0 -> [-2, -1]; col3: s < 0, max 2 > 0 -> [2, 4]; col4: mean 0 -> 0
        [1.0, -3.0, -1.0, 2.0, 1.0],
        [2.0, -1.0, 0.5, -5.0, -1.0],
        [3.0, -2.0, 1.0, 1.0, 0.0],
    ])
    rows = attacks.fang_trimmed_mean(honest, 4000, np.random.default_rng(0))
    lo = np.array([0.5, -1.0, -2.0, 2.0, 0.0])
    hi = np.array([1.0, -0.5, -1.0, 4.0, 0.0])
    assert rows.shape == (4000, 5)
    assert np.all(rows >= lo) and np.all(rows <= hi)
    np.testing.assert_allclose(rows.min(0), lo, atol=0.01)
    np.testing.assert_allclose(rows.max(0), hi, atol=0.01)
    np.testing.assert_allclose(rows.mean(0), (lo + hi) / 2, atol=0.03)  # uniform on the interval
    with pytest.raises(ValueError, match="b > 1"):
        attacks.fang_trimmed_mean(honest, 1, np.random.default_rng(0), b=1.0)


def test_fang_trimmed_mean_moves_aggregates_against_the_honest_direction():
    rng = np.random.default_rng(2)
    honest = (np.where(np.arange(40) % 2, 0.5, -0.5) + rng.normal(size=(8, 40))).astype(np.float32)
    s = np.sign(honest.astype(np.float64).mean(0))
    crafted = attacks.fang_trimmed_mean(honest, 3, rng).astype(np.float32)
    cohort = np.concatenate([crafted, honest])  # n = 11, f = 3
    honest_mean = honest.astype(np.float64).mean(0)
    tm = agg.trimmed_mean(cohort, 3).vector
    # the 3 crafted values are the lowest (s > 0) or highest (s < 0) of each coordinate: trimmed mean
    # keeps the 5 honest values on the attacker's side, every coordinate moves against s
    assert np.all((tm - honest_mean) * s < 0)
    assert np.all((tm - agg.trimmed_mean(honest, 3).vector) * s <= 0)
    assert (agg.median(cohort).vector - honest_mean) @ s < 0


# --------------------------------------------------------------------------- mimic


def test_mimic_picks_largest_projection_and_freezes_after_warmup():
    t = np.array([-3.0, -1.0, 0.0, 1.0, 2.5])
    rng = np.random.default_rng(5)
    base = np.array([0.5, -0.2, 0.1, 0.0])

    def cohort():
        return (base + t[:, None] * np.array([1.0, 0.0, 0.0, 0.0]) + 0.01 * rng.normal(size=(5, 4))).astype(np.float32)

    state = None
    for r in range(3):  # warm-up rounds 0, 1, 2
        honest = cohort()
        vector, state = attacks.mimic(honest, state, r, warmup=3, ids=np.arange(10, 15))
        z = state["z"]
        assert abs(abs(z[0]) - 1) < 1e-3  # top principal direction of the honest rows: +-e0
        assert state["sent"] == int(np.argmax(honest.astype(np.float64) @ z)) == state["target"]
        np.testing.assert_array_equal(vector, honest[state["sent"]])
    assert state["sent"] == (4 if z[0] > 0 else 0) and state["learnt"] == 3
    target_id = state["target_id"]
    # after the warm-up z is frozen and the target client is followed through a reshuffled cohort
    honest = cohort()
    perm = np.array([3, 0, 4, 1, 2])
    vector, after = attacks.mimic(honest[perm], state, 3, warmup=3, ids=np.arange(10, 15)[perm])
    np.testing.assert_array_equal(vector, honest[target_id - 10])
    np.testing.assert_array_equal(after["z"], state["z"])
    assert after["learnt"] == 3 and after["target_id"] == target_id
    # target absent: largest projection on the frozen z
    vector, _ = attacks.mimic(honest[:3], state, 4, warmup=3, ids=np.array([20, 21, 22]))
    np.testing.assert_array_equal(vector, honest[int(np.argmax(honest[:3].astype(np.float64) @ state["z"]))])


def test_mimic_warmup_update_by_hand():
    # t = 1 learnt round, z = (1, 1)/sqrt2, mu = 0; rows (1, 0), (-1, 0) (mean 0 -> mu stays 0).
    # power step: <x_i, z> = +-1/sqrt2 -> sum = (sqrt2, 0) -> (1, 0); z <- (z + (1, 0)) / 2, normalised
    # = (cos 22.5deg, sin 22.5deg). Target: argmax <x_i, z> = row 0.
    state = {"z": np.array([1.0, 1.0]) / math.sqrt(2), "mu": np.zeros(2), "learnt": 1, "target": 0, "target_id": None}
    honest = np.array([[1.0, 0.0], [-1.0, 0.0]])
    vector, new = attacks.mimic(honest, state, 1, warmup=5)
    np.testing.assert_allclose(new["z"], [math.cos(math.pi / 8), math.sin(math.pi / 8)], rtol=1e-12)
    np.testing.assert_array_equal(new["mu"], [0.0, 0.0])
    assert new["learnt"] == 2 and new["target"] == 0 and vector.tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(state["z"], np.array([1.0, 1.0]) / math.sqrt(2))  # input state untouched
    # running mean of the round means: mu <- 2/3 mu + mean / 3
    _, newer = attacks.mimic(honest + 3.0, new, 2, warmup=5)
    np.testing.assert_allclose(newer["mu"], [1.0, 1.0])
    with pytest.raises(ValueError, match="warmup >= 1"):
        attacks.mimic(honest, None, 0, warmup=0)


# --------------------------------------------------------------------------- optimised ALIE / IPM


X3 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def _byzfl_pipeline(rows):
    """ByzFL's documentation example: NNM(1), Clipping(c = 2), then TrMean(1)."""
    return agg.trimmed_mean(agg.clip(agg.nnm(rows, 1), 2.0), 1)


def test_optimised_alie_and_ipm_reproduce_byzfl_examples():
    # ByzFL's Optimal_ALittleIsEnough doc output: [12.91985116, 13.91985116, 14.91985116]
    # (mean + tau * std with ddof = 1, i.e. fedmpi's z = -tau searched with delta = -10)
    vector, z = attacks.alie_optimised(X3, 4, 1, _byzfl_pipeline, delta=-10.0, ddof=1)
    np.testing.assert_allclose(vector, [12.91985116, 13.91985116, 14.91985116], rtol=1e-9)
    assert z == pytest.approx(-8.91985116 / 3, rel=1e-8)
    # ByzFL's Optimal_InnerProductManipulation doc output: [-2.74877907, -3.43597384, -4.1231686]
    vector, eps = attacks.ipm_optimised(X3, 4, 1, _byzfl_pipeline)
    np.testing.assert_allclose(vector, [-2.74877907, -3.43597384, -4.1231686], rtol=1e-8)
    assert eps == pytest.approx(10 * 0.8 ** 12, rel=1e-12)


def test_line_maximize_trajectory():
    # expansion: 0, 10 (worse) -> delta 8; contraction probes best + delta only: 8, 6.4 (better), then
    # 6.4 + 5.12 * 0.8^k, all worse: the maximum at 3.7 below the best is never probed
    calls = []

    def objective(x):
        calls.append(x)
        return -(x - 3.7) ** 2

    best, value = attacks.line_maximize(objective)
    assert len(calls) == 20 and calls[:4] == [0.0, 10.0, 8.0, pytest.approx(6.4)]
    assert best == pytest.approx(6.4) and value == pytest.approx(-2.7 ** 2)


@pytest.mark.parametrize("rule_name", ["median", "krum"])
def test_optimised_factors_do_at_least_as_much_damage(rule_name):
    rng = np.random.default_rng(7)
    h, f, d = 15, 4, 50
    n = h + f
    honest = (0.3 + rng.normal(size=(h, d))).astype(np.float32)
    rule = (lambda r: agg.median(r)) if rule_name == "median" else (lambda r: agg.krum(r, f))
    mean = honest.astype(np.float64).mean(0)

    def damage(vector):
        rows = np.concatenate([honest, np.repeat(vector.astype(np.float32)[None], f, axis=0)])
        return float(np.linalg.norm(rule(rows).vector - mean))

    alie_vec, z = attacks.alie_optimised(honest, n, f, rule)
    ipm_vec, eps = attacks.ipm_optimised(honest, n, f, rule)
    assert damage(alie_vec) >= damage(attacks.alie(honest, n, f))  # z_max(19, 4) = 0.48
    assert damage(ipm_vec) >= damage(attacks.ipm(honest, 0.1))
    np.testing.assert_allclose(alie_vec, attacks.alie(honest, n, f, z), rtol=1e-12)
    np.testing.assert_allclose(ipm_vec, attacks.ipm(honest, eps), rtol=1e-12)
    with pytest.raises(ValueError, match="n must be the number of honest rows plus f"):
        attacks.alie_optimised(honest, n + 1, f, rule)
