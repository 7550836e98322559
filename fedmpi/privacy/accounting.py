"""Privacy accounting: epsilon, noise calibration, a run's accountant, the DP-SGD schedule.

Accounting uses Google's dp-accounting: RDP for per-round tracking (fast),
PLD for the reported final epsilon where the event allows it.

RDP is evaluated on dp-accounting's own default order grid (fractional orders
1.1..10.9, integers 11..63, and 128..1024), so an RDP epsilon here equals a
direct dp-accounting call with its default orders. The RDP of a step does not
depend on how many steps follow, and RDP composes by addition, so the per-step
RDP vector of each (noise, sampling) event is computed once and cached; the
epsilon after T steps is then dp-accounting's conversion of T times that vector.
The vector costs 50-250 ms on this grid (the fractional orders are series
summations); the conversion about 0.2 ms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np

# dp-accounting's default RDP orders (DEFAULT_RDP_ORDERS of dp_accounting.rdp): fine
# fractional orders where small epsilons are decided, integers above.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])

# Integer orders, about 6x faster to evaluate than RDP_ORDERS and up to 14% looser: used
# only to bracket the noise search before PLD calibration, where any upper bound will do
# (it also keeps the noise that PLD calibration finds what it was before the fine grid).
BRACKET_ORDERS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256)

# Above this (RDP) epsilon the final report stays with RDP instead of PLD (see RunAccountant.final).
PLD_MAX_EPSILON = 64.0


def dp_schedule(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, DP-SGD steps per participation) for a client holding ``num_samples``."""
    if num_samples <= 0:
        return 0.0, 0
    return min(1.0, batch_size / num_samples), epochs * max(1, round(num_samples / batch_size))


def _quiet_absl() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)


def _event(noise_multiplier: float, sample_rate: float, population: int | None = None, sample_size: int | None = None):
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if population is not None:
        return dp_event.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
    if sample_rate >= 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(sample_rate, gaussian)


def make_accountant(accountant: str, replace_one: bool = False, orders: tuple = RDP_ORDERS):
    """A fresh dp-accounting accountant: ``rdp`` (with ``orders``) or ``pld``."""
    from dp_accounting import NeighboringRelation, pld, rdp

    _quiet_absl()
    relation = NeighboringRelation.REPLACE_ONE if replace_one else NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "rdp":
        return rdp.RdpAccountant(list(orders), neighboring_relation=relation)
    if accountant == "pld":
        return pld.PLDAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, population: int | None, sample_size: int | None,
                  replace_one: bool, orders: tuple) -> np.ndarray:
    """The RDP vector (one value per order) of one step of the event, from dp-accounting.

    dp-accounting has no public call for it: an accountant composes the event once and
    its RDP vector is read (``_rdp``: what ``compose`` adds, count times, for each event).
    tests/test_privacy.py checks that epsilons from it equal direct library calls."""
    acc = make_accountant("rdp", replace_one, orders)
    acc.compose(_event(noise_multiplier, sample_rate, population, sample_size), 1)
    vector = np.array(acc._rdp, dtype=np.float64)
    vector.setflags(write=False)
    return vector


def _rdp_epsilon(per_step: np.ndarray, steps: int, delta: float, orders: tuple) -> float:
    """dp-accounting's RDP-to-epsilon conversion of ``steps`` composed steps."""
    from dp_accounting.rdp import compute_epsilon

    return float(compute_epsilon(np.array(orders), int(steps) * per_step, delta)[0])


@lru_cache(maxsize=65536)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
            orders: tuple = RDP_ORDERS) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps (add/remove-one
    neighbours), from dp-accounting's RDP (on ``orders``) or PLD accountant. 0 for 0
    steps; infinite without noise."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(_rdp_per_step(noise_multiplier, sample_rate, None, None, False, orders), steps, delta,
                            orders)
    acc = make_accountant(accountant)
    acc.compose(_event(noise_multiplier, sample_rate), int(steps))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=4096)
def epsilon_without_replacement(noise_multiplier: float, population: int, sample_size: int, steps: int,
                                delta: float) -> float:
    """Epsilon of a sum with L2 sensitivity S and noise std ``noise_multiplier`` x S, over
    ``steps`` samples of fixed size drawn without replacement (replace-one
    neighbours, so the sum's sensitivity is 2S: the Gaussian event's multiplier is
    noise_multiplier / 2). RDP only: dp-accounting's PLD does not support it."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    per_step = _rdp_per_step(noise_multiplier / 2, 0.0, population, sample_size, True, RDP_ORDERS)
    return _rdp_epsilon(per_step, steps, delta, RDP_ORDERS)


@lru_cache(maxsize=4096)
def epsilon_local(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``releases`` Gaussian releases of one clipped update (local DP: any
    two datasets of a client give updates at most 2S apart, so the multiplier
    relative to that sensitivity is noise_multiplier / 2; no sampling amplification)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(_rdp_per_step(noise_multiplier / 2, 1.0, None, None, True, RDP_ORDERS), releases, delta,
                            RDP_ORDERS)
    acc = make_accountant(accountant, replace_one=True)
    acc.compose(_event(noise_multiplier / 2, 1.0), int(releases))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
                    eps_fn: Callable[[float], float] | None = None, rtol: float = 1e-3) -> float:
    """The noise multiplier whose epsilon is at most ``target_epsilon`` and within
    ``rtol`` of it (relative).

    Brackets the answer by doubling and halving from 1 (from the RDP answer on
    :data:`BRACKET_ORDERS` when the accountant is PLD: PLD is tighter, so it needs no
    more noise than RDP), then refines with the Illinois variant of regula falsi on log(epsilon) versus
    log(sigma), which needs a handful of accountant calls.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    fn = eps_fn or (lambda sigma: epsilon(sigma, sample_rate, steps, delta, accountant))
    start = 1.0
    if accountant == "pld" and eps_fn is None:
        start = calibrate_noise(target_epsilon, sample_rate, steps, delta, rtol=rtol,
                                eps_fn=lambda sigma: epsilon(sigma, sample_rate, steps, delta, "rdp", BRACKET_ORDERS))
    hi = start
    while fn(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    lo = hi / 2
    while fn(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            return hi
    target = math.log(target_epsilon)
    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = math.log(fn(lo)) - target, math.log(fn(hi)) - target  # > 0, <= 0
    side = 0
    for _ in range(100):
        if f_hi >= math.log1p(-rtol) or x_hi - x_lo < 1e-12:
            break
        x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo)
        f = math.log(fn(math.exp(x))) - target
        if f > 0:
            x_lo, f_lo = x, f
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            x_hi, f_hi = x, f
            if side == 1:
                f_lo /= 2
            side = 1
    return math.exp(x_hi)


# --------------------------------------------------------------------------- a run's budget


def expected_participations(rounds: int, per_round: int, total: int) -> int:
    """Rounds a client takes part in: all of them when every client is in every
    cohort, else the expectation rounded up."""
    return rounds if per_round >= total else math.ceil(rounds * per_round / total)


class RunAccountant:
    """What a run has spent so far, from the cohorts the server drew.

    ``after_round`` tracks epsilon with RDP (cheap, every round); ``final`` gives
    the reported epsilon with the configured accountant (PLD by default). For
    sample-level DP each client has its own sample rate q = B / n and step count,
    so epsilon is per client: the max and the median over all clients are
    reported (clients never sampled have spent nothing).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.p = cfg.privacy
        total = cfg.clients.total
        self.participations = np.zeros(total, dtype=np.int64)
        self.sample_rate = np.zeros(total)
        self.steps = np.zeros(total, dtype=np.int64)  # sample mode: DP-SGD steps so far
        self.eps = np.zeros(total)
        self.rounds = 0

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a checkpoint stores; :meth:`load_state` puts them back."""
        return {"participations": self.participations, "sample_rate": self.sample_rate, "steps": self.steps,
                "eps": self.eps, "rounds": np.array([self.rounds], dtype=np.int64)}

    def load_state(self, state: dict) -> None:
        self.participations[:] = state["participations"]
        self.sample_rate[:] = state["sample_rate"]
        self.steps[:] = state["steps"]
        self.eps[:] = state["eps"]
        self.rounds = int(np.asarray(state["rounds"]).reshape(-1)[0])

    def _central(self, rounds: int, accountant: str) -> float:
        c, p = self.cfg.clients, self.p
        if c.sampling == "poisson":
            return epsilon(p.noise_multiplier, c.per_round / c.total, rounds, p.delta, accountant)
        return epsilon_without_replacement(p.noise_multiplier, c.total, c.per_round, rounds, p.delta)

    def after_round(self, cohort: np.ndarray, num_samples: np.ndarray) -> tuple[float, float]:
        """Account one round; return (epsilon, median over clients) by RDP."""
        p, t = self.p, self.cfg.train
        self.rounds += 1
        self.participations[cohort] += 1
        if p.mode == "client_central":
            value = self._central(self.rounds, "rdp")
            self.eps[:] = value
            return value, value
        for cid, n in zip(cohort.tolist(), num_samples.tolist()):
            if p.mode == "sample":
                q, steps = dp_schedule(int(n), t.batch_size, t.epochs)
                self.sample_rate[cid] = q
                self.steps[cid] += steps
                self.eps[cid] = epsilon(p.noise_multiplier, q, int(self.steps[cid]), p.delta, "rdp")
            else:
                self.eps[cid] = epsilon_local(p.noise_multiplier, int(self.participations[cid]), p.delta, "rdp")
        return float(self.eps.max()), float(np.median(self.eps))

    def final(self, max_candidates: int = 16) -> tuple[float, float, str]:
        """(epsilon, median over clients, accountant used) with the configured accountant.

        With PLD and many distinct clients, PLD is run for the ``max_candidates``
        clients with the largest RDP epsilon and for the RDP-median client. Where
        RDP already gives more than :data:`PLD_MAX_EPSILON` (almost no noise), the
        RDP value is reported: PLD's discretisation of such a loss would need
        gigabytes, and the number carries no useful guarantee either way."""
        p = self.p
        acc = p.accountant
        rdp_max = float(self.eps.max())
        if acc == "pld" and rdp_max > PLD_MAX_EPSILON:
            acc = "rdp"
        if p.mode == "client_central":
            if self.cfg.clients.sampling != "poisson":
                acc = "rdp"
            value = self._central(self.rounds, acc)
            return value, value, acc
        if acc == "rdp":
            return rdp_max, float(np.median(self.eps)), acc
        order = np.argsort(self.eps, kind="stable")
        median_client = order[len(order) // 2]
        candidates = list(order[::-1][:max_candidates]) + [median_client]

        def pld_eps(cid: int) -> float:
            if p.mode == "sample":
                return epsilon(p.noise_multiplier, float(self.sample_rate[cid]), int(self.steps[cid]), p.delta, "pld")
            return epsilon_local(p.noise_multiplier, int(self.participations[cid]), p.delta, "pld")

        values = {int(c): pld_eps(int(c)) for c in candidates}
        return max(values.values()), values[int(median_client)], acc


def _worst_schedules(client_sizes: np.ndarray, batch_size: int, epochs: int, rounds: int, target_epsilon: float,
                     delta: float, keep: int = 3) -> list[tuple[float, int]]:
    """The (sample rate q, steps over the run) of the clients that may spend most under
    DP-SGD. A client of n examples runs epochs x round(n / B) steps a participation at
    q = B / n: a smaller client samples more often, a larger one takes more steps, so
    the smallest client is not always the one that spends most (with B = 10, 44
    examples give 4 steps at q = 0.227, 46 give 5 at q = 0.217, and the second spends
    more). The candidates are the schedules no other one dominates (a larger q and more
    steps); of those, the ``keep`` that spend most under RDP at the noise RDP
    calibrates ``target_epsilon`` for (RDP is cheap; the caller calibrates with the
    run's accountant on these). A client without examples never spends privacy."""
    schedules = {dp_schedule(int(n), batch_size, epochs) for n in np.unique(client_sizes[client_sizes > 0])}
    if not schedules:
        return [(0.0, 0)]
    front = sorted((q, steps * rounds) for q, steps in schedules
                   if not any(q2 >= q and s2 >= steps and (q2, s2) != (q, steps) for q2, s2 in schedules))
    if len(front) <= keep:
        return front
    at = calibrate_noise(target_epsilon, 0.0, 0, delta, "rdp",
                         eps_fn=lambda z: max(epsilon(z, q, s, delta, "rdp") for q, s in front))
    front.sort(key=lambda qs: epsilon(at, qs[0], qs[1], delta, "rdp"), reverse=True)
    return sorted(front[:keep])


def calibrate_for_run(cfg, client_sizes: np.ndarray) -> float:
    """The noise multiplier that meets ``privacy.target_epsilon`` for this run.

    sample: for the client that spends most, each taking part in
    :func:`expected_participations` rounds (:func:`_worst_schedules`);
    client_central: the cohort sampling rate over all rounds; client_local: the
    expected participations.
    """
    p, c = cfg.privacy, cfg.clients
    acc = p.accountant
    rounds = expected_participations(cfg.rounds, c.per_round, c.total)
    if p.mode == "sample":
        schedules = _worst_schedules(client_sizes, cfg.train.batch_size, cfg.train.epochs, rounds, p.target_epsilon,
                                     p.delta)
        if len(schedules) == 1:
            (q, steps), = schedules
            return calibrate_noise(p.target_epsilon, q, steps, p.delta, acc)
        return calibrate_noise(p.target_epsilon, 0.0, 0, p.delta, acc,
                               eps_fn=lambda z: max(epsilon(z, q, steps, p.delta, acc) for q, steps in schedules))
    if p.mode == "client_local":
        return calibrate_noise(p.target_epsilon, 1.0, rounds, p.delta, acc,
                               eps_fn=lambda z: epsilon_local(z, rounds, p.delta, acc))
    if c.sampling == "poisson":
        return calibrate_noise(p.target_epsilon, c.per_round / c.total, cfg.rounds, p.delta, acc)
    return calibrate_noise(p.target_epsilon, 0.0, cfg.rounds, p.delta, "rdp",
                           eps_fn=lambda z: epsilon_without_replacement(z, c.total, c.per_round, cfg.rounds, p.delta))
