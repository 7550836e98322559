"""Empirical privacy auditing (fedmpi.audit) against the papers' reference algorithms and analytic limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, get_epsilon_gaussian, get_sigma_gaussian, pld
from scipy import special, stats

from fedmpi import audit
from fedmpi.audit import gaussian_canary_epsilon, one_run_epsilon

# --------------------------------------------------------------------------- one_run_epsilon (Steinke et al. 2023)

# (guesses r, correct v, canaries m, delta) -> epsilon at alpha = 0.05, obtained by running the
# p-value function and bisection printed in the appendix of Steinke, Nasr & Jagielski,
# "Privacy Auditing with One (1) Training Run" (arXiv:2305.08846): eps_max steps up by 1 from 1,
# then 30 halvings of [0, eps_max]. The same algorithm, delta term included, is
# google-deepmind/jax_privacy jax_privacy/auditing.py (_one_run_p_value, brentq to 1e-6).
# The reference's 30 halvings resolve eps to eps_max / 2**30 (< 1e-8 here).
PAPER_ALGORITHM = [
    (1000, 1000, 1000, 1e-5, 5.782283132895827),
    (1000, 1000, 1000, 1e-3, 3.488994725048542),
    (100, 100, 1000, 1e-5, 3.4653763473033905),
    (500, 450, 1000, 1e-5, 1.9460119381546974),
    (1000, 900, 1000, 1e-5, 2.0206455951556563),
    (1000, 600, 1000, 1e-5, 0.2972269533202052),
    (200, 160, 5000, 1e-6, 1.0858442932367325),
]


def _ceiling(r: int, alpha: float) -> float:
    """All r guesses right, delta = 0: p = q^r < alpha  <=>  eps < -log(alpha^(-1/r) - 1)."""
    return -math.log(alpha ** (-1.0 / r) - 1.0)


@pytest.mark.parametrize("r, v, m, delta, expected", PAPER_ALGORITHM)
def test_one_run_matches_the_papers_algorithm(r, v, m, delta, expected):
    assert one_run_epsilon(r, v, m, delta) == pytest.approx(expected, abs=1e-8)


def test_one_run_ceiling_for_1000_canaries():
    # Perfect auditor, 1000 canaries, 95% confidence: the bound cannot exceed ~5.8.
    ceiling = _ceiling(1000, 0.05)
    assert ceiling == pytest.approx(5.80907, abs=1e-5)
    eps = one_run_epsilon(1000, 1000, 1000, delta=0.0, alpha=0.05)
    assert eps == pytest.approx(ceiling, abs=2e-9)
    assert 5.80 < eps <= ceiling
    # delta > 0 only lowers it; more canaries without more guesses do not raise it
    assert 5.77 < one_run_epsilon(1000, 1000, 1000, delta=1e-5) < eps - 0.02
    assert one_run_epsilon(1000, 1000, 100_000, delta=0.0) == pytest.approx(ceiling, abs=2e-9)
    # the ceiling grows only logarithmically in the number of guesses
    assert one_run_epsilon(100, 100, 1000, delta=0.0) == pytest.approx(_ceiling(100, 0.05), abs=2e-9)
    assert _ceiling(100, 0.05) == pytest.approx(3.49297, abs=1e-5)


def test_one_run_all_right_rises_with_confidence_lost():
    # a looser alpha allows a larger bound; closed form again at delta = 0
    assert one_run_epsilon(1000, 1000, 1000, 0.0, alpha=0.2) == pytest.approx(_ceiling(1000, 0.2), abs=2e-9)
    assert one_run_epsilon(1000, 1000, 1000, 0.0, alpha=0.01) == pytest.approx(_ceiling(1000, 0.01), abs=2e-9)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_one_run_half_right_is_zero(delta):
    assert one_run_epsilon(1000, 500, 1000, delta) == 0.0
    assert one_run_epsilon(1000, 520, 1000, delta) == 0.0  # p(0) = P[Bin(1000, .5) >= 520] ~ 0.11 > 0.05


def test_one_run_no_evidence_is_zero():
    assert one_run_epsilon(0, 0, 1000, 1e-5) == 0.0
    assert one_run_epsilon(0, 0, 0, 0.0) == 0.0
    assert one_run_epsilon(100, 0, 1000, 0.0) == 0.0


def test_one_run_delta_zero_is_the_binomial_tail():
    # delta = 0: p = P[Bin(r, expit(eps)) >= v]; the result sits on the alpha crossing
    r, v = 400, 330
    eps = one_run_epsilon(r, v, 1000, delta=0.0)
    assert stats.binom.sf(v - 1, r, special.expit(eps)) < 0.05 <= stats.binom.sf(v - 1, r, special.expit(eps + 1e-8))
    assert 1.3 < eps < math.log(330 / 70)  # below the logit of the observed accuracy 0.825


def test_one_run_returned_value_has_p_below_alpha():
    # ties: eps qualifies only with p < alpha strictly; the bisection returns the qualifying side
    for r, v, m, delta, _ in PAPER_ALGORITHM[:4]:
        eps = one_run_epsilon(r, v, m, delta)
        assert audit._one_run_p_value(m, r, v, eps, delta) < 0.05
        assert audit._one_run_p_value(m, r, v, eps + 2 * audit.ONE_RUN_EPS_TOL, delta) >= 0.05


def test_one_run_delta_term_scales_with_canaries():
    # 2 m delta multiplies the delta term: more canaries at the same delta weaken the bound
    few = one_run_epsilon(1000, 900, 1000, 1e-5)
    many = one_run_epsilon(1000, 900, 100_000, 1e-5)
    assert many < few - 0.05
    assert one_run_epsilon(1000, 900, 1000, 0.0) > few


def test_one_run_monotone_in_correct_and_delta():
    eps_v = [one_run_epsilon(500, v, 1000, 1e-5) for v in (300, 350, 400, 450, 500)]
    assert all(b > a for a, b in zip(eps_v, eps_v[1:]))
    eps_d = [one_run_epsilon(500, 450, 1000, d) for d in (0.0, 1e-7, 1e-5, 1e-4)]
    assert all(b < a for a, b in zip(eps_d, eps_d[1:]))


@pytest.mark.parametrize("args, match", [
    ((11, 12, 100, 1e-5), r"correct must be <= guesses \(11\), got correct=12"),
    ((101, 50, 100, 1e-5), r"guesses must be <= canaries \(100\), got guesses=101"),
    ((-1, 0, 100, 1e-5), r"guesses must be a non-negative integer, got -1"),
    ((10.0, 5, 100, 1e-5), r"guesses must be a non-negative integer, got 10.0"),
    ((10, 5, True, 1e-5), r"canaries must be a non-negative integer, got True"),
    ((10, 5, 100, 1.5), r"delta must be in \[0, 1\], got 1.5"),
    ((10, 5, 100, float("nan")), r"delta must be in \[0, 1\], got nan"),
])
def test_one_run_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        one_run_epsilon(*args)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_one_run_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got"):
        one_run_epsilon(10, 5, 100, 1e-5, alpha=alpha)


# --------------------------------------------------------------------------- gaussian_canary_epsilon (Andrew et al. 2024)


def _cosines(mean: float, std: float, k: int = 200, seed: int = 0) -> np.ndarray:
    """k cosines whose sample mean is `mean` and sample std (ddof=1) is `std`."""
    z = np.random.default_rng(seed).standard_normal(k)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + std * z


def _hockey_stick(m1: float, s1: float, m2: float, s2: float, eps: float) -> float:
    """delta of N(m1, s1^2) against N(m2, s2^2) at eps by brute-force quadrature of (p - e^eps q)_+
    (trapezoid rule on a fine grid over +-14 std; independent of the module's closed-form regions)."""
    y = np.linspace(min(m1 - 14 * s1, m2 - 14 * s2), max(m1 + 14 * s1, m2 + 14 * s2), 100_001)
    log_p, log_q = stats.norm.logpdf(y, m1, s1), stats.norm.logpdf(y, m2, s2)
    f = np.exp(log_p) * -np.expm1(np.minimum(eps + log_q - log_p, 0.0))
    return float(np.trapezoid(f, y))


def test_gaussian_published_regression_value():
    # google-research/federated one_shot_epe/empirical_privacy_estimation_test.py,
    # test_closed_form_null_gaussian_alt_regression ('high_dim'): dim = 2000, mu = std = dim**-0.5,
    # delta = 1e-2 -> 2.317789 (the N(0, 1/dim) null is used there for dim >= 1000).
    dim = 2000
    eps = gaussian_canary_epsilon(_cosines(dim**-0.5, dim**-0.5), dim, 1e-2)
    assert eps == pytest.approx(2.317789, rel=1e-6)


def test_gaussian_equal_distributions_give_zero():
    dim = 10_000
    assert gaussian_canary_epsilon(_cosines(0.0, dim**-0.5), dim, 1e-5) == 0.0
    # the two-point sample [-s, s] has ddof=1 std s*sqrt(2): matched to the null when s = 1/sqrt(2 dim)
    s = (2 * dim) ** -0.5
    assert gaussian_canary_epsilon([-s, s], dim, 1e-5) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-2])
def test_gaussian_equal_variance_is_the_gaussian_mechanism(ratio, delta):
    # N(0, s^2) vs N(mu, s^2) is a Gaussian mechanism with sensitivity / noise = mu / s: its exact
    # epsilon (Balle & Wang 2018) is dp_accounting.get_epsilon_gaussian(noise multiplier s / mu, delta).
    dim = 4096
    s = dim**-0.5
    eps = gaussian_canary_epsilon(_cosines(ratio * s, s), dim, delta)
    assert eps == pytest.approx(get_epsilon_gaussian(1.0 / ratio, delta), rel=1e-8)


def test_gaussian_equal_variance_agrees_with_pld_accountant():
    dim = 1024
    eps = gaussian_canary_epsilon(_cosines(dim**-0.5, dim**-0.5), dim, 1e-3)
    pld_eps = pld.PLDAccountant(value_discretization_interval=1e-3).compose(GaussianDpEvent(noise_multiplier=1.0)).get_epsilon(1e-3)
    assert eps == pytest.approx(pld_eps, rel=1e-3)
    assert eps == pytest.approx(3.13867, abs=1e-5)  # = get_epsilon_gaussian(1.0, 1e-3)


@pytest.mark.parametrize("eps_true", [0.5, 1.0, 5.0])
@pytest.mark.parametrize("diff", [-1e-12, 0.0, 1e-12])
def test_gaussian_nearly_equal_stds_are_stable(eps_true, diff):
    # google-research/federated test_epsilon_two_gaussians_stds_close: the noise calibrated to
    # (eps, delta) gives back eps, also when the two stds differ by 1e-12 (quadratic privacy loss
    # with a tiny leading coefficient).
    delta = 1e-5
    sigma = get_sigma_gaussian(eps_true, delta)
    assert audit._epsilon_two_gaussians(1.0 / sigma, 1.0 + diff, delta) == pytest.approx(eps_true, rel=1e-7)


def test_gaussian_increases_with_mu_and_is_symmetric():
    dim = 5000
    s = dim**-0.5
    eps = [gaussian_canary_epsilon(_cosines(f * s, s), dim, 1e-5) for f in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)]
    assert all(b > a + 0.1 for a, b in zip(eps, eps[1:]))
    assert gaussian_canary_epsilon(_cosines(-1.5 * s, s), dim, 1e-5) == pytest.approx(eps[3], rel=1e-9)


@pytest.mark.parametrize("mu, std, delta", [(1.0, 2.0, 1e-2), (2.0, 0.5, 1e-3), (0.5, 1.5, 1e-5), (0.0, 0.5, 1e-4)])
def test_gaussian_unequal_variances_match_quadrature(mu, std, delta):
    # at the returned eps the larger of the two hockey-stick divergences equals delta
    dim = 900
    s0 = dim**-0.5
    eps = gaussian_canary_epsilon(_cosines(mu * s0, std * s0), dim, delta)
    assert eps > 0.5
    worst = max(_hockey_stick(mu, std, 0.0, 1.0, eps), _hockey_stick(0.0, 1.0, mu, std, eps))
    assert worst == pytest.approx(delta, rel=1e-5)
    # and delta is exceeded slightly below it
    assert max(_hockey_stick(mu, std, 0.0, 1.0, 0.99 * eps), _hockey_stick(0.0, 1.0, mu, std, 0.99 * eps)) > 1.01 * delta


def test_gaussian_uses_ddof_1():
    # [-1, 1]: mean 0, sample std sqrt(2) with ddof=1 (1 with ddof=0); dim = 2 -> null N(0, 1/2).
    # Standardised by the null std: N(0, 1) vs N(0, 4) with ddof=1, vs N(0, 2) with ddof=0.
    eps = gaussian_canary_epsilon([-1.0, 1.0], dim=2, delta=1e-2)
    assert eps == pytest.approx(audit._epsilon_two_gaussians(0.0, 2.0, 1e-2), rel=1e-12)
    assert eps == pytest.approx(8.41216, abs=1e-5)
    assert abs(eps - audit._epsilon_two_gaussians(0.0, math.sqrt(2.0), 1e-2)) > 1.0


@pytest.mark.parametrize("cosines, dim, delta, match", [
    ([0.1, 0.2], 100, 0.0, r"delta must be in \(0, 1\), got 0.0"),
    ([0.1, 0.2], 100, 1.0, r"delta must be in \(0, 1\), got 1.0"),
    ([0.1, 0.2], 0, 1e-5, r"dim must be a positive integer .*got 0"),
    ([0.1, 0.2], 10.0, 1e-5, r"dim must be a positive integer .*got 10.0"),
    ([0.1], 100, 1e-5, r"cosines must hold at least 2 values .*got 1"),
    ([0.1, float("nan")], 100, 1e-5, r"cosines must all be finite"),
    ([[0.1, 0.2]], 100, 1e-5, r"cosines must be a 1-D sequence .*shape \(1, 2\)"),
    ([0.3, 0.3, 0.3], 100, 1e-5, r"cosines must not all be equal"),
])
def test_gaussian_rejects_bad_input(cosines, dim, delta, match):
    with pytest.raises(ValueError, match=match):
        gaussian_canary_epsilon(cosines, dim, delta)
