"""Empirical privacy auditing: turn canary statistics of one training run into an epsilon.

This module owns the arithmetic that converts what an auditor observed about
inserted canaries into an empirical epsilon; inserting the canaries and
measuring them belongs to the training code. It implements two published
methods:

* ``one_run_epsilon``: the high-confidence epsilon *lower bound* of Steinke,
  Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
  2023, arXiv:2305.08846), from the number of guesses and correct guesses an
  auditor made about which of m independently included canaries were in the
  training set. The p-value, including the delta term for (eps, delta)-DP, and
  the search over epsilon follow the algorithm printed in the paper's appendix.
* ``gaussian_canary_epsilon``: the one-shot epsilon *estimate* of Andrew,
  Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy
  Estimation for Federated Learning" (ICLR 2024, arXiv:2302.03098): a Gaussian
  fitted to the cosines between the final model change and each inserted
  canary direction is compared with the null distribution N(0, 1/dim) of the
  cosine with a random direction, and the epsilon of that pair of Gaussians at
  the given delta is returned (computed exactly from their privacy-loss
  distribution, as the paper's released code does).

Only numpy and scipy are used (no torch), so the functions are cheap to import
and to call from post-hoc analysis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import special, stats

__all__ = ["one_run_epsilon", "gaussian_canary_epsilon"]

# Width to which the one-run bisection narrows the bracket [eps_lo, eps_hi]. The
# paper's code halves [0, eps_max] 30 times, a final width of eps_max / 2**30
# (9.3e-10 * eps_max); a fixed width of 1e-9 is at least as fine for any eps_max >= 1.
ONE_RUN_EPS_TOL = 1e-9

# Relative width to which the two-Gaussian bisection narrows its bracket.
GAUSSIAN_EPS_RTOL = 1e-10


# --------------------------------------------------------------------------- validation helpers


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return int(value)


def _check_probability(name: str, value: object, *, low_open: bool, high_open: bool) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    lo_ok = x > 0 if low_open else x >= 0
    hi_ok = x < 1 if high_open else x <= 1
    if not (lo_ok and hi_ok):  # also rejects NaN
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


# --------------------------------------------------------------------------- one-run audit (Steinke et al.)


def _one_run_p_value(canaries: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """P-value of observing >= `correct` right guesses out of `guesses` under (eps, delta)-DP.

    beta = P[Binomial(r, q) >= v] with q = e^eps / (1 + e^eps); with delta > 0 the
    paper adds 2 m delta max_{i=1..v} P[v - i <= Binomial(r, q) <= v - 1] / i.
    The result is capped at 1 as in the paper.
    """
    q = float(special.expit(eps))  # accuracy of eps-DP randomized response, 1 / (1 + e^-eps)
    beta = float(stats.binom.sf(correct - 1, guesses, q))  # P[X >= v]
    if delta == 0.0 or correct == 0:
        return min(beta, 1.0)
    # window[i - 1] = P[v - i <= X <= v - 1], built by summing pmf(v-1), pmf(v-2), ... (no cancellation)
    window = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    spread = float(np.max(window / np.arange(1, correct + 1)))
    return min(beta + spread * delta * 2 * canaries, 1.0)


def one_run_epsilon(guesses: int, correct: int, canaries: int, delta: float, alpha: float = 0.05) -> float:
    """Empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

    Setting: each of ``canaries`` (m) canaries is included in training
    independently with probability 1/2; the auditor guesses in/out for
    ``guesses`` (r) of them, abstaining on the rest, and ``correct`` (v) guesses
    are right. The result is the largest epsilon at which the hypothesis "the
    training algorithm is (epsilon, delta)-DP" is rejected at significance
    ``alpha``, i.e. with confidence 1 - alpha the algorithm is *not*
    (epsilon, delta)-DP for any smaller epsilon.

    P-value (the paper's theorem for (eps, delta)-DP and the p-value function of
    its appendix code), with q = e^eps / (1 + e^eps) = expit(eps) and
    X ~ Binomial(r, q)::

        beta(eps)  = P[X >= v]
        gamma(eps) = max_{i = 1..v} P[v - i <= X <= v - 1] / i      (0 when v = 0)
        p(eps)     = min(1, beta(eps) + 2 m delta gamma(eps))

    The delta term enters exactly as in the paper's code: the window
    probabilities are accumulated from pmf(v - 1) downwards and the running
    maximum of window / i is scaled by 2 m delta (m is the number of canaries,
    not of guesses).

    Search (as in the paper's appendix algorithm): eps_lo = 0, eps_hi = 1;
    while p(eps_hi) < alpha, eps_hi += 1; then bisection keeps
    p(eps_lo) < alpha <= p(eps_hi) until eps_hi - eps_lo <= ``ONE_RUN_EPS_TOL``
    (1e-9, where the paper stops after 30 halvings, i.e. at eps_max / 2**30)
    and eps_lo is returned, so the value returned always has a p-value below
    alpha (it errs on the conservative side by less than the tolerance);
    results agree with the paper's algorithm to about 1e-8. beta is
    nondecreasing in eps (Binomial(r, q) grows stochastically with q) and
    p -> 1 as eps grows, so the bracket always closes. Like the paper, the
    bisection treats p as monotone in eps; the delta term is not provably
    monotone, so in general the value is the alpha-crossing that bisection
    finds (p was monotone on every eps grid we checked).

    Ties: an epsilon qualifies only when p(eps) < alpha strictly (p = alpha is
    not a rejection), as in the paper's code.

    Edge cases:
      * ``correct`` = 0 (including ``guesses`` = 0): p = 1 for every epsilon, so 0.0.
      * p(0) >= alpha (e.g. half of the guesses right): no epsilon qualifies, 0.0.
      * ``delta`` = 0: the pure-DP p-value, beta alone. With all r guesses
        right this is q^r < alpha, i.e. the closed form
        eps = -log(alpha^(-1/r) - 1): the ceiling for r guesses (about 5.81 for
        r = 1000, alpha = 0.05). delta > 0 only lowers the bound.

    Args:
        guesses: number of non-abstaining guesses r, 0 <= r <= canaries.
        correct: number of correct guesses v, 0 <= v <= guesses.
        canaries: number of canaries m, each included with probability 1/2.
        delta: the delta of the (eps, delta)-DP hypothesis, in [0, 1].
        alpha: significance level (1 - confidence), in (0, 1).

    Returns:
        The epsilon lower bound (>= 0.0).

    Raises:
        ValueError: counts not non-negative integers, ``correct`` > ``guesses``,
            ``guesses`` > ``canaries``, ``delta`` outside [0, 1] or ``alpha``
            outside (0, 1).

    >>> round(one_run_epsilon(1000, 1000, 1000, delta=0.0), 4)
    5.8091
    >>> one_run_epsilon(1000, 500, 1000, delta=1e-5)
    0.0
    """
    r = _check_count("guesses", guesses)
    v = _check_count("correct", correct)
    m = _check_count("canaries", canaries)
    if v > r:
        raise ValueError(f"correct must be <= guesses ({r}), got correct={v}: only guesses can be correct")
    if r > m:
        raise ValueError(f"guesses must be <= canaries ({m}), got guesses={r}: one guess per canary at most")
    delta = _check_probability("delta", delta, low_open=False, high_open=False)
    alpha = _check_probability("alpha", alpha, low_open=True, high_open=True)

    if v == 0 or _one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    eps_lo, eps_hi = 0.0, 1.0  # as in the paper, eps_lo stays at 0 while eps_hi steps up
    while _one_run_p_value(m, r, v, eps_hi, delta) < alpha:
        eps_hi += 1.0
    while eps_hi - eps_lo > ONE_RUN_EPS_TOL:
        mid = 0.5 * (eps_lo + eps_hi)
        if _one_run_p_value(m, r, v, mid, delta) < alpha:
            eps_lo = mid
        else:
            eps_hi = mid
    return eps_lo


# --------------------------------------------------------------------------- one-shot Gaussian estimate (Andrew et al.)


def _log_ndtr_upper(z: float) -> float:
    """log P[N(0, 1) > z], accurate in the far tail."""
    return float(special.log_ndtr(-z))


def _log_mass(region: tuple, mean: float, std: float) -> float:
    """log P[Y in region] for Y ~ N(mean, std^2); region as built by `_loss_region`."""
    kind = region[0]
    if kind == "all":
        return 0.0
    if kind == "none":
        return -math.inf
    if kind == "above":
        return _log_ndtr_upper((region[1] - mean) / std)
    if kind == "below":
        return float(special.log_ndtr((region[1] - mean) / std))
    zl, zr = (region[1] - mean) / std, (region[2] - mean) / std
    if kind == "outside":
        return float(np.logaddexp(special.log_ndtr(zl), _log_ndtr_upper(zr)))
    # "between": P[zl < Z < zr] from whichever tail is smaller, to avoid cancellation
    with np.errstate(divide="ignore"):
        if zl > 0:
            hi, lo = _log_ndtr_upper(zl), _log_ndtr_upper(zr)
        else:
            hi, lo = float(special.log_ndtr(zr)), float(special.log_ndtr(zl))
        if hi == -math.inf or lo >= hi:
            return -math.inf
        return hi + math.log1p(-math.exp(lo - hi))


def _loss_region(m1: float, s1: float, m2: float, s2: float, eps: float) -> tuple:
    """The set {y : log p1(y) - log p2(y) > eps} for p1 = N(m1, s1^2), p2 = N(m2, s2^2).

    The privacy loss is the quadratic a y^2 + b y + c with
    a = 1/(2 s2^2) - 1/(2 s1^2), b = m1/s1^2 - m2/s2^2,
    c = m2^2/(2 s2^2) - m1^2/(2 s1^2) + log(s2/s1).
    Roots use the cancellation-free form (q = -(b + sign(b) sqrt(disc)) / 2,
    roots q/a and k/q), so nearly equal variances (tiny a) keep an accurate
    finite root instead of losing it to rounding.
    """
    a = 0.5 / s2**2 - 0.5 / s1**2
    b = m1 / s1**2 - m2 / s2**2
    k = 0.5 * (m2 / s2) ** 2 - 0.5 * (m1 / s1) ** 2 + math.log(s2 / s1) - eps
    if a == 0.0:
        if b == 0.0:
            return ("all",) if k > 0 else ("none",)
        t = -k / b
        return ("above", t) if b > 0 else ("below", t)
    disc = b * b - 4.0 * a * k
    if disc <= 0.0:  # the quadratic never changes sign (a single touching point has measure 0)
        return ("all",) if a > 0 else ("none",)
    q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
    r1, r2 = sorted((q / a, k / q))
    return ("outside", r1, r2) if a > 0 else ("between", r1, r2)


def _log_hockey_stick(m1: float, s1: float, m2: float, s2: float, eps: float) -> float:
    """log of the smallest delta with P(S) <= e^eps Q(S) + delta for all S, P = N(m1, s1^2), Q = N(m2, s2^2).

    delta = P[L > eps] - e^eps Q[L > eps], L = log dP/dQ (the privacy-loss
    distribution), evaluated in log space; -inf when delta is 0.
    """
    region = _loss_region(m1, s1, m2, s2, eps)
    log_p = _log_mass(region, m1, s1)
    if log_p == -math.inf:
        return -math.inf
    gap = eps + _log_mass(region, m2, s2) - log_p
    if gap >= 0.0:
        return -math.inf
    return log_p + math.log1p(-math.exp(gap))


def _epsilon_two_gaussians(mu: float, std: float, delta: float) -> float:
    """Epsilon at `delta` between N(0, 1) and N(mu, std^2), symmetric in the two orders."""
    if mu == 0.0 and std == 1.0:
        return 0.0
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(_log_hockey_stick(mu, std, 0.0, 1.0, eps), _log_hockey_stick(0.0, 1.0, mu, std, eps)) - log_delta

    if excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:
            return math.inf
    while hi - lo > GAUSSIAN_EPS_RTOL * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_canary_epsilon(cosines: Iterable[float], dim: int, delta: float) -> float:
    """One-shot empirical epsilon from canary cosines (Andrew et al., ICLR 2024).

    Each inserted canary is a random direction in the ``dim``-dimensional
    parameter space; ``cosines`` holds the cosine between the final model change
    and each canary direction (sign chosen so that the model moving with the
    canary gives a positive cosine). Following the paper's estimator:

    1. Fit a Gaussian to the observed cosines: mu = mean(cosines) and
       sigma = sample standard deviation with ddof=1 (the unbiased variance,
       sum((c - mu)^2) / (k - 1) for k cosines). The paper's Algorithm 1 says
       "mean and std"; its released code (google-research/federated,
       one_shot_epe) takes mu and std as given and does not fix ddof, so ddof=1
       is this module's choice; for the hundreds of canaries used in practice
       the two differ by a factor sqrt(k / (k - 1)).
    2. Null distribution: the cosine of a random direction with a fixed vector,
       approximated by N(0, 1/dim) (exact as dim grows), always. The paper's
       released code does the same for dim >= 1000 but switches to the exact
       cosine law (density proportional to (1 - t^2)^((dim - 3) / 2)) and a
       threshold grid below dim = 1000, so for small models the two differ a
       little (its regression value at dim = 200, mu = std = dim**-0.5,
       delta = 1e-2 is 2.375326; N(0, 1/dim) gives 2.317789 at any dim).
    3. Return the epsilon of the pair N(0, 1/dim), N(mu, sigma^2) at ``delta``:
       the smallest eps >= 0 with
       max(D_eps(P || Q), D_eps(Q || P)) <= delta, where
       D_eps(P || Q) = P[L > eps] - e^eps Q[L > eps] and L = log dP/dQ is the
       privacy loss (the hockey-stick divergence, exact for (eps, delta)-DP of
       the pair). Both orders are taken, as in the reference code, so the
       estimate is symmetric in the sign of mu. Because the variances may
       differ, L is a quadratic in the outcome and {L > eps} is a half-line,
       two tails or an interval; its Gaussian masses are computed with
       log-CDFs (scipy.special.log_ndtr) and combined in log space, so tiny
       deltas and nearly equal variances stay accurate. With equal variances
       this is exactly the Gaussian mechanism of Balle & Wang (2018) with
       sensitivity / noise = mu sqrt(dim).

    Search: everything is first rescaled by sqrt(dim) (epsilon is invariant
    under a common affine map), so the null is N(0, 1). D_eps is
    nonincreasing in eps (its derivative is -e^eps Q[L > eps]), so if the pair
    already satisfies delta at eps = 0 the result is 0.0 (e.g. identical
    Gaussians); otherwise eps_hi doubles from 1 until D_eps <= delta and
    bisection narrows [eps_lo, eps_hi] to a relative width of
    ``GAUSSIAN_EPS_RTOL`` (1e-10); eps_hi (which satisfies delta) is returned.
    math.inf is returned only if no eps up to 1e12 satisfies delta.

    Args:
        cosines: the observed canary cosines, a 1-D sequence of at least 2
            finite numbers that are not all equal.
        dim: number of model parameters (dimension of the canary directions), >= 1.
        delta: target delta, in (0, 1). delta = 0 is refused: two Gaussians
            that differ have no finite epsilon at delta = 0.

    Returns:
        The estimated epsilon (>= 0.0).

    Raises:
        ValueError: ``cosines`` not 1-D, fewer than 2, not finite or with zero
            spread; ``dim`` not a positive integer; ``delta`` outside (0, 1).

    >>> round(gaussian_canary_epsilon([-1.0, 1.0], dim=2, delta=1e-2), 4)  # mean 0, std sqrt(2) vs N(0, 1/2)
    8.4122
    """
    c = np.asarray(cosines, dtype=float)
    if c.ndim != 1:
        raise ValueError(f"cosines must be a 1-D sequence of numbers, got an array of shape {c.shape}")
    if c.size < 2:
        raise ValueError(f"cosines must hold at least 2 values to fit a mean and a std, got {c.size}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"cosines must all be finite, got {c[~np.isfinite(c)][:5].tolist()} among them")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer (the number of model parameters), got {dim!r}")
    delta = _check_probability("delta", delta, low_open=True, high_open=True)
    mu = float(np.mean(c))
    sigma = float(np.std(c, ddof=1))
    if sigma == 0.0:
        raise ValueError(f"cosines must not all be equal (sample std is 0, all values {c[0]!r}): no Gaussian can be fitted")
    scale = math.sqrt(int(dim))  # null std 1/sqrt(dim) -> 1
    return _epsilon_two_gaussians(mu * scale, sigma * scale, delta)
