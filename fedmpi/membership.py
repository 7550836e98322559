"""Membership inference: who was in the training data, asked of a trained global model.

This module owns the attacks' arithmetic and the keyed splits the audit trains on.
It is pure numpy and scipy (no torch, no MPI, no files); the rank-0 driver that
trains the shadow federations and scores the models is
:mod:`fedmpi.leakage_audit`.

Attacks (each returns one score per unit; higher means "more likely a member"):

- :func:`loss_threshold_scores`: the loss-threshold attack of Yeom, Giacomelli,
  Fredrikson and Jha, "Privacy Risk in Machine Learning: Analyzing the Connection
  to Overfitting" (IEEE CSF 2018): a unit is called a member when the model's
  loss on it is below a threshold; the score is the negative loss, and the ROC
  sweeps every threshold;
- :func:`lira_online` and :func:`lira_offline`: the Likelihood Ratio Attack of
  Carlini, Chien, Nasr, Song, Terzis and Tramer, "Membership Inference Attacks
  From First Principles" (IEEE S&P 2022), on the logit-scaled confidence
  :func:`logit_confidence`, with Gaussians fitted to shadow models trained with
  (IN) and without (OUT) each unit.

Metrics: :func:`roc_curve`, :func:`auc`, :func:`tpr_at_fpr`, :func:`advantage`
(membership advantage, Yeom et al.'s TPR - FPR, maximised over thresholds).

Splits: :func:`target_keep` (the audited run: half of every client's examples of
each class, or half of the clients) and :func:`shadow_keep` (the shadows: every
unit in exactly half of them) draw which units (examples or whole clients) each
federation trains on, from keyed generators, so every rank computes the same
split; :func:`restrict` turns a split into the data a federation sees.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special

from . import seeding

ATTACKS = ("loss_threshold", "lira_offline", "lira_online")

# LiRA's Gaussians: standard deviations are floored here, so a unit whose shadows
# all gave the same confidence does not divide by zero.
MIN_STD = 1e-12


# --------------------------------------------------------------------------- scores from logits


def _logits_and_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"logits (N, classes) and labels (N,) must agree; got {z.shape} and {y.shape}")
    if z.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes; got {z.shape[1]}")
    return z, y


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy -log softmax(z)_y, float64 (N,)."""
    z, y = _logits_and_labels(logits, labels)
    return special.logsumexp(z, axis=1) - z[np.arange(len(y)), y]


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's logit scaling of the true-class confidence p = softmax(z)_y (Carlini et al. 2022):
    phi = log(p / (1 - p)), computed stably as z_y - logsumexp over the other classes' logits.
    Float64 (N,)."""
    z, y = _logits_and_labels(logits, labels)
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    return z[rows, y] - special.logsumexp(others, axis=1)


def per_unit(values: np.ndarray, unit_of_example: np.ndarray, units: int) -> np.ndarray:
    """The mean of per-example ``values`` over each unit (client-level membership: a client's
    statistic is the mean over its examples). ``values`` (..., N); returns (..., units)."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.bincount(unit_of_example, minlength=units).astype(np.float64)
    flat = values.reshape(-1, values.shape[-1])
    out = np.stack([np.bincount(unit_of_example, weights=row, minlength=units) for row in flat])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = out / counts
    return out.reshape(*values.shape[:-1], units)


# --------------------------------------------------------------------------- attacks


def loss_threshold_scores(loss: np.ndarray) -> np.ndarray:
    """Yeom et al. 2018: member when the loss is below a threshold; the score is -loss."""
    return -np.asarray(loss, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Gaussians:
    """Per unit: mean and standard deviation of the shadows' phi with the unit IN and OUT."""

    mean_in: np.ndarray
    std_in: np.ndarray
    mean_out: np.ndarray
    std_out: np.ndarray


def _fit(values: np.ndarray, mask: np.ndarray, variance: str) -> tuple[np.ndarray, np.ndarray]:
    counts = mask.sum(axis=0)
    if (counts < 1).any() or (variance == "per_example" and (counts < 2).any()):
        need = 2 if variance == "per_example" else 1
        raise ValueError(f"every unit needs at least {need} shadow(s) on each side; the fewest is {int(counts.min())}")
    mean = np.where(mask, values, 0.0).sum(axis=0) / counts
    squares = np.where(mask, (values - mean) ** 2, 0.0).sum(axis=0)
    if variance == "per_example":
        std = np.sqrt(squares / (counts - 1))
    elif variance == "global":
        dof = (counts - 1).sum()
        std = np.full(values.shape[1], np.sqrt(squares.sum() / dof) if dof > 0 else 0.0)
    else:
        raise ValueError(f"variance = {variance!r}: must be global or per_example")
    return mean, np.maximum(std, MIN_STD)


def fit_gaussians(shadow_phi: np.ndarray, shadow_in: np.ndarray, variance: str = "global") -> Gaussians:
    """LiRA's IN and OUT Gaussians from ``shadow_phi`` (S, U): each shadow's logit-scaled
    confidence on each unit, and ``shadow_in`` (S, U): whether that shadow trained on it.

    Means are per unit. Variance (a choice the paper leaves to the number of shadows:
    per-example variances with many shadows, one global variance with few):
    ``per_example``: the sample variance (ddof 1) of each unit's IN (OUT) values;
    ``global``: the pooled within-unit variance, i.e. the squared deviations of every
    IN (OUT) value from its own unit's mean, summed over all units and divided by
    sum(count - 1). Standard deviations are floored at :data:`MIN_STD`.
    """
    phi = np.asarray(shadow_phi, dtype=np.float64)
    keep = np.asarray(shadow_in, dtype=bool)
    if phi.ndim != 2 or keep.shape != phi.shape:
        raise ValueError(f"shadow_phi and shadow_in must both be (shadows, units); got {phi.shape} and {keep.shape}")
    mean_in, std_in = _fit(phi, keep, variance)
    mean_out, std_out = _fit(phi, ~keep, variance)
    return Gaussians(mean_in, std_in, mean_out, std_out)


def _log_normal_pdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def lira_online(target_phi: np.ndarray, fit: Gaussians) -> np.ndarray:
    """Online LiRA: the log likelihood ratio log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)."""
    phi = np.asarray(target_phi, dtype=np.float64)
    return _log_normal_pdf(phi, fit.mean_in, fit.std_in) - _log_normal_pdf(phi, fit.mean_out, fit.std_out)


def lira_offline(target_phi: np.ndarray, fit: Gaussians) -> np.ndarray:
    """Offline LiRA: the one-sided test against the OUT Gaussian alone. The paper's p-value
    is 1 - Phi((phi - mu_out) / s_out); the score returned is the z-value (phi - mu_out) / s_out,
    which orders the units the same way (a small p-value is a large z) without underflow."""
    phi = np.asarray(target_phi, dtype=np.float64)
    return (phi - fit.mean_out) / fit.std_out


# --------------------------------------------------------------------------- metrics


def _scores_and_members(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(member, dtype=bool).ravel()
    if s.shape != m.shape:
        raise ValueError(f"scores and member must have equal lengths; got {len(s)} and {len(m)}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are not")
    return s, m


def roc_curve(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of calling "member" every unit whose score is at least t, over every
    threshold t from +inf down: one point per distinct score (tied units enter together)
    after the (0, 0) point, ending at (1, 1). NaN arrays when either class is empty."""
    s, m = _scores_and_members(scores, member)
    positives, negatives = int(m.sum()), int((~m).sum())
    if positives == 0 or negatives == 0:
        return np.full(1, np.nan), np.full(1, np.nan)
    order = np.argsort(-s, kind="stable")
    s, m = s[order], m[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(m)[last_of_tie]
    fp = np.cumsum(~m)[last_of_tie]
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve by the trapezoid rule (ties count half, as in the
    Mann-Whitney statistic); NaN for an undefined curve."""
    if len(fpr) < 2:
        return float("nan")
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The largest true-positive rate of a threshold whose false-positive rate is at most
    ``max_fpr`` (Carlini et al.'s low-FPR metric). With N non-members the smallest FPR
    above 0 is 1/N, so below it this is the TPR at FPR 0."""
    if len(fpr) < 2:
        return float("nan")
    return float(tpr[fpr <= max_fpr].max())


def advantage(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Membership advantage (Yeom et al. 2018: TPR - FPR) of the best threshold, chosen
    knowing the membership: an upper bound on what any threshold on this score achieves.
    Under epsilon-DP it is at most e^epsilon - 1 (their Theorem 1)."""
    if len(fpr) < 2:
        return float("nan")
    return float(np.max(tpr - fpr))


# --------------------------------------------------------------------------- keyed splits


def target_keep(seed: int, labels: list[np.ndarray], level: str) -> list[np.ndarray]:
    """Which units the audited run trains on, per client (``labels``: each client's labels):
    one bool array per client over its examples (all equal at client level).

    Half of the units, drawn independently of how many shadows there are:
    ``example``: in every client, half of the examples of each class, a keyed
    permutation of them keyed by (seed, "membership", 0, client) (an odd one out goes
    in or out by a coin from the same key). Stratifying by client and class keeps the
    members' label mix equal to the non-members' (and every client's mix as it was), so
    a model that only learned the class prior of its training data says nothing about
    membership: with a plain coin per example, the chance imbalance of a few hundred
    coins let a diverged DP model's per-class losses score an AUC of 0.6 (measured).
    ``client``: half of the clients, the first of a keyed permutation (seed,
    "membership", 0), the odd one out by a coin.
    """
    if level == "example":
        out = []
        for c, y in enumerate(labels):
            g = seeding.rng(seed, "membership", 0, c)
            keep = np.zeros(len(y), dtype=bool)
            for k in np.unique(y):
                members = g.permutation(np.flatnonzero(y == k))
                keep[members[:_half(len(members), g)]] = True
            out.append(keep)
        return out
    if level == "client":
        g = seeding.rng(seed, "membership", 0)
        keep = np.zeros(len(labels), dtype=bool)
        keep[g.permutation(len(labels))[:_half(len(labels), g)]] = True
        return [np.full(len(y), bool(k)) for y, k in zip(labels, keep)]
    raise ValueError(f"level = {level!r}: must be example or client")


def _half(n: int, g: np.random.Generator) -> int:
    """n // 2, plus one by a fair coin when n is odd."""
    return n // 2 + (int(g.random() < 0.5) if n % 2 else 0)


def shadow_keep(seed: int, sizes: np.ndarray, level: str, shadows: int) -> list[np.ndarray]:
    """Which units each shadow federation trains on, per client: (shadows, n_c) bool arrays.

    Balanced as in Carlini et al.'s experiments: every unit is IN for exactly
    shadows // 2 of the shadows (the shadows holding the smallest shadows // 2 of its
    keyed uniform draws) and OUT for the rest, so every unit has both kinds. Draws are
    keyed by (seed, "membership", 1, client) (example) or (seed, "membership", 1) (client)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if shadows < 2:
        raise ValueError(f"shadows = {shadows}: must be >= 2")
    half = shadows // 2

    def balanced(draws: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(draws, axis=0, kind="stable"), axis=0, kind="stable") < half

    if level == "example":
        return [balanced(seeding.rng(seed, "membership", 1, c).random((shadows, int(n)))) for c, n in enumerate(sizes)]
    if level == "client":
        keep = balanced(seeding.rng(seed, "membership", 1).random((shadows, len(sizes))))
        return [np.repeat(keep[:, c:c + 1], int(n), axis=1) for c, n in enumerate(sizes)]
    raise ValueError(f"level = {level!r}: must be example or client")


def shadow_seed(seed: int, index: int) -> int:
    """The experiment seed of shadow federation ``index`` (1-based), keyed by (seed, "shadow",
    index): its initial model, cohorts, batch orders and noise are its own."""
    return int(seeding.seed_sequence(seed, "shadow", index).generate_state(1, np.uint32)[0])


def restrict(data, keep: list[np.ndarray]):
    """The data a federation sees when client c trains only on its examples where
    ``keep[c]`` is True (a client with none sends a zero update of weight 0). ``data`` is
    a :class:`fedmpi.data.FederatedData`; the result shares its arrays and remembers the
    unrestricted data as ``full``."""
    full = data.full if data.full is not None else data
    if len(keep) != full.num_clients:
        raise ValueError(f"keep holds {len(keep)} clients; the data have {full.num_clients}")
    sizes = np.array([int(np.count_nonzero(k)) for k in keep], dtype=np.int64)
    if full.generate is not None:
        def generate(cid: int, full=full, keep=keep) -> tuple:
            x, y = full.client(cid)
            return x[keep[cid]], y[keep[cid]]

        return dataclasses.replace(full, generate=generate, _cache={}, full=full, sizes=sizes)
    indices = [idx[k] for idx, k in zip(full.client_indices, keep)]
    return dataclasses.replace(full, client_indices=indices, _cache={}, full=full, sizes=sizes)
