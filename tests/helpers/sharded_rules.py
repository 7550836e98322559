"""Run under mpirun by tests/test_sharded_run.py: every rule and pre-aggregation step
over column blocks on real ranks, through the real exchange (Alltoallw), check and
aggregator; rank 0 gathers each aggregate and writes what it decided to OUT.npz.

    mpirun -n P python tests/helpers/sharded_rules.py OUT.npz

The rows (the test reads the same generator): honest rows spread around a common
direction, two rows at 1e30 scale, one sign-flipped x10, one with a NaN coordinate
and one of +inf (left out before the rule, counting against f), K = 15 rows of
d = 203 coordinates, blocks of 8 columns (25 blocks: several per rank at 2, 3 and 5
ranks).
"""

from __future__ import annotations

import sys

import numpy as np

from fedmpi.comm import MPIComm
from fedmpi.config import load
from fedmpi.protocol import RECORD, RECORD_FIELDS, slot_counts
from fedmpi.rounds import Updates
from fedmpi.sharded.layout import BlockLayout
from fedmpi.sharded.round import ColumnCheck, ShardContext, ShardedAggregator

K, D, BLOCK = 15, 203, 8
COMMON = ["clients.total=15", "clients.per_round=15", "transport=sharded", f"shard_block={BLOCK}"]
CASES = {
    "fedavg": [],
    "krum": ["aggregator.name=krum", "aggregator.f=3"],
    "multi_krum": ["aggregator.name=multi_krum", "aggregator.f=3", "aggregator.m=7"],
    "median": ["aggregator.name=median"],
    "trimmed_mean": ["aggregator.name=trimmed_mean", "aggregator.f=3"],
    "meamed": ["aggregator.name=meamed", "aggregator.f=3"],
    "geometric_median": ["aggregator.name=geometric_median", "aggregator.tol=1.0e-12"],
    "bulyan": ["aggregator.name=bulyan", "aggregator.f=3"],
    "centered_clipping": ["aggregator.name=centered_clipping", "aggregator.tau=0.5", "aggregator.iterations=3"],
    "nnm_krum": ["aggregator.name=krum", "aggregator.f=3", "aggregator.pre=[{name: nnm}]"],
    "bucketing_median": ["aggregator.name=median", "aggregator.pre=[{name: bucketing, bucket_size: 2}]"],
    "clip_fedavg": ["aggregator.name=fedavg", "aggregator.pre=[{name: clip, max_norm: 5.0}]"],
    "clip_bucketing_krum": ["aggregator.name=krum", "aggregator.f=1",
                            "aggregator.pre=[{name: clip, max_norm: 5.0}, {name: bucketing, bucket_size: 2}]"],
    "alie_trimmed_mean": ["aggregator.name=trimmed_mean", "attack.name=alie", "attack.clients=[3, 8, 11]"],
    "ipm_multi_krum": ["aggregator.name=multi_krum", "attack.name=ipm", "attack.clients=[0, 5, 13]"],
    "mda": ["aggregator.name=mda", "aggregator.f=3"],
    "monna": ["aggregator.name=monna", "aggregator.f=3"],
    "arc_median": ["aggregator.name=median", "aggregator.f=3", "aggregator.pre=[{name: arc}]"],
    "arc_nnm_mda": ["aggregator.name=mda", "aggregator.f=2", "aggregator.pre=[{name: arc}, {name: nnm}]"],
    "skipped": ["aggregator.name=multi_krum", "aggregator.f=1", "aggregator.m=14"],  # 13 finite rows < m
}


def rows_and_samples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(17)
    base = rng.standard_normal(D)
    rows = (base + 0.5 * rng.standard_normal((K, D))).astype(np.float32)
    rows[[4, 12]] = (rng.standard_normal((2, D)) * 1e30).astype(np.float32)
    rows[7] = -10 * rows[6]
    rows[9, 17] = np.nan
    rows[13] = np.inf
    return rows, rng.integers(5, 60, K).astype(np.float64)


def main(out_path: str) -> None:
    comm = MPIComm()
    rows, samples = rows_and_samples()
    counts = slot_counts(K, comm.size)
    start = sum(counts[:comm.rank])
    layout = BlockLayout(D, BLOCK, comm.size)
    context = ShardContext(layout, comm)
    cohort = np.arange(K, dtype=np.int64)
    results = {}
    for name, overrides in CASES.items():
        cfg = load(None, COMMON + overrides)
        mine = np.ascontiguousarray(rows[start:start + counts[comm.rank]])  # what this rank trained
        columns = context.columns(comm.exchange_columns(mine, counts, layout.spans))
        norms, finite = ColumnCheck(cfg)(columns, cohort, 0)
        records = None
        if comm.rank == 0:
            records = np.zeros((K, len(RECORD_FIELDS)))
            records[:, RECORD["num_samples"]] = samples
        aggregator = ShardedAggregator(cfg, D, context)
        result = aggregator(Updates(cohort, records, counts, finite=finite, shard=columns), 0)
        vector = np.empty(D) if comm.rank == 0 else None
        lo, hi = context.span
        if vector is not None:
            vector[lo:hi] = result.vector
        comm.gather_columns(result.vector if vector is None else vector[lo:hi], vector, layout.spans)
        state = aggregator.gather_state()  # the rule's state (centered clipping's center) from every rank's columns
        if comm.rank == 0:
            results.update({f"{name}/vector": vector, f"{name}/selected": result.selected,
                            f"{name}/scores": result.scores, f"{name}/norm": np.array([result.norm]),
                            f"{name}/row_norms": norms, f"{name}/finite": finite,
                            f"{name}/skipped": np.array(result.skipped or ""),
                            **{f"{name}/state/{k}": v for k, v in state.items()}})
    if comm.rank == 0:
        np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
