"""Rank 0: the federated round loop.

:func:`run_server` runs every round as follows:

1. sample the cohort: ``clients.per_round`` distinct ids from the keyed
   generator (seed, "cohort", round), sorted;
2. broadcast the header, the cohort and the global weights (flat float32);
3. gather the (K, d) float32 update rows, in cohort order, and the per-client
   records (with one process, train them here instead);
4. aggregate (FedAvg, weights = client sample counts) and step the server
   optimizer;
5. evaluate, append the round to the HDF5 file (flushed), print one line.

After the last round the workers get a STOP header and the final model is written.
"""

from __future__ import annotations

import time

import numpy as np

from . import aggregation, seeding
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
        norms = aggregation.row_norms(updates)
        result = aggregation.fedavg(updates, weights=samples)
        optimizer.step(weights, result.vector)
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
                "train_loss": train_loss, "update_norm": float(np.linalg.norm(result.vector)),
                "wall_s": time.perf_counter() - t0, "train_s": train_s,
                "comm_s": max(0.0, (t1 - t0) - train_s), "aggregate_s": t2 - t1, "eval_s": t3 - t2,
            },
            {
                "round": np.full(k, r), "slot": np.arange(k), "client_id": cohort,
                "num_samples": samples.astype(np.int64), "update_norm": norms,
                "train_loss": meta[:, META["train_loss"]], "steps": meta[:, META["steps"]].astype(np.int64),
                "train_s": meta[:, META["train_s"]],
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
