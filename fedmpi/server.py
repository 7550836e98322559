"""Rank 0: the federated round loop.

:class:`ServerLoop` runs every round as follows:

1. sample the cohort from the keyed generator (seed, "cohort", round):
   ``clients.per_round`` distinct ids, or Poisson sampling;
2. broadcast the header, the cohort and the global weights (flat float32);
3. gather the (K, d) float32 update rows, in cohort order, and the per-client
   records (with one process, train them here instead);
4. let omniscient attackers (ALIE, IPM) replace the Byzantine rows, run the
   pre-aggregation steps and the aggregator (or clip, sum and add noise for
   central client-level DP), step the server optimizer, account privacy;
5. evaluate, append the round to the HDF5 file (flushed), print one line.

After the last round the workers get a STOP header and the final model is
written. A checkpoint (weights, server optimizer, aggregator and accountant
state: everything else is keyed by seed and round) is written every
``output.checkpoint_every`` rounds, at the end, and after the round in which
SIGTERM or SIGUSR1 arrived; the run then stops and ``--resume`` continues it
bit for bit.
"""

from __future__ import annotations

import sys
import time
from statistics import NormalDist

import numpy as np

from . import aggregation, attacks, seeding
from .comm import EXIT_CHECKPOINTED
from .config import Config
from .data import FederatedData
from .models import FlatModel
from .optimizers import ServerOptimizer
from .results import ResultsWriter
from .training import evaluate
from .worker import CMD_ROUND, CMD_STOP, META, META_FIELDS, ClientHost, slot_counts, weighted_total


def sample_cohort(cfg: Config, round_index: int) -> np.ndarray:
    """The round's cohort, sorted, keyed by (seed, round): ``per_round`` distinct ids
    (fixed), or every client independently with rate per_round / total (poisson)."""
    c = cfg.clients
    g = seeding.rng(cfg.seed, "cohort", round_index)
    if c.sampling == "poisson":
        return np.flatnonzero(g.random(c.total) < c.per_round / c.total).astype(np.int64)
    return np.sort(g.choice(c.total, size=c.per_round, replace=False)).astype(np.int64)


class RoundAggregator:
    """``aggregator.pre`` steps, then ``aggregator.name``, over one round's rows.

    Holds the only state a rule keeps between rounds (centered clipping's
    center) in :attr:`state`. Returns, per cohort slot, whether the slot's update
    was used by the aggregate and the rule's score for it (NaN where none).
    """

    def __init__(self, cfg: Config, size: int):
        self.cfg = cfg
        self.state: dict[str, np.ndarray] = {}
        if cfg.aggregator.name == "centered_clipping":
            self.state["center"] = np.zeros(size)

    def __call__(self, updates: np.ndarray, samples: np.ndarray, round_index: int):
        g = self.cfg.aggregator
        n = len(updates)
        rows, weights = updates, samples.astype(np.float64)
        members = np.eye(n, dtype=bool)  # members[r, slot]: slot's update went into row r
        row_of_slot = np.arange(n)  # the row that stands for each slot, for scores
        for step_index, step in enumerate(g.pre):
            if step.name == "clip":
                rows = aggregation.clip(rows, step.max_norm)
                continue
            if step.name == "nnm":
                groups = list(aggregation.nnm_neighbours(rows, g.f))
            else:
                groups = aggregation.bucket_assignment(len(rows), step.s,
                                                       seeding.rng(self.cfg.seed, "bucketing", round_index, step_index))
                position = np.empty(len(rows), dtype=np.int64)
                for b, group in enumerate(groups):
                    position[group] = b
                row_of_slot = position[row_of_slot]
            rows = aggregation.average_groups(rows, groups)
            weights = np.array([weights[group].sum() for group in groups])
            members = np.stack([members[group].any(axis=0) for group in groups])
        result = self._rule(rows, weights)
        selected = members[result.selected].any(axis=0) if result.selected is not None else members.any(axis=0)
        scores = result.scores[row_of_slot] if result.scores is not None else np.full(n, np.nan)
        return result.vector, selected, scores

    def _rule(self, rows: np.ndarray, weights: np.ndarray) -> aggregation.AggregationResult:
        g = self.cfg.aggregator
        name = g.name
        if name == "fedavg":
            return aggregation.fedavg(rows, weights)
        if name == "krum":
            return aggregation.krum(rows, g.f)
        if name == "multi_krum":
            return aggregation.multi_krum(rows, g.f, g.m)
        if name == "median":
            return aggregation.median(rows)
        if name == "trimmed_mean":
            return aggregation.trimmed_mean(rows, g.f)
        if name == "geometric_median":
            return aggregation.geometric_median(rows, weights, smoothing=g.smoothing, tol=g.tol, max_iter=g.max_iter)
        if name == "bulyan":
            return aggregation.bulyan(rows, g.f)
        result = aggregation.centered_clipping(rows, g.tau, g.iterations, center=self.state["center"])
        self.state["center"] = result.vector.copy()
        return result


def omniscient_attack(cfg: Config, params: dict, updates: np.ndarray, byzantine: np.ndarray) -> None:
    """ALIE / IPM on rank 0: overwrite the Byzantine rows from the honest ones."""
    if cfg.attack.name not in attacks.OMNISCIENT:
        return
    params = dict(params)
    n, f = len(byzantine), int(byzantine.sum())
    if cfg.attack.name == "alie" and params.get("z") is None and 0 < f < n:
        s = int(np.floor(n / 2 + 1)) - f
        # with a Byzantine majority no supporters are needed: use the largest finite z
        params["z"] = attacks.alie_zmax(n, f) if s > 0 else NormalDist().inv_cdf((n - 1) / n)
    attacks.apply_omniscient_attack(cfg.attack.name, params, updates, byzantine)


def central_dp_aggregate(cfg: Config, updates: np.ndarray, round_index: int) -> tuple[np.ndarray, np.ndarray]:
    """DP-FedAvg with a trusted server (McMahan et al. 2018): clip every row to S
    (here, so the bound holds whatever clients send), sum, add N(0, z^2 S^2) keyed
    by (seed, "server_noise", round), divide by the expected cohort size. Returns
    (aggregate, which rows were clipped)."""
    from .privacy import clip_update

    p = cfg.privacy
    clipped = np.array([clip_update(row, p.max_grad_norm) for row in updates], dtype=bool)
    total = aggregation.weighted_sum(updates, np.ones(len(updates))) if len(updates) else np.zeros(updates.shape[1])
    noise = seeding.rng(cfg.seed, "server_noise", round_index).standard_normal(updates.shape[1])
    return (total + p.noise_multiplier * p.max_grad_norm * noise) / cfg.clients.per_round, clipped


class ServerLoop:
    """Rank 0's state for a run: global weights, server optimizer, aggregator and
    privacy accountant, plus the buffers the rows are gathered into."""

    def __init__(self, cfg: Config, comm, data: FederatedData, model: FlatModel, weights: np.ndarray,
                 writer: ResultsWriter | None, quiet: bool = False):
        self.cfg, self.comm, self.data, self.model = cfg, comm, data, model
        self.weights, self.writer, self.quiet = weights, writer, quiet
        self.optimizer = ServerOptimizer(cfg.server, model.size)
        self.aggregate = RoundAggregator(cfg, model.size)
        self.host = ClientHost(cfg, data, model) if comm.size == 1 else None
        a = cfg.attack
        self.byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
        self.attack_params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)
        self.accountant = None
        if cfg.privacy.mode != "none":
            from .privacy import RunAccountant

            self.accountant = RunAccountant(cfg)
        self.header = np.zeros(3, dtype=np.int64)
        self.no_rows = np.empty((0, model.size), dtype=np.float32)
        self.no_meta = np.empty((0, len(META_FIELDS)))
        self.last_accuracy = np.nan
        self.stop_signal: str | None = None  # set by a signal handler: checkpoint and stop after this round

    # ---- state a checkpoint holds (everything else is keyed by seed and round)

    def state(self) -> dict[str, np.ndarray]:
        state = {f"optimizer/{k}": v for k, v in self.optimizer.state.items()}
        state.update({f"aggregator/{k}": v for k, v in self.aggregate.state.items()})
        if self.accountant is not None:
            state.update({f"accountant/{k}": v for k, v in self.accountant.state().items()})
        return state

    def state_spec(self) -> dict:
        return {name: (value.shape, value.dtype) for name, value in self.state().items()}

    def load_state(self, weights: np.ndarray, state: dict) -> None:
        self.weights[:] = weights
        for name, value in state.items():
            group, key = name.split("/", 1)
            if group == "optimizer":
                self.optimizer.state[key][...] = value
            elif group == "aggregator":
                self.aggregate.state[key][...] = value
        if self.accountant is not None:
            self.accountant.load_state({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("accountant/")})

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
                self.header[:] = (CMD_STOP, EXIT_CHECKPOINTED, 0)  # every rank ends with this status
                self.comm.bcast_idle(self.header)
                print(f"fedmpi: {self.stop_signal} received; checkpoint after round {r + 1} written to "
                      f"{self.writer.path}; continue with: python -m fedmpi.run --resume {self.writer.path}",
                      file=sys.stderr, flush=True)
                return False
        self.header[:] = (CMD_STOP, 0, 0)
        self.comm.bcast_idle(self.header)
        self.writer.checkpoint(self.cfg.rounds - 1, self.weights, self.state())  # lets --resume extend the run
        self.writer.finish(self.cfg.rounds - 1, self.weights, self.final_privacy())
        if not self.quiet:
            print(f"done: {self.cfg.rounds - start_round} rounds in {time.perf_counter() - run_start:.1f} s; "
                  f"final test accuracy {self.last_accuracy:.4f}; results in {self.writer.path}", flush=True)
        return True

    def final_privacy(self) -> dict:
        if self.accountant is None:
            return {}
        eps, eps_median, used = self.accountant.final()
        p = self.cfg.privacy
        if not self.quiet:
            print(f"privacy: epsilon {eps:.4g} (median over clients {eps_median:.4g}) at delta {p.delta:g}, "
                  f"{used.upper()} accountant, noise multiplier {p.noise_multiplier:.4g}", flush=True)
        return {"epsilon": eps, "epsilon_median": eps_median, "accountant": used}

    def gather(self, r: int, cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        k, d = len(cohort), self.model.size
        self.header[:] = (CMD_ROUND, r, k)
        self.comm.bcast_idle(self.header)
        self.comm.bcast(cohort)
        self.comm.bcast(self.weights)
        counts = slot_counts(k, self.comm.size)
        meta = np.zeros((k, len(META_FIELDS)))
        if self.cfg.transport == "reduce":  # O(d) on rank 0: the weighted sum, never the rows
            total = np.zeros(d)
            if self.host is not None:
                rows = np.empty((k, d), dtype=np.float32)
                self.host.train_slots(r, cohort, self.weights, rows, meta)
                total = weighted_total(rows, meta)
            else:
                self.comm.barrier_idle()
                self.comm.gather_rows(self.no_meta, meta, counts)
                self.comm.reduce_sum(np.zeros(d), total)
            return total, meta, counts
        updates = np.empty((k, d), dtype=np.float32)
        if self.host is not None:
            self.host.train_slots(r, cohort, self.weights, updates, meta)
        else:
            self.comm.barrier_idle()
            self.comm.gather_rows(self.no_rows, updates, counts)
            self.comm.gather_rows(self.no_meta, meta, counts)
        return updates, meta, counts

    def run_round(self, r: int) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        cohort = sample_cohort(cfg, r)
        k = len(cohort)
        updates, meta, counts = self.gather(r, cohort)
        t1 = time.perf_counter()

        samples = meta[:, META["num_samples"]]
        byzantine = np.isin(cohort, self.byzantine_ids)
        scores = np.full(k, np.nan)
        clipped = meta[:, META["clipped_fraction"]]
        if cfg.transport == "reduce":
            norms = meta[:, META["update_norm"]]
        else:
            omniscient_attack(cfg, self.attack_params, updates, byzantine)
            norms = aggregation.row_norms(updates) if k else np.empty(0)
        if cfg.transport == "reduce":
            total_samples = samples.sum()
            vector = updates / total_samples if total_samples else np.zeros(self.model.size)
            selected = samples > 0
            scores = samples / total_samples if total_samples else scores
        elif cfg.privacy.mode == "client_central":
            vector, was_clipped = central_dp_aggregate(cfg, updates, r)
            clipped = was_clipped.astype(np.float64)
            selected = np.ones(k, dtype=bool)
        elif k:
            vector, selected, scores = self.aggregate(updates, samples, r)
        else:  # an empty Poisson cohort leaves the model as it is
            vector, selected = np.zeros(self.model.size), np.zeros(0, dtype=bool)
        self.optimizer.step(self.weights, vector)
        epsilon = epsilon_median = np.nan
        if self.accountant is not None:
            epsilon, epsilon_median = self.accountant.after_round(cohort, samples)
        t2 = time.perf_counter()

        test_loss = test_acc = np.nan
        if r == cfg.rounds - 1 or (r + 1) % cfg.eval.every == 0:
            test_loss, test_acc = evaluate(self.model, self.weights, self.data.x_test, self.data.y_test,
                                           cfg.eval.batch_size)
            self.last_accuracy = test_acc
        t3 = time.perf_counter()

        offsets = np.cumsum([0] + counts)
        train_s = max(meta[offsets[i]:offsets[i + 1], META["train_s"]].sum() for i in range(len(counts)))
        train_loss = float(np.average(meta[:, META["train_loss"]], weights=samples)) if samples.sum() else np.nan
        p = cfg.privacy
        dp = p.mode != "none"
        if p.mode == "sample":
            seen = samples * meta[:, META["steps"]]
            clipped_round = float(np.average(clipped, weights=seen)) if seen.sum() else np.nan
        else:
            clipped_round = float(clipped.mean()) if dp and k else np.nan
        self.writer.append_round(
            {
                "round": r, "cohort_size": k, "test_accuracy": test_acc, "test_loss": test_loss,
                "train_loss": train_loss, "update_norm": float(np.linalg.norm(vector)),
                "byzantine_in_cohort": int(byzantine.sum()), "byzantine_selected": int((byzantine & selected).sum()),
                "epsilon": epsilon, "epsilon_median": epsilon_median, "delta": p.delta if dp else np.nan,
                "noise_multiplier": p.noise_multiplier if dp else np.nan,
                "clip_norm": p.max_grad_norm if dp else np.nan, "clipped_fraction": clipped_round,
                "wall_s": time.perf_counter() - t0, "train_s": train_s,
                "comm_s": max(0.0, (t1 - t0) - train_s), "aggregate_s": t2 - t1, "eval_s": t3 - t2,
            },
            {
                "round": np.full(k, r), "slot": np.arange(k), "client_id": cohort,
                "num_samples": samples.astype(np.int64), "update_norm": norms,
                "train_loss": meta[:, META["train_loss"]], "steps": meta[:, META["steps"]].astype(np.int64),
                "train_s": meta[:, META["train_s"]], "byzantine": byzantine, "selected": selected, "score": scores,
                "clipped_fraction": clipped,
            },
        )
        if self.writer.snapshot_every and (r + 1) % self.writer.snapshot_every == 0:
            self.writer.snapshot(r, self.weights)
        if not self.quiet:
            acc = f"acc {test_acc:.4f}  loss {test_loss:.4f}" if np.isfinite(test_acc) else "acc    -    loss    -   "
            eps = f"  eps {epsilon:.3g}" if dp else ""
            print(f"round {r + 1:>{len(str(cfg.rounds))}}/{cfg.rounds}  {acc}  train_loss {train_loss:.4f}{eps}  "
                  f"{time.perf_counter() - t0:.2f} s", flush=True)


