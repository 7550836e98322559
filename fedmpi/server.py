"""Rank 0: the federated round loop.

:meth:`ServerLoop.run_round` is one round, step by step:

1. sample the cohort from the keyed generator (seed, "cohort", round):
   ``clients.per_round`` distinct ids, or Poisson sampling;
2. collect the cohort's updates through the clients interface (workers over
   MPI, or this process), in slot order, sending each slot what the algorithm
   gives it (SCAFFOLD: c - c_i); the slots whose update arrived (all, unless
   heterogeneous devices dropped some, :mod:`fedmpi.devices`) go on:
   omniscient attackers (the attack's ``on_server`` hook, with a
   :class:`fedmpi.attacks.ServerContext`) replace the Byzantine rows, and every
   row is checked: its norm and whether it is finite
   (:func:`fedmpi.aggregation.norms_and_finite`); the audit's canary clients, if
   any, join the arrived rows (:mod:`fedmpi.canaries`; they are aggregated, and
   left out of the round's records);
3. aggregate the arrived updates (:func:`build_aggregator`: the rule with its
   pre-aggregation steps, the pre-summed mean of ``transport: reduce``, or
   central DP) over the finite rows; a row with a NaN or infinite value is left
   out and counts against f;
4. step the server optimizer, then the algorithm's server half (SCAFFOLD: the
   control variates, :mod:`fedmpi.algorithms`); neither when too few finite rows
   remained for the rule (the round then leaves the model and the server's
   state unchanged);
5. account privacy;
6. evaluate (every ``eval.every`` rounds, after the last, and after a round in
   which the run diverged), and the attack's success rate on its triggered test
   set (the backdoor);
7. record: append the round to the HDF5 file (flushed), print one line;
8. leakage audits (``audit.inversion``), outside the round's clock.

After the last round the membership audit (``audit.membership``) trains its
shadow federations through the same clients, then the workers are told to stop
and the final model is written. A checkpoint (weights, server optimizer,
aggregator, algorithm, accountant and attack state, and the clients' state:
everything else is keyed by seed and round) is written every
``output.checkpoint_every`` rounds, at the end, and after the round in which
SIGTERM or SIGUSR1 arrived; the run then stops and ``--resume`` continues it
bit for bit.

A run diverges when, after a round, the global model holds a NaN or infinite
value, or no honest client of the round sent a finite update (local training
diverged from the global model): it stops after that round, with the round
recorded, one line naming it and what to check, and exit status
:data:`fedmpi.protocol.EXIT_DIVERGED` on every rank.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import attacks, extensions, seeding
from .aggregation import norms_and_finite
from .algorithms import ALGORITHMS, state_path
from .canaries import ClientCanaries, ExampleCanaries
from .client_state import ClientStateStore
from .data import FederatedData
from .extensions import ExtensionFailed
from .models import FlatModel
from .optimizers import ServerOptimizer
from .privacy.accounting import RunAccountant
from .privacy.client_level import CentralDP
from .protocol import EXIT_CHECKPOINTED, EXIT_DIVERGED, EXIT_FAILED, EXIT_OK
from .results import ClientRecords, ResultsWriter, RoundRecord, open_results, progress_line
from .rounds import Aggregate, PresummedMean, RuleAggregator, Updates
from .schema import Config
from .sharded.round import ShardedAggregator, ShardedServerOptimizer
from .training import evaluate


def sample_cohort(cfg: Config, round_index: int) -> np.ndarray:
    """The round's cohort, sorted, keyed by (seed, round): ``per_round`` distinct ids
    (fixed), or every client independently with rate per_round / total (poisson)."""
    c = cfg.clients
    g = seeding.rng(cfg.seed, "cohort", round_index)
    if c.sampling == "poisson":
        return np.flatnonzero(g.random(c.total) < c.per_round / c.total).astype(np.int64)
    return np.sort(g.choice(c.total, size=c.per_round, replace=False)).astype(np.int64)


def without_canaries(result: Aggregate, slots: int) -> Aggregate:
    """The aggregator's per-slot decision for the round's first ``slots`` slots: the
    canary clients rank 0 appended after them (:mod:`fedmpi.canaries`) left out."""
    clipped = result.clipped[:slots] if result.clipped is not None else None
    return dataclasses.replace(result, selected=result.selected[:slots], scores=result.scores[:slots], clipped=clipped)


def build_aggregator(cfg: Config, size: int, clients=None):
    """The aggregator a config asks for: central client-level DP, the pre-summed mean
    of ``transport: reduce``, the rule with its pre-aggregation steps over the rows, or
    over column blocks (``transport: sharded``; ``clients.context`` says which)."""
    if cfg.privacy.mode == "client_central":
        return CentralDP(cfg, size)
    if cfg.transport == "reduce":
        return PresummedMean(cfg, size)
    if cfg.transport == "sharded":
        return ShardedAggregator(cfg, size, clients.context)
    return RuleAggregator(cfg, size)


def build_optimizer(cfg: Config, size: int, clients=None):
    """The server optimizer over the whole model, or over rank 0's columns of it with
    the other columns stepped where they live (``transport: sharded``)."""
    if cfg.transport == "sharded":
        return ShardedServerOptimizer(cfg.server, clients.context)
    return ServerOptimizer(cfg.server, size, extensions.optimizer(cfg.server.optimizer, cfg.server.params))


def _state_of(holder) -> dict:
    """An optimizer's or aggregator's state as whole arrays (gathered from every rank's
    columns where it lives in columns)."""
    gather = getattr(holder, "gather_state", None)
    return gather() if gather is not None else holder.state


def _load_part(holder, values: dict) -> None:
    """A checkpoint's part of the state into an optimizer or aggregator: in place, or
    through ``load_state`` where the state lives in columns on every rank."""
    if hasattr(holder, "load_state"):
        holder.load_state(values)
        return
    for key, value in holder.state.items():
        value[...] = values[key]


@dataclass
class Privacy:
    """What the accountant said after a round (NaN without DP)."""

    epsilon: float = np.nan
    epsilon_median: float = np.nan


@dataclass
class Evaluation:
    test_loss: float = np.nan
    test_accuracy: float = np.nan
    backdoor_accuracy: float = np.nan  # the attack's success rate on its triggered test set


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
        self.optimizer = build_optimizer(cfg, model.size, clients)
        self.aggregator = build_aggregator(cfg, model.size, clients)
        algorithm = ALGORITHMS[cfg.algorithm.name]
        self.client_state = None
        if algorithm.client_state:
            store = state_store or ("file" if cfg.algorithm.state_store == "file" else "memory")
            self.client_state = ClientStateStore(algorithm.client_state, cfg.clients.total, model.size,
                                                 state_path(cfg) if store == "file" else None)
        sizes = data.client_sizes() if algorithm.client_state else None
        self.algorithm = algorithm.server(cfg, model.size, sizes, self.client_state)
        a = cfg.attack
        self.attack = extensions.attack(a.name)
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.attack_params = attacks.resolved_params(cfg, data, self.attack)
        self.attack_state: dict[str, np.ndarray] = self.attack.state(model.size) if self.attack.state else {}
        self.triggered = None  # the attack's triggered test set: (x, y)
        if self.attack.triggered_test is not None and data.x_test is not None:
            self.triggered = self.attack.triggered_test(data.x_test, data.y_test, self.attack_params)
        self.accountant = RunAccountant(cfg) if cfg.privacy.mode != "none" else None
        # audit canaries (fedmpi.canaries); the weights here are the run's initial ones, also on resume
        audit = cfg.audit
        self.example_canaries = ExampleCanaries(cfg, data, model.size) if audit.canaries.count else None
        self.initial_weights = weights.copy() if self.example_canaries is not None else None
        self.client_canaries = (ClientCanaries(cfg, weights, data.client_sizes()) if audit.client_canaries.count
                                else None)
        self.last_accuracy = np.nan
        self.diverged: str | None = None  # what went non-finite in the last round
        self.stop_signal: str | None = None  # set by a signal handler: checkpoint and stop after this round
        self.leakage = None  # fedmpi.leakage_audit.LeakageAudit when the config has audit.inversion / audit.membership

    # ---- state a checkpoint holds (everything else is keyed by seed and round)

    def parts(self) -> dict[str, dict]:
        parts = {"optimizer": _state_of(self.optimizer), "aggregator": _state_of(self.aggregator),
                 "algorithm": self.algorithm.state}
        if self.accountant is not None:
            parts["accountant"] = self.accountant.state()
        if self.attack_state:
            parts["attack"] = self.attack_state
        if self.client_canaries is not None:
            parts["audit"] = self.client_canaries.state
        return parts

    def state(self) -> dict[str, np.ndarray]:
        return {f"{part}/{k}": v for part, values in self.parts().items() for k, v in values.items()}

    def state_spec(self) -> dict:
        return {name: (value.shape, value.dtype) for name, value in self.state().items()}

    def load_state(self, weights: np.ndarray, state: dict) -> None:
        self.weights[:] = weights
        for part, holder in (("optimizer", self.optimizer), ("aggregator", self.aggregator), ("algorithm", self.algorithm)):
            _load_part(holder, {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(part + "/")})
        for key, value in self.attack_state.items():
            value[...] = state[f"attack/{key}"]
        if self.accountant is not None:
            self.accountant.load_state({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("accountant/")})
        if self.client_canaries is not None:
            for key, value in self.client_canaries.state.items():
                value[...] = state[f"audit/{key}"]

    def audit_specs(self) -> dict:
        """The /audit datasets this run's canaries fill (created with the results file)."""
        specs = {}
        for canaries in (self.example_canaries, self.client_canaries):
            if canaries is not None:
                specs.update(canaries.specs())
        return specs

    def write_audit_definitions(self) -> None:
        """The canaries and the audits' parameters, written as the run (or a resumed session) starts."""
        for canaries in (self.example_canaries, self.client_canaries):
            if canaries is not None:
                canaries.write_definition(self.writer)

    def load_client_state(self, path: str, slot: int) -> None:
        """The clients' state from checkpoint slot ``slot`` of the results file ``path``."""
        if self.client_state is not None:
            with open_results(path) as f:
                self.client_state.load(f[f"checkpoint/slot{slot}/clients"])

    # ---- the run

    def run(self, start_round: int = 0) -> int:
        """Run rounds ``start_round``.. to the end; return the exit status every rank
        ends with: EXIT_OK, EXIT_CHECKPOINTED when a signal stopped it early (after
        writing a checkpoint), EXIT_DIVERGED when the run diverged. User code that
        breaks its contract stops the run: the workers are told to stop,
        :class:`ExtensionFailed` names the round."""
        run_start = time.perf_counter()
        every = self.cfg.output.checkpoint_every
        for r in range(start_round, self.cfg.rounds):
            try:
                self.run_round(r)
            except ExtensionFailed as exc:
                self.clients.stop(EXIT_FAILED)
                kept = f"rounds 0-{r - 1} are" if r > 1 else "round 0 is" if r == 1 else "no round is"
                raise ExtensionFailed(exc.key, exc.path, f"{exc.problem} in round {r} (0-based); the run stopped, "
                                      f"{kept} in {self.writer.path}") from None
            if self.diverged is not None:
                self.clients.stop(EXIT_DIVERGED)  # every rank ends with this status
                self.writer.stopped(EXIT_DIVERGED)
                print(f"fedmpi: the run diverged in round {r + 1}: {self.diverged}; stopped after it (exit status "
                      f"{EXIT_DIVERGED}); its rounds are in {self.writer.path}", file=sys.stderr, flush=True)
                return EXIT_DIVERGED
            if self.stop_signal is not None or (every and (r + 1) % every == 0 and r + 1 < self.cfg.rounds):
                self.writer.checkpoint(r, self.weights, self.state())
            if self.stop_signal is not None and r + 1 < self.cfg.rounds:
                return self.stop_checkpointed(r)
        if self.leakage is not None and not self.leakage.after_run(self):  # membership audit: shadow federations
            return self.stop_checkpointed(self.cfg.rounds - 1)
        self.writer.checkpoint(self.cfg.rounds - 1, self.weights, self.state())  # lets --resume extend the run
        self.clients.stop(EXIT_OK)  # after the checkpoint: sharded state is gathered from the workers
        privacy = self.final_privacy()
        self.writer.finish(self.cfg.rounds - 1, self.weights, privacy)
        if self.leakage is not None and not self.quiet:
            for line in self.leakage.summary_lines(privacy):
                print(line, flush=True)
        if not self.quiet:
            print(f"done: {self.cfg.rounds - start_round} rounds in {time.perf_counter() - run_start:.1f} s; "
                  f"final test accuracy {self.last_accuracy:.4f}; results in {self.writer.path}", flush=True)
        return EXIT_OK

    def stop_checkpointed(self, r: int) -> int:
        """After a signal: every rank ends with EXIT_CHECKPOINTED (the checkpoint after round r is written)."""
        self.clients.stop(EXIT_CHECKPOINTED)
        self.writer.stopped(EXIT_CHECKPOINTED)
        print(f"fedmpi: {self.stop_signal} received; checkpoint after round {r + 1} written to "
              f"{self.writer.path}; continue with: python -m fedmpi.run --resume {self.writer.path}",
              file=sys.stderr, flush=True)
        return EXIT_CHECKPOINTED

    def run_round(self, r: int) -> None:
        """One round: sample, collect, aggregate, step, account, evaluate, record; then the
        leakage audits of the round (outside its clock)."""
        clock = Stopwatch()
        cohort = sample_cohort(self.cfg, r)
        updates, arrived = self.collect(r, cohort)
        observed = self.leakage.observe(r, arrived, self.weights) if self.leakage is not None else None
        clock.lap("collect")
        result = self.step(r, updates, arrived)
        privacy = self.account(updates)
        self.diverged = self.divergence(arrived)
        clock.lap("aggregate")
        evaluation = self.evaluate(r, last=self.diverged is not None)
        clock.lap("eval")
        self.record(r, updates, result, privacy, evaluation, clock)
        self.warn(r, arrived, result)
        if self.leakage is not None:
            self.leakage.after_round(r, observed, self.weights)

    def step(self, r: int, updates: Updates, arrived: Updates) -> Aggregate:
        """Aggregate the updates that arrived (with the audit's canary clients, whose slots
        are then left out of the decision) and, unless the rule skipped the round, step
        the server optimizer and the algorithm's server half. Returns the decision for
        every slot of the cohort."""
        aggregated = self.client_canaries.insert(r, arrived) if self.client_canaries is not None else arrived
        result = self.aggregator(aggregated, r)
        if aggregated is not arrived:
            result = without_canaries(result, len(arrived.cohort))
        if result.skipped is None:
            before = self.weights.copy() if self.client_canaries is not None else None
            self.optimizer.step(self.weights, result.vector)
            self.algorithm.after_round(arrived, r)
            if self.client_canaries is not None:
                self.client_canaries.observe(self.weights.astype(np.float64) - before)
        return result.for_slots(~updates.dropped) if arrived is not updates else result

    def train_round(self, r: int) -> None:
        """A round without accounting, evaluation or records: sample, collect, aggregate,
        step (the membership audit's shadow federations)."""
        _, arrived = self.collect(r, sample_cohort(self.cfg, r))
        result = self.aggregator(arrived, r)
        if result.skipped is None:
            self.optimizer.step(self.weights, result.vector)

    # ---- the steps

    def collect(self, r: int, cohort: np.ndarray) -> tuple[Updates, Updates]:
        """The cohort's updates (every slot) and those that arrived (the same object
        unless devices dropped slots); omniscient attackers replace their arrived rows;
        each slot's norm (NaN where nothing arrived) and whether its row is finite (a
        dropped slot counts as finite: it sent nothing)."""
        updates = self.clients.collect(r, cohort, self.weights, self.algorithm.downlink(cohort))
        updates.byzantine = np.isin(cohort, self.byzantine_ids)
        arrived = updates.arrived()
        if updates.rows is None:  # pre-summed or sharded: each row's check came with the records
            for part in (updates,) if arrived is updates else (updates, arrived):
                part.norms = part.record("update_norm")
                part.finite = part.record("finite") > 0
            return updates, arrived
        if self.attack.on_server is not None and len(arrived.cohort):
            arrived_finite = norms_and_finite(arrived.rows)[1]
            with np.errstate(over="ignore", invalid="ignore"):  # what the attack makes is checked below
                self.attack.on_server(arrived.rows, arrived.byzantine, self.attack_params,
                                      self.attack_context(r, arrived, arrived_finite))
        if len(arrived.cohort):
            arrived.norms, arrived.finite = norms_and_finite(arrived.rows)
        else:
            arrived.norms, arrived.finite = np.empty(0), np.empty(0, dtype=bool)
        if arrived is not updates:
            updates.norms = np.full(len(cohort), np.nan)
            updates.norms[~updates.dropped] = arrived.norms
            updates.finite = np.ones(len(cohort), dtype=bool)
            updates.finite[~updates.dropped] = arrived.finite
        return updates, arrived

    def attack_context(self, r: int, updates: Updates, finite: np.ndarray) -> attacks.ServerContext:
        """What an on_server attack knows this round (full knowledge of the rule)."""
        k, f = len(updates.cohort), self.cfg.aggregator.f

        def aggregate(rows: np.ndarray):
            try:
                return self.aggregator.simulate(rows, max(0, f - (k - len(rows))), r)
            except ValueError as exc:
                raise attacks.Inapplicable(str(exc)) from None

        return attacks.ServerContext(round_index=r, cohort=updates.cohort, finite=finite,
                                     honest=~updates.byzantine & finite, f=f, aggregate=aggregate,
                                     rng=seeding.rng(self.cfg.seed, "server_attack", r), state=self.attack_state)

    def divergence(self, updates: Updates) -> str | None:
        """What went non-finite this round (the run then stops), or None: the global
        model, or every honest client's update (local training diverged)."""
        cfg = self.cfg
        learning = f"check the learning rates (train.lr = {cfg.train.lr:g}, server.lr = {cfg.server.lr:g})"
        attack = (f", or the defence against attack.name = {cfg.attack.name} (aggregator.name = {cfg.aggregator.name})"
                  if cfg.attack.name != "none" else "")
        if not np.isfinite(self.weights).all():
            return (f"the global model holds NaN or infinite values; {learning} and the server optimizer "
                    f"(server.optimizer = {cfg.server.optimizer}){attack}")
        honest = ~updates.byzantine & (updates.samples > 0)
        if honest.any() and updates.finite is not None and not (updates.finite & honest).any():
            return f"no honest client's update was finite (local training diverged); {learning}{attack}"
        return None

    def warn(self, r: int, updates: Updates, result: Aggregate) -> None:
        """A line for a round in which honest clients' training loss is not finite, and
        one for a round the rule could not aggregate."""
        honest = ~updates.byzantine & (updates.samples > 0)
        bad_loss = honest & ~np.isfinite(updates.record("train_loss"))
        if bad_loss.any():
            print(f"fedmpi: warning: round {r + 1}: the local training loss of {int(bad_loss.sum())} of "
                  f"{int(honest.sum())} honest clients is not finite; check train.lr ({self.cfg.train.lr:g})",
                  file=sys.stderr, flush=True)
        if result.skipped is not None:
            k, kept = len(updates.cohort), len(updates.kept)
            what = (f"none of the {k} updates was finite" if not kept else
                    f"{k - kept} of {k} updates were not finite and the rest cannot be aggregated ({result.skipped})")
            print(f"fedmpi: warning: round {r + 1}: {what}: the model was left unchanged", file=sys.stderr, flush=True)

    def account(self, updates: Updates) -> Privacy:
        if self.accountant is None:
            return Privacy()
        return Privacy(*self.accountant.after_round(updates.cohort, updates.samples))

    def evaluate(self, r: int, last: bool = False) -> Evaluation:
        """Every ``eval.every`` rounds, after the last, and after a round that ends the
        run early (``last``: it diverged)."""
        cfg = self.cfg
        if not last and r != cfg.rounds - 1 and (r + 1) % cfg.eval.every != 0:
            return Evaluation()
        loss, accuracy = evaluate(self.model, self.weights, self.data.x_test, self.data.y_test, cfg.eval.batch_size)
        self.last_accuracy = accuracy
        backdoor = np.nan
        if self.triggered is not None and len(self.triggered[1]):
            backdoor = evaluate(self.model, self.weights, *self.triggered, cfg.eval.batch_size)[1]
        return Evaluation(loss, accuracy, backdoor)

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
        # the round's means are over the updates that arrived from clients that trained (a client
        # without examples, e.g. in a membership audit's split, has no loss)
        kept = ~dropped & (samples > 0)
        if not kept.all():
            losses, kept_samples, kept_steps, kept_clipped = losses[kept], samples[kept], steps[kept], clipped[kept]
        train_loss = float(np.average(losses, weights=kept_samples)) if kept_samples.sum() else np.nan
        if p.mode == "sample":
            seen = kept_samples * kept_steps
            clipped_round = float(np.average(kept_clipped, weights=seen)) if seen.sum() else np.nan
        else:  # client modes: over the updates the aggregate could use (arrived and finite)
            usable = clipped if len(updates.kept) == k and not dropped.any() else clipped[~dropped & updates.finite]
            clipped_round = float(usable.mean()) if dp and len(usable) else np.nan
        collect_s = clock.laps["collect"]
        row = RoundRecord(
            round=r, cohort_size=k, test_accuracy=evaluation.test_accuracy, test_loss=evaluation.test_loss,
            train_loss=train_loss, update_norm=result.norm if result.norm is not None else float(np.linalg.norm(result.vector)),
            byzantine_in_cohort=int(updates.byzantine.sum()),
            byzantine_selected=int((updates.byzantine & result.selected).sum()),
            epsilon=privacy.epsilon, epsilon_median=privacy.epsilon_median, delta=p.delta if dp else np.nan,
            noise_multiplier=p.noise_multiplier if dp else np.nan, clip_norm=p.max_grad_norm if dp else np.nan,
            clipped_fraction=clipped_round, wall_s=clock.total, train_s=train_s,
            comm_s=max(0.0, collect_s - train_s), aggregate_s=clock.laps["aggregate"], eval_s=clock.laps["eval"],
            nonfinite_updates=k - len(updates.kept), aggregation_skipped=result.skipped is not None,
            backdoor_accuracy=evaluation.backdoor_accuracy,
        )
        self.writer.append_round(row, ClientRecords(
            round=np.full(k, r), slot=np.arange(k), client_id=updates.cohort, num_samples=samples.astype(np.int64),
            update_norm=updates.norms, train_loss=updates.record("train_loss"), steps=steps.astype(np.int64),
            train_s=updates.record("train_s"), byzantine=updates.byzantine, selected=result.selected,
            score=result.scores, clipped_fraction=clipped, finite=updates.finite,
            dropped=updates.record("dropped").astype(np.int8),
        ))
        if self.writer.snapshot_every and (r + 1) % self.writer.snapshot_every == 0:
            self.writer.snapshot(r, self.weights)
        if not self.quiet:
            print(progress_line(vars(row), cfg.rounds), flush=True)

    def final_privacy(self) -> dict:
        """The final epsilon, and the audits of the run's canaries (written to /audit), printed on one line."""
        if self.accountant is None:
            return {}
        eps, eps_median, used = self.accountant.final()
        p = self.cfg.privacy
        audits = []
        if self.example_canaries is not None:
            audits.append(self.example_canaries.finish(self.initial_weights, self.weights, self.model, self.writer))
        if self.client_canaries is not None:
            audits.append(self.client_canaries.finish(self.weights, self.writer))
        if not self.quiet:
            print(f"privacy: epsilon {eps:.4g} (median over clients {eps_median:.4g}) at delta {p.delta:g}, "
                  f"{used.upper()} accountant, noise multiplier {p.noise_multiplier:.4g}"
                  + "".join(f"; {text}" for text in audits), flush=True)
        return {"epsilon": eps, "epsilon_median": eps_median, "accountant": used}
