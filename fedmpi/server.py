"""Rank 0: the federated round loop.

:meth:`ServerLoop.run_round` is one round, step by step:

1. sample the cohort from the keyed generator (seed, "cohort", round):
   ``clients.per_round`` distinct ids, or Poisson sampling;
2. collect the cohort's updates through the clients interface (workers over
   MPI, or this process), in slot order, sending each slot what the algorithm
   gives it (SCAFFOLD: c - c_i); the slots whose update arrived (all, unless
   heterogeneous devices dropped some, :mod:`fedmpi.devices`) go on:
   omniscient attackers (the attack's ``on_server`` hook) replace the Byzantine
   rows, and every row's norm is taken;
3. aggregate the arrived updates (:func:`build_aggregator`: the rule with its
   pre-aggregation steps, the pre-summed mean of ``transport: reduce``, or
   central DP);
4. step the server optimizer, then the algorithm's server half (SCAFFOLD: the
   control variates, :mod:`fedmpi.algorithms`);
5. account privacy;
6. evaluate (every ``eval.every`` rounds and after the last);
7. record: append the round to the HDF5 file (flushed), print one line.

After the last round the workers are told to stop and the final model is
written. A checkpoint (weights, server optimizer, aggregator, algorithm and
accountant state, and the clients' state: everything else is keyed by seed and
round) is written every
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
from .algorithms import ALGORITHMS, state_path
from .client_state import ClientStateStore
from .data import FederatedData
from .models import FlatModel
from .optimizers import ServerOptimizer
from .privacy.accounting import RunAccountant
from .privacy.client_level import CentralDP
from .protocol import EXIT_CHECKPOINTED, EXIT_OK
from .results import ClientRecords, ResultsWriter, RoundRecord, open_results, progress_line
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
    """Rank 0's state for a run: global weights, server optimizer, aggregator, the
    algorithm's server half with the clients' state, and privacy accountant, and the
    clients it reaches through ``clients`` (an object with ``collect(round, cohort,
    weights, slot_rows) -> Updates`` and ``stop(status)``). ``state_store``: where the
    clients' state lives, ``memory`` or ``file`` (as the memory check decided)."""

    def __init__(self, cfg: Config, clients, data: FederatedData, model: FlatModel, weights: np.ndarray,
                 writer: ResultsWriter | None, quiet: bool = False, state_store: str | None = None):
        self.cfg, self.clients, self.data, self.model = cfg, clients, data, model
        self.weights, self.writer, self.quiet = weights, writer, quiet
        self.optimizer = ServerOptimizer(cfg.server, model.size)
        self.aggregator = build_aggregator(cfg, model.size)
        algorithm = ALGORITHMS[cfg.algorithm.name]
        self.client_state = None
        if algorithm.client_state:
            store = state_store or ("file" if cfg.algorithm.state_store == "file" else "memory")
            self.client_state = ClientStateStore(algorithm.client_state, cfg.clients.total, model.size,
                                                 state_path(cfg) if store == "file" else None)
        sizes = data.client_sizes() if algorithm.client_state else None
        self.algorithm = algorithm.server(cfg, model.size, sizes, self.client_state)
        a = cfg.attack
        self.attack = attacks.ATTACKS[a.name]
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.attack_params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)
        self.accountant = RunAccountant(cfg) if cfg.privacy.mode != "none" else None
        self.last_accuracy = np.nan
        self.stop_signal: str | None = None  # set by a signal handler: checkpoint and stop after this round

    # ---- state a checkpoint holds (everything else is keyed by seed and round)

    def parts(self) -> dict[str, dict]:
        parts = {"optimizer": self.optimizer.state, "aggregator": self.aggregator.state,
                 "algorithm": self.algorithm.state}
        if self.accountant is not None:
            parts["accountant"] = self.accountant.state()
        return parts

    def state(self) -> dict[str, np.ndarray]:
        return {f"{part}/{k}": v for part, values in self.parts().items() for k, v in values.items()}

    def state_spec(self) -> dict:
        return {name: (value.shape, value.dtype) for name, value in self.state().items()}

    def load_state(self, weights: np.ndarray, state: dict) -> None:
        self.weights[:] = weights
        for part, values in (("optimizer", self.optimizer.state), ("aggregator", self.aggregator.state),
                             ("algorithm", self.algorithm.state)):
            for key, value in values.items():
                value[...] = state[f"{part}/{key}"]
        if self.accountant is not None:
            self.accountant.load_state({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("accountant/")})

    def load_client_state(self, path: str, slot: int) -> None:
        """The clients' state from checkpoint slot ``slot`` of the results file ``path``."""
        if self.client_state is not None:
            with open_results(path) as f:
                self.client_state.load(f[f"checkpoint/slot{slot}/clients"])

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
                self.clients.stop(EXIT_CHECKPOINTED)  # every rank ends with this status
                print(f"fedmpi: {self.stop_signal} received; checkpoint after round {r + 1} written to "
                      f"{self.writer.path}; continue with: python -m fedmpi.run --resume {self.writer.path}",
                      file=sys.stderr, flush=True)
                return False
        self.clients.stop(EXIT_OK)
        self.writer.checkpoint(self.cfg.rounds - 1, self.weights, self.state())  # lets --resume extend the run
        self.writer.finish(self.cfg.rounds - 1, self.weights, self.final_privacy())
        if not self.quiet:
            print(f"done: {self.cfg.rounds - start_round} rounds in {time.perf_counter() - run_start:.1f} s; "
                  f"final test accuracy {self.last_accuracy:.4f}; results in {self.writer.path}", flush=True)
        return True

    def run_round(self, r: int) -> None:
        """One round: sample, collect, aggregate, step, account, evaluate, record."""
        clock = Stopwatch()
        cohort = sample_cohort(self.cfg, r)
        updates, arrived = self.collect(r, cohort)
        clock.lap("collect")
        result = self.aggregator(arrived, r)
        if arrived is not updates:
            result = result.for_slots(~updates.dropped)
        self.optimizer.step(self.weights, result.vector)
        self.algorithm.after_round(arrived, r)
        privacy = self.account(updates)
        clock.lap("aggregate")
        evaluation = self.evaluate(r)
        clock.lap("eval")
        self.record(r, updates, result, privacy, evaluation, clock)

    # ---- the steps

    def collect(self, r: int, cohort: np.ndarray) -> tuple[Updates, Updates]:
        """The cohort's updates (every slot) and those that arrived (the same object
        unless devices dropped slots); omniscient attackers replace their arrived rows;
        norms per slot (NaN where nothing arrived)."""
        updates = self.clients.collect(r, cohort, self.weights, self.algorithm.downlink(cohort))
        updates.byzantine = np.isin(cohort, self.byzantine_ids)
        arrived = updates.arrived()
        if updates.rows is None:  # pre-summed: the norms came with the records
            updates.norms = updates.record("update_norm")
            arrived.norms = arrived.record("update_norm")
            return updates, arrived
        if self.attack.on_server is not None:
            self.attack.on_server(arrived.rows, arrived.byzantine, self.attack_params)
        arrived.norms = row_norms(arrived.rows) if len(arrived.cohort) else np.empty(0)
        if arrived is not updates:
            updates.norms = np.full(len(cohort), np.nan)
            updates.norms[~updates.dropped] = arrived.norms
        return updates, arrived

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
        losses, kept_samples, kept_steps, kept_clipped = updates.record("train_loss"), samples, steps, clipped
        dropped = updates.dropped
        if dropped.any():  # the round's means are over the updates that arrived
            kept = ~dropped
            losses, kept_samples, kept_steps, kept_clipped = losses[kept], samples[kept], steps[kept], clipped[kept]
        train_loss = float(np.average(losses, weights=kept_samples)) if kept_samples.sum() else np.nan
        if p.mode == "sample":
            seen = kept_samples * kept_steps
            clipped_round = float(np.average(kept_clipped, weights=seen)) if seen.sum() else np.nan
        else:
            clipped_round = float(kept_clipped.mean()) if dp and len(kept_clipped) else np.nan
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
            score=result.scores, clipped_fraction=clipped, dropped=updates.record("dropped").astype(np.int8),
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
