"""Rank 0: the federated round loop.

:func:`run_server` runs every round as follows:

1. sample the cohort: ``clients.per_round`` distinct ids from the keyed
   generator (seed, "cohort", round), sorted;
2. broadcast the header, the cohort and the global weights (flat float32);
3. gather the (K, d) float32 update rows, in cohort order, and the per-client
   records (with one process, train them here instead);
4. let omniscient attackers (ALIE, IPM) replace the Byzantine rows, run the
   pre-aggregation steps and the aggregator, and step the server optimizer;
5. evaluate, append the round to the HDF5 file (flushed), print one line.

After the last round the workers get a STOP header and the final model is written.
"""

from __future__ import annotations

import time
from statistics import NormalDist

import numpy as np

from . import aggregation, attacks, seeding
from .config import Config
from .data import FederatedData
from .models import FlatModel
from .optimizers import ServerOptimizer
from .results import ResultsWriter
from .training import evaluate
from .worker import CMD_ROUND, CMD_STOP, META, META_FIELDS, ClientHost, slot_counts


def sample_cohort(cfg: Config, round_index: int) -> np.ndarray:
    """The round's cohort: sorted distinct client ids, keyed by (seed, round)."""
    g = seeding.rng(cfg.seed, "cohort", round_index)
    return np.sort(g.choice(cfg.clients.total, size=cfg.clients.per_round, replace=False)).astype(np.int64)


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


def run_server(cfg: Config, comm, data: FederatedData, model: FlatModel, weights: np.ndarray,
               writer: ResultsWriter, quiet: bool = False) -> np.ndarray:
    """Run all rounds from ``weights``; return the final global weights."""
    d = model.size
    optimizer = ServerOptimizer(cfg.server, d)
    host = ClientHost(cfg, data, model) if comm.size == 1 else None
    header = np.zeros(3, dtype=np.int64)
    no_rows = np.empty((0, d), dtype=np.float32)
    no_meta = np.empty((0, len(META_FIELDS)))
    updates = np.empty((cfg.clients.per_round, d), dtype=np.float32)
    meta = np.empty((cfg.clients.per_round, len(META_FIELDS)))
    aggregate = RoundAggregator(cfg, d)
    a = cfg.attack
    byzantine_ids = attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)
    attack_params = attacks.resolved_params(a.name, a.params, cfg.clients.per_round)
    run_start = time.perf_counter()
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        cohort = sample_cohort(cfg, r)
        k = len(cohort)
        header[:] = (CMD_ROUND, r, k)
        comm.bcast(header)
        comm.bcast(cohort)
        comm.bcast(weights)
        counts = slot_counts(k, comm.size)
        if host is not None:
            host.train_slots(r, cohort, weights, updates, meta)
        else:
            comm.gather_rows(no_rows, updates, counts)
            comm.gather_rows(no_meta, meta, counts)
        t1 = time.perf_counter()

        samples = meta[:, META["num_samples"]]
        byzantine = np.isin(cohort, byzantine_ids)
        omniscient_attack(cfg, attack_params, updates, byzantine)
        norms = aggregation.row_norms(updates)
        vector, selected, scores = aggregate(updates, samples, r)
        optimizer.step(weights, vector)
        t2 = time.perf_counter()

        last = r == cfg.rounds - 1
        test_loss = test_acc = np.nan
        if last or (r + 1) % cfg.eval.every == 0:
            test_loss, test_acc = evaluate(model, weights, data.x_test, data.y_test, cfg.eval.batch_size)
        t3 = time.perf_counter()

        offsets = np.cumsum([0] + counts)
        per_rank_train = [meta[offsets[i]:offsets[i + 1], META["train_s"]].sum() for i in range(len(counts))]
        train_s = max(per_rank_train)
        train_loss = float(np.average(meta[:, META["train_loss"]], weights=samples)) if samples.sum() else np.nan
        writer.append_round(
            {
                "round": r, "cohort_size": k, "test_accuracy": test_acc, "test_loss": test_loss,
                "train_loss": train_loss, "update_norm": float(np.linalg.norm(vector)),
                "byzantine_in_cohort": int(byzantine.sum()), "byzantine_selected": int((byzantine & selected).sum()),
                "wall_s": time.perf_counter() - t0, "train_s": train_s,
                "comm_s": max(0.0, (t1 - t0) - train_s), "aggregate_s": t2 - t1, "eval_s": t3 - t2,
            },
            {
                "round": np.full(k, r), "slot": np.arange(k), "client_id": cohort,
                "num_samples": samples.astype(np.int64), "update_norm": norms,
                "train_loss": meta[:, META["train_loss"]], "steps": meta[:, META["steps"]].astype(np.int64),
                "train_s": meta[:, META["train_s"]], "byzantine": byzantine, "selected": selected, "score": scores,
            },
        )
        if writer.snapshot_every and (r + 1) % writer.snapshot_every == 0:
            writer.snapshot(r, weights)
        if not quiet:
            acc = f"acc {test_acc:.4f}  loss {test_loss:.4f}" if np.isfinite(test_acc) else "acc    -    loss    -   "
            print(f"round {r + 1:>{len(str(cfg.rounds))}}/{cfg.rounds}  {acc}  train_loss {train_loss:.4f}  "
                  f"{time.perf_counter() - t0:.2f} s", flush=True)
    header[:] = (CMD_STOP, 0, 0)
    comm.bcast(header)
    writer.finish(cfg.rounds - 1, weights)
    if not quiet:
        print(f"done: {cfg.rounds} rounds in {time.perf_counter() - run_start:.1f} s; "
              f"final test accuracy {test_acc:.4f}; results in {writer.path}", flush=True)
    return weights
