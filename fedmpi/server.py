"""Rank 0: the federated round loop.

:meth:`ServerLoop.run_round` is one round, step by step:

1. sample the cohort from the keyed generator (seed, "cohort", round):
   ``clients.per_round`` distinct ids, or Poisson sampling;
2. collect the cohort's updates through the clients interface (workers over
   MPI, or this process), in slot order; omniscient attackers (the attack's
   ``on_server`` hook) then replace the Byzantine rows, and every row's norm
   is taken;
3. aggregate (:func:`build_aggregator`: the rule with its pre-aggregation
   steps, the pre-summed mean of ``transport: reduce``, or central DP);
4. step the server optimizer;
5. account privacy;
6. evaluate (every ``eval.every`` rounds and after the last);
7. record: append the round to the HDF5 file (flushed), print one line;
8. leakage audits (``audit.inversion``), outside the round's clock.

After the last round the membership audit (``audit.membership``) trains its
shadow federations through the same clients, then the workers are told to stop
and the final model is written. A checkpoint (weights, server optimizer, aggregator and accountant
state: everything else is keyed by seed and round) is written every
``output.checkpoint_every`` rounds, at the end, and after the round in which
SIGTERM or SIGUSR1 arrived; the run then stops and ``--resume`` continues it
bit for bit.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from . import attacks, seeding
from .aggregation import row_norms
from .data import FederatedData
from .models import FlatModel
from .optimizers import ServerOptimizer
from .privacy.accounting import RunAccountant
from .privacy.client_level import CentralDP
from .protocol import EXIT_CHECKPOINTED, EXIT_OK
from .results import ClientRecords, ResultsWriter, RoundRecord, progress_line
from .rounds import Aggregate, PresummedMean, RuleAggregator, Updates
from .schema import Config
from .training import evaluate


def sample_cohort(cfg: Config, round_index: int) -> np.ndarray:
    """The round's cohort, sorted, keyed by (seed, round): ``per_round`` distinct ids
    (fixed), or every client independently with rate per_round / total (poisson)."""
    c = cfg.clients
    g = seeding.rng(cfg.seed, "cohort", round_index)
    if c.sampling == "poisson":
        return np.flatnonzero(g.random(c.total) < c.per_round / c.total).astype(np.int64)
    return np.sort(g.choice(c.total, size=c.per_round, replace=False)).astype(np.int64)


def build_aggregator(cfg: Config, size: int):
    """The aggregator a config asks for: central client-level DP, the pre-summed mean
    of ``transport: reduce``, or the rule with its pre-aggregation steps."""
    if cfg.privacy.mode == "client_central":
        return CentralDP(cfg, size)
    if cfg.transport == "reduce":
        return PresummedMean(cfg, size)
    return RuleAggregator(cfg, size)


@dataclass
class Privacy:
    """What the accountant said after a round (NaN without DP)."""

    epsilon: float = np.nan
    epsilon_median: float = np.nan


@dataclass
class Evaluation:
    test_loss: float = np.nan
    test_accuracy: float = np.nan


class Stopwatch:
    """Wall-clock laps of a round: ``lap(name)`` records the time since the previous lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


class ServerLoop:
    """Rank 0's state for a run: global weights, server optimizer, aggregator and
    privacy accountant, and the clients it reaches through ``clients`` (an object with
    ``collect(round, cohort, weights) -> Updates`` and ``stop(status)``)."""

    def __init__(self, cfg: Config, clients, data: FederatedData, model: FlatModel, weights: np.ndarray,
                 writer: ResultsWriter | None, quiet: bool = False):
        self.cfg, self.clients, self.data, self.model = cfg, clients, data, model
        self.weights, self.writer, self.quiet = weights, writer, quiet
        self.optimizer = ServerOptimizer(cfg.server, model.size)
        self.aggregator = build_aggregator(cfg, model.size)
        a = cfg.attack
        self.attack = attacks.ATTACKS[a.name]
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.attack_params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)
        self.accountant = RunAccountant(cfg) if cfg.privacy.mode != "none" else None
        self.last_accuracy = np.nan
        self.stop_signal: str | None = None  # set by a signal handler: checkpoint and stop after this round
        self.leakage = None  # fedmpi.leakage_audit.LeakageAudit when the config has audit.inversion / audit.membership

    # ---- state a checkpoint holds (everything else is keyed by seed and round)

    def parts(self) -> dict[str, dict]:
        parts = {"optimizer": self.optimizer.state, "aggregator": self.aggregator.state}
        if self.accountant is not None:
            parts["accountant"] = self.accountant.state()
        return parts

    def state(self) -> dict[str, np.ndarray]:
        return {f"{part}/{k}": v for part, values in self.parts().items() for k, v in values.items()}

    def state_spec(self) -> dict:
        return {name: (value.shape, value.dtype) for name, value in self.state().items()}

    def load_state(self, weights: np.ndarray, state: dict) -> None:
        self.weights[:] = weights
        for part, values in (("optimizer", self.optimizer.state), ("aggregator", self.aggregator.state)):
            for key, value in values.items():
                value[...] = state[f"{part}/{key}"]
        if self.accountant is not None:
            self.accountant.load_state({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("accountant/")})

    # ---- the run

    def run(self, start_round: int = 0) -> bool:
        """Run rounds ``start_round``.. to the end; False when a signal stopped it early
        (after writing a checkpoint)."""
        run_start = time.perf_counter()
        every = self.cfg.output.checkpoint_every
        for r in range(start_round, self.cfg.rounds):
            self.run_round(r)
            if self.stop_signal is not None or (every and (r + 1) % every == 0 and r + 1 < self.cfg.rounds):
                self.writer.checkpoint(r, self.weights, self.state())
            if self.stop_signal is not None and r + 1 < self.cfg.rounds:
                return self.stop_checkpointed(r)
        if self.leakage is not None and not self.leakage.after_run(self):  # membership audit: shadow federations
            return self.stop_checkpointed(self.cfg.rounds - 1)
        self.clients.stop(EXIT_OK)
        self.writer.checkpoint(self.cfg.rounds - 1, self.weights, self.state())  # lets --resume extend the run
        privacy = self.final_privacy()
        self.writer.finish(self.cfg.rounds - 1, self.weights, privacy)
        if self.leakage is not None and not self.quiet:
            for line in self.leakage.summary_lines(privacy):
                print(line, flush=True)
        if not self.quiet:
            print(f"done: {self.cfg.rounds - start_round} rounds in {time.perf_counter() - run_start:.1f} s; "
                  f"final test accuracy {self.last_accuracy:.4f}; results in {self.writer.path}", flush=True)
        return True

    def stop_checkpointed(self, r: int) -> bool:
        """After a signal: every rank ends with EXIT_CHECKPOINTED (the checkpoint after round r is written)."""
        self.clients.stop(EXIT_CHECKPOINTED)
        print(f"fedmpi: {self.stop_signal} received; checkpoint after round {r + 1} written to "
              f"{self.writer.path}; continue with: python -m fedmpi.run --resume {self.writer.path}",
              file=sys.stderr, flush=True)
        return False

    def run_round(self, r: int) -> None:
        """One round: sample, collect, aggregate, step, account, evaluate, record; then the
        leakage audits of the round (outside its clock)."""
        clock = Stopwatch()
        cohort = sample_cohort(self.cfg, r)
        updates = self.collect(r, cohort)
        observed = self.leakage.observe(r, updates, self.weights) if self.leakage is not None else None
        clock.lap("collect")
        result = self.aggregator(updates, r)
        self.optimizer.step(self.weights, result.vector)
        privacy = self.account(updates)
        clock.lap("aggregate")
        evaluation = self.evaluate(r)
        clock.lap("eval")
        self.record(r, updates, result, privacy, evaluation, clock)
        if self.leakage is not None:
            self.leakage.after_round(r, observed, self.weights)

    def train_round(self, r: int) -> None:
        """A round without accounting, evaluation or records: sample, collect, aggregate,
        step (the membership audit's shadow federations)."""
        updates = self.collect(r, sample_cohort(self.cfg, r))
        self.optimizer.step(self.weights, self.aggregator(updates, r).vector)

    # ---- the steps

    def collect(self, r: int, cohort: np.ndarray) -> Updates:
        """The cohort's updates; omniscient attackers replace their rows; norms per slot."""
        updates = self.clients.collect(r, cohort, self.weights)
        updates.byzantine = np.isin(cohort, self.byzantine_ids)
        if updates.rows is None:  # pre-summed: the norms came with the records
            updates.norms = updates.record("update_norm")
            return updates
        if self.attack.on_server is not None:
            self.attack.on_server(updates.rows, updates.byzantine, self.attack_params)
        updates.norms = row_norms(updates.rows) if len(cohort) else np.empty(0)
        return updates

    def account(self, updates: Updates) -> Privacy:
        if self.accountant is None:
            return Privacy()
        return Privacy(*self.accountant.after_round(updates.cohort, updates.samples))

    def evaluate(self, r: int) -> Evaluation:
        cfg = self.cfg
        if r != cfg.rounds - 1 and (r + 1) % cfg.eval.every != 0:
            return Evaluation()
        loss, accuracy = evaluate(self.model, self.weights, self.data.x_test, self.data.y_test, cfg.eval.batch_size)
        self.last_accuracy = accuracy
        return Evaluation(loss, accuracy)

    def record(self, r: int, updates: Updates, result: Aggregate, privacy: Privacy, evaluation: Evaluation,
               clock: Stopwatch) -> None:
        """Append the round to the results file (and a snapshot when due); print its line."""
        cfg, p, k = self.cfg, self.cfg.privacy, len(updates.cohort)
        samples, steps = updates.samples, updates.record("steps")
        clipped = result.clipped if result.clipped is not None else updates.record("clipped_fraction")
        dp = p.mode != "none"
        offsets = np.cumsum([0] + updates.counts)
        train_s = max(updates.record("train_s")[offsets[i]:offsets[i + 1]].sum() for i in range(len(updates.counts)))
        trained = samples > 0  # a client without examples (e.g. a membership audit's split) has no loss
        train_loss = (float(np.average(updates.record("train_loss")[trained], weights=samples[trained])) if samples.sum()
                      else np.nan)
        if p.mode == "sample":
            seen = samples * steps
            clipped_round = float(np.average(clipped, weights=seen)) if seen.sum() else np.nan
        else:
            clipped_round = float(clipped.mean()) if dp and k else np.nan
        collect_s = clock.laps["collect"]
        row = RoundRecord(
            round=r, cohort_size=k, test_accuracy=evaluation.test_accuracy, test_loss=evaluation.test_loss,
            train_loss=train_loss, update_norm=float(np.linalg.norm(result.vector)),
            byzantine_in_cohort=int(updates.byzantine.sum()),
            byzantine_selected=int((updates.byzantine & result.selected).sum()),
            epsilon=privacy.epsilon, epsilon_median=privacy.epsilon_median, delta=p.delta if dp else np.nan,
            noise_multiplier=p.noise_multiplier if dp else np.nan, clip_norm=p.max_grad_norm if dp else np.nan,
            clipped_fraction=clipped_round, wall_s=clock.total, train_s=train_s,
            comm_s=max(0.0, collect_s - train_s), aggregate_s=clock.laps["aggregate"], eval_s=clock.laps["eval"],
        )
        self.writer.append_round(row, ClientRecords(
            round=np.full(k, r), slot=np.arange(k), client_id=updates.cohort, num_samples=samples.astype(np.int64),
            update_norm=updates.norms, train_loss=updates.record("train_loss"), steps=steps.astype(np.int64),
            train_s=updates.record("train_s"), byzantine=updates.byzantine, selected=result.selected,
            score=result.scores, clipped_fraction=clipped,
        ))
        if self.writer.snapshot_every and (r + 1) % self.writer.snapshot_every == 0:
            self.writer.snapshot(r, self.weights)
        if not self.quiet:
            print(progress_line(vars(row), cfg.rounds), flush=True)

    def final_privacy(self) -> dict:
        if self.accountant is None:
            return {}
        eps, eps_median, used = self.accountant.final()
        p = self.cfg.privacy
        if not self.quiet:
            print(f"privacy: epsilon {eps:.4g} (median over clients {eps_median:.4g}) at delta {p.delta:g}, "
                  f"{used.upper()} accountant, noise multiplier {p.noise_multiplier:.4g}", flush=True)
        return {"epsilon": eps, "epsilon_median": eps_median, "accountant": used}
