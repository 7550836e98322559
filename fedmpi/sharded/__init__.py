"""``transport: sharded``: robust aggregation over column blocks held by every rank.

The d coordinates of an update are cut into fixed-size column blocks
(``shard_block`` columns each; the size does not depend on the number of ranks),
and each rank owns a contiguous run of blocks. After training, every cohort
row's slice for a block reaches the block's owner (one ``Alltoallw`` of
buffers), so no rank holds the (K, d) rows. Then:

- what is coordinate-wise (the median, the trimmed mean, Meamed, the means that
  FedAvg and every selecting rule end with, the server optimizer) runs on each
  block where it lives;
- what needs whole rows (norms, the non-finite check, Gram matrices, squared
  distances) is a per-block partial result, combined over the blocks in one
  fixed tree order (:mod:`fedmpi.sharded.layout`), so the sum is bitwise the
  same for any rank count or layout;
- rank 0 makes the global decisions from the combined quantities (which rows
  Krum selects, the recentring groups, the clipping factors) and shares them.

Modules: :mod:`~fedmpi.sharded.layout` (blocks, owners, the fixed tree; pure),
:mod:`~fedmpi.sharded.columns` (one rank's columns and the block-combined
quantities), :mod:`~fedmpi.sharded.rules` (every rule and pre-aggregation step
over columns), :mod:`~fedmpi.sharded.round` (the round's sharded parts on every
rank: the exchange, the check, the aggregator, the server optimizer, state for
checkpoints).
"""
