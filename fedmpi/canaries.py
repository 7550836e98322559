"""Canaries inside a run, and the audit they give at its end (docs/privacy.md, "Auditing").

Two kinds, each turned into an epsilon by :mod:`fedmpi.audit`:

- :class:`ExampleCanaries`, ``audit.canaries``: the one-run audit of DP-SGD of
  Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
  (NeurIPS 2023). m canaries, each included with probability 1/2, each held by
  one client (drawn uniformly over all ``clients.total`` clients) and sampled
  like that client's own examples: in every DP-SGD step of the client, with the
  client's rate q = B / n, from its own key. White-box ``dirac`` canaries add a
  gradient of norm C on one coordinate of their own (distinct coordinates, value
  +C) to the clipped per-example sum, before the noise; the score is how far the
  global model moved against that gradient over the run, w_0[k] - w_T[k].
  Black-box ``input`` canaries are one of the holding client's own examples
  with a wrong label (uniform over the other classes), clipped to C like every
  example; the score is minus its cross-entropy on the final model. The k
  highest scores are guessed "included", the k lowest "not included", the rest
  abstain (k fixed in advance); :func:`fedmpi.audit.one_run_epsilon` turns the
  number of right guesses into the lower bound.
- :class:`ClientCanaries`, ``audit.client_canaries``: the one-shot estimate of
  DP-FedAvg of Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot
  Empirical Privacy Estimation for Federated Learning" (ICLR 2024). m canary
  clients (ids ``clients.total + j``), each inserted with probability 1/2; an
  inserted canary takes part in exactly ``repeats`` rounds (default 1), one in
  each of ``repeats`` equal blocks of the planned rounds, spread evenly over its
  block by a keyed shuffle (the paper's released code presents each canary a
  fixed number of times, ``canary_repeats``, by shuffling), or with
  ``repeats: 0`` in each round with probability per_round / total (the rate of
  an ordinary client), and sends a fixed random unit direction u_j scaled to
  ``scale`` x S, past the clip norm S. Rank 0 inserts their rows after
  the real cohort's (central mode clips them like every row; in local mode the
  canary clips and noises its own row, as a client does). Two estimates, from the
  cosines of every canary direction with the model change:
  the final model change w_T - w_0 (the inserted canaries' cosines against the
  null N(0, 1/d): :func:`fedmpi.audit.gaussian_canary_epsilon`), and, for an
  adversary who sees every round, the maximum over rounds of the cosine with
  each round's change w_t - w_{t-1}, whose null is fitted to the canaries that
  were not inserted, as the paper's code does with its unseen canaries (both
  sets are standardised by the null's mean and std, ddof = 1, and passed to
  ``gaussian_canary_epsilon`` with dim = 1, which is its N(0, 1) null).

All draws are keyed (``seeding.rng(seed, "audit", ...)``), so the canaries are
the same on every rank and for any rank count. Without an ``audit`` section none
of this exists and a run computes exactly what it computed before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import seeding
from .privacy.client_level import privatise_update
from .protocol import RECORD
from .results import DatasetSpec
from .rounds import Updates
from .schema import Config

# the second key of every "audit" draw: what it is for
EXAMPLE_DEFINITION, EXAMPLE_SAMPLING, CLIENT_DEFINITION, CLIENT_DIRECTION, CLIENT_PARTICIPATION, CLIENT_SCHEDULE = range(6)

EXAMPLE_GROUP = "audit/canaries"
CLIENT_GROUP = "audit/client_canaries"


# /audit datasets: (name, one entry per canary (else a scalar), dtype, description)
EXAMPLE_FIELDS = (
    ("included", True, "bool", "canary j was included in training (probability 1/2, keyed by the seed)"),
    ("client_id", True, "i8", "the client that holds canary j"),
    ("coordinate", True, "i8", "dirac: the model coordinate of canary j's gradient (+C); -1 for input"),
    ("example", True, "i8", "input: index of canary j among its client's examples (-1: dirac, or a client without "
                            "examples)"),
    ("label", True, "i8", "input: the wrong label canary j carries; -1 for dirac"),
    ("score", True, "f8", "dirac: w_0 - w_T at its coordinate; input: minus its cross-entropy on the final model "
                          "(NaN until the run finishes)"),
    ("guess", True, "i1", "1: guessed included (k top scores), -1: guessed not (k bottom), 0: abstained"),
    ("count", False, "i8", "m, the number of canaries"),
    ("k", False, "i8", "guesses on each side (k top, k bottom), fixed before the run"),
    ("guesses", False, "i8", "guesses made, 2k"),
    ("correct", False, "i8", "right guesses (0 until the run finishes)"),
    ("alpha", False, "f8", "significance: the bound holds with probability 1 - alpha"),
    ("delta", False, "f8", "the delta the bound is for (privacy.delta)"),
    ("epsilon_lower_bound", False, "f8", "one-run epsilon lower bound (Steinke et al. 2023); NaN until the run "
                                         "finishes"),
)
CLIENT_FIELDS = (
    ("included", True, "bool", "canary client j was inserted (probability 1/2, keyed by the seed)"),
    ("participations", True, "i8", "rounds canary client j took part in (0 until the run finishes)"),
    ("final_cosine", True, "f8", "cosine of canary j's direction with the final model change w_T - w_0"),
    ("max_cosine", True, "f8", "maximum over rounds of the cosine with the round's model change"),
    ("count", False, "i8", "canary clients m"),
    ("dim", False, "i8", "d, the dimension of the canary directions"),
    ("scale", False, "f8", "a canary's update norm, in units of the clip norm S"),
    ("delta", False, "f8", "the delta the estimates are for (privacy.delta)"),
    ("epsilon_final", False, "f8", "estimate from the final model (Andrew et al. 2024; NaN until the run finishes, "
                                   "or with fewer than 2 inserted canaries)"),
    ("epsilon_max_cosine", False, "f8", "estimate from the maximum cosine over rounds, null fitted to the canaries "
                                        "not inserted"),
    ("repeats", False, "i8", "rounds an inserted canary takes part in (audit.client_canaries.repeats; 0: sampled each "
                             "round at the clients' rate)"),
)


def _specs(group: str, count: int, fields: tuple) -> dict[str, DatasetSpec]:
    return {f"{group}/{name}": DatasetSpec((count,) if per_canary else (), dtype, doc)
            for name, per_canary, dtype, doc in fields}


def _write(writer, group: str, **values) -> None:
    for name, value in values.items():
        writer.write(f"{group}/{name}", value)


def resolved_k(count: int, k: int | None) -> int:
    """Guesses on each side: ``k``, or count // 10 (at least 1) when not given."""
    return k if k is not None else max(1, count // 10)


# --------------------------------------------------------------------------- example-level (DP-SGD)


@dataclass
class CanaryShare:
    """The included canaries one client holds in one round, and the generator that
    samples them in its DP-SGD steps. ``coordinates`` (dirac) or ``x``, ``y`` (input)."""

    indices: np.ndarray
    rng: np.random.Generator
    coordinates: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    def sample(self, rate: float) -> np.ndarray:
        """Which of the held canaries one step uses: each with probability ``rate``."""
        return np.flatnonzero(self.rng.random(len(self.indices)) < rate)


class ExampleCanaries:
    """The canaries of ``audit.canaries``: who holds them, what they are, and the audit.

    Built the same on every rank from the config (and, for ``input`` canaries, the
    holding clients' own data, read when first needed). ``size``: the model's d."""

    def __init__(self, cfg: Config, data, size: int):
        a = cfg.audit.canaries
        self.cfg, self.data, self.size = cfg, data, size
        self.count, self.kind, self.alpha = a.count, a.kind, a.alpha
        self.k = resolved_k(a.count, a.k)
        g = seeding.rng(cfg.seed, "audit", EXAMPLE_DEFINITION)
        self.included = g.random(self.count) < 0.5
        self.client_id = g.integers(0, cfg.clients.total, size=self.count).astype(np.int64)
        if self.kind == "dirac":
            self.coordinate = g.choice(size, size=self.count, replace=False).astype(np.int64)
        else:
            self.coordinate = np.full(self.count, -1, dtype=np.int64)
            self._pick, self._shift = g.random(self.count), g.random(self.count)
        self.example = np.full(self.count, -1, dtype=np.int64)
        self.label = np.full(self.count, -1, dtype=np.int64)
        self._resolved: set[int] = set()
        self.held: dict[int, np.ndarray] = {}
        for j in np.flatnonzero(self.included):
            self.held.setdefault(int(self.client_id[j]), []).append(int(j))
        self.held = {cid: np.array(js, dtype=np.int64) for cid, js in self.held.items()}

    def _resolve_inputs(self, cid: int) -> None:
        """Input canaries held by ``cid`` (included or not): which of its examples, which wrong label."""
        if cid in self._resolved:
            return
        self._resolved.add(cid)
        mine = np.flatnonzero(self.client_id == cid)
        _, y = self.data.client(cid)
        if not len(y) or not len(mine):
            return
        classes = self.data.num_classes
        self.example[mine] = np.minimum((self._pick[mine] * len(y)).astype(np.int64), len(y) - 1)
        true = y[self.example[mine]].astype(np.int64)
        self.label[mine] = (true + 1 + (self._shift[mine] * (classes - 1)).astype(np.int64)) % classes

    def share(self, round_index: int, client_id: int) -> CanaryShare | None:
        """The included canaries ``client_id`` trains with in ``round_index`` (None: none)."""
        indices = self.held.get(int(client_id))
        if indices is None:
            return None
        rng = seeding.rng(self.cfg.seed, "audit", EXAMPLE_SAMPLING, round_index, client_id)
        if self.kind == "dirac":
            return CanaryShare(indices, rng, coordinates=self.coordinate[indices])
        self._resolve_inputs(int(client_id))
        indices = indices[self.example[indices] >= 0]
        if not len(indices):
            return None
        x, _ = self.data.client(int(client_id))
        return CanaryShare(indices, rng, x=x[self.example[indices]], y=self.label[indices])

    # ---- rank 0: the record and the audit

    def specs(self) -> dict[str, DatasetSpec]:
        return _specs(EXAMPLE_GROUP, self.count, EXAMPLE_FIELDS)

    def write_definition(self, writer) -> None:
        """What is known before training: the canaries and the audit's parameters."""
        if self.kind == "input":
            for cid in np.unique(self.client_id).tolist():
                self._resolve_inputs(int(cid))
        _write(writer, EXAMPLE_GROUP, included=self.included, client_id=self.client_id, coordinate=self.coordinate,
               example=self.example, label=self.label, count=self.count, k=self.k, guesses=2 * self.k,
               alpha=self.alpha, delta=self.cfg.privacy.delta)

    def scores(self, initial: np.ndarray, final: np.ndarray, model) -> np.ndarray:
        """Each canary's score (higher: more likely included); -inf where it cannot be scored."""
        if self.kind == "dirac":
            k = self.coordinate
            return initial[k].astype(np.float64) - final[k].astype(np.float64)
        import torch
        import torch.nn.functional as F

        for cid in np.unique(self.client_id).tolist():
            self._resolve_inputs(int(cid))
        scores = np.full(self.count, -np.inf)
        usable = np.flatnonzero(self.example >= 0)
        if len(usable):
            x = np.stack([self.data.client(int(self.client_id[j]))[0][self.example[j]] for j in usable])
            model.set_weights(final)
            with torch.no_grad():
                logits = model.module(torch.from_numpy(x).to(model.device))
                loss = F.cross_entropy(logits, torch.from_numpy(self.label[usable]).to(model.device), reduction="none")
            scores[usable] = -loss.double().cpu().numpy()
        return scores

    def finish(self, initial: np.ndarray, final: np.ndarray, model, writer) -> str:
        """Score, guess, bound; write them; return the part of the final privacy line."""
        from .audit import one_run_epsilon  # scipy: rank 0, at the end only

        scores = self.scores(initial, final, model)
        ranked = np.nan_to_num(scores, nan=-np.inf)
        order = np.argsort(-ranked, kind="stable")  # ties: the lower canary index ranks higher
        guess = np.zeros(self.count, dtype=np.int8)
        guess[order[:self.k]] = 1
        guess[order[self.count - self.k:]] = -1
        correct = int(((guess == 1) & self.included).sum() + ((guess == -1) & ~self.included).sum())
        bound = one_run_epsilon(2 * self.k, correct, self.count, self.cfg.privacy.delta, self.alpha)
        _write(writer, EXAMPLE_GROUP, score=scores, guess=guess, correct=correct, epsilon_lower_bound=bound)
        return (f"one-run audit lower bound {bound:.3g} ({self.count} {self.kind} canaries, {correct}/{2 * self.k} "
                f"guesses right, {100 * (1 - self.alpha):g}%)")


# --------------------------------------------------------------------------- client-level (DP-FedAvg)


def schedule(seed: int, count: int, repeats: int, rounds: int) -> np.ndarray:
    """The rounds each of ``count`` canary clients is presented in: (count, repeats) int64.

    Andrew et al.'s released code presents every canary a fixed number of times
    (``canary_repeats``) by cycling through ``repeats`` shuffled orders of the canaries
    spread evenly over the rounds. Here pass p covers the rounds
    [p T // repeats, (p + 1) T // repeats) of the T planned rounds (blocks that do not
    overlap, so the ``repeats`` rounds of a canary are distinct), and canary j, at
    position i of the pass's keyed permutation, takes round start + i L // count of
    its block of L rounds: every round of a block gets count / L canaries, to one."""
    out = np.empty((count, repeats), dtype=np.int64)
    for p in range(repeats):
        start, stop = p * rounds // repeats, (p + 1) * rounds // repeats
        position = np.empty(count, dtype=np.int64)
        position[seeding.rng(seed, "audit", CLIENT_SCHEDULE, p).permutation(count)] = np.arange(count)
        out[:, p] = start + position * (stop - start) // count
    return out


class ClientCanaries:
    """The canary clients of ``audit.client_canaries`` on rank 0: their rows each round,
    the cosines they leave in the model, and the two estimates at the end.

    ``initial``: the global weights before the first round (the run's initialisation,
    also on resume: the loop passes them before it loads a checkpoint);
    ``client_sizes``: the real clients' sizes (a canary weighs as much as their mean in
    sample-weighted rules)."""

    def __init__(self, cfg: Config, initial: np.ndarray, client_sizes: np.ndarray):
        a, c = cfg.audit.client_canaries, cfg.clients
        self.cfg, self.count, self.scale, self.repeats = cfg, a.count, a.scale, a.repeats
        self.initial = initial.astype(np.float64)
        self.size = len(initial)
        self.rate = c.per_round / c.total
        self.weight = float(round(float(np.mean(client_sizes)))) if len(client_sizes) else 1.0
        self.included = seeding.rng(cfg.seed, "audit", CLIENT_DEFINITION).random(self.count) < 0.5
        self.directions = np.empty((self.count, self.size), dtype=np.float32)
        for j in range(self.count):
            u = seeding.rng(cfg.seed, "audit", CLIENT_DIRECTION, j).standard_normal(self.size)
            self.directions[j] = u / np.linalg.norm(u)
        self.schedule = schedule(cfg.seed, self.count, self.repeats, cfg.rounds) if self.repeats else None
        self.state = {"max_cosine": np.full(self.count, -np.inf), "participations": np.zeros(self.count, dtype=np.int64)}

    def cohort(self, round_index: int) -> np.ndarray:
        """Canaries taking part in ``round_index``: inserted, and scheduled in it (``repeats`` >= 1)
        or drawn at the clients' rate (``repeats`` = 0)."""
        if self.schedule is not None:
            return np.flatnonzero(self.included & (self.schedule == round_index).any(axis=1))
        draw = seeding.rng(self.cfg.seed, "audit", CLIENT_PARTICIPATION, round_index).random(self.count)
        return np.flatnonzero(self.included & (draw < self.rate))

    def insert(self, round_index: int, updates: Updates) -> Updates:
        """``updates`` with this round's canary rows after the real cohort's."""
        chosen = self.cohort(round_index)
        self.state["participations"][chosen] += 1
        if not len(chosen):
            return updates
        p = self.cfg.privacy
        rows = self.directions[chosen] * np.float32(self.scale * p.max_grad_norm)
        records = np.zeros((len(chosen), updates.records.shape[1]))
        records[:, RECORD["num_samples"]] = self.weight
        records[:, RECORD["train_loss"]] = np.nan
        records[:, RECORD["clipped_fraction"]] = np.nan
        if p.mode == "client_local":  # the canary clips and noises its own update, as a client does
            for row, j in zip(rows, chosen):
                privatise_update(row, p.max_grad_norm, p.noise_multiplier, self.cfg.seed, round_index,
                                 self.cfg.clients.total + int(j))
        norms = np.sqrt(np.einsum("ij,ij->i", rows.astype(np.float64), rows.astype(np.float64)))
        records[:, RECORD["update_norm"]], records[:, RECORD["finite"]] = norms, 1.0
        finite = np.concatenate([updates.finite, np.ones(len(chosen), bool)]) if updates.finite is not None else None
        return dataclasses.replace(
            updates, cohort=np.concatenate([updates.cohort, self.cfg.clients.total + chosen]),
            records=np.concatenate([updates.records, records]), rows=np.concatenate([updates.rows, rows]),
            byzantine=np.concatenate([updates.byzantine, np.zeros(len(chosen), bool)]),
            norms=np.concatenate([updates.norms, norms]), finite=finite, canaries=len(chosen))

    def cosines(self, change: np.ndarray) -> np.ndarray:
        """cos(u_j, change) for every canary (0 for a zero change), float64."""
        norm = float(np.linalg.norm(change))
        out = np.zeros(self.count)
        if norm == 0.0 or not math.isfinite(norm):
            return out
        for start in range(0, self.count, 256):
            block = self.directions[start:start + 256].astype(np.float64)
            out[start:start + 256] = block @ change / norm
        return out

    def observe(self, change: np.ndarray) -> None:
        """One round's global model change: keep each canary's maximum cosine."""
        np.maximum(self.state["max_cosine"], self.cosines(change), out=self.state["max_cosine"])

    def specs(self) -> dict[str, DatasetSpec]:
        return _specs(CLIENT_GROUP, self.count, CLIENT_FIELDS)

    def write_definition(self, writer) -> None:
        _write(writer, CLIENT_GROUP, included=self.included, count=self.count, dim=self.size, scale=self.scale,
               delta=self.cfg.privacy.delta, repeats=self.repeats)

    def estimates(self, final: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(final cosines, estimate from the final model, estimate from the max cosine)."""
        from .audit import gaussian_canary_epsilon  # scipy: rank 0, at the end only

        delta = self.cfg.privacy.delta
        final_cos = self.cosines(final.astype(np.float64) - self.initial)
        inserted, absent = final_cos[self.included], self.state["max_cosine"][~self.included]
        observed = self.state["max_cosine"][self.included]
        eps_final = eps_max = math.nan
        if len(inserted) >= 2 and np.ptp(inserted) > 0:
            eps_final = gaussian_canary_epsilon(inserted, self.size, delta)
        if len(observed) >= 2 and len(absent) >= 2 and np.ptp(observed) > 0 and np.ptp(absent) > 0:
            mu0, s0 = float(np.mean(absent)), float(np.std(absent, ddof=1))
            eps_max = gaussian_canary_epsilon((observed - mu0) / s0, 1, delta)
        return final_cos, eps_final, eps_max

    def finish(self, final: np.ndarray, writer) -> str:
        final_cos, eps_final, eps_max = self.estimates(final)
        _write(writer, CLIENT_GROUP, participations=self.state["participations"], final_cosine=final_cos,
               max_cosine=self.state["max_cosine"], epsilon_final=eps_final, epsilon_max_cosine=eps_max)
        how = f"each in {self.repeats} round{'s' if self.repeats > 1 else ''}" if self.repeats else "sampled each round"
        return (f"canary estimate {eps_final:.3g} from the final model, {eps_max:.3g} from the max cosine over rounds "
                f"({self.count} canary clients, {int(self.included.sum())} inserted, {how})")
