"""The checks that need more than the config, in one step, before any MPI traffic.

:func:`preflight` runs on every rank after the config was validated: the results
path (rank 0), the data files, the device, then the data themselves, the model
against the data, what the attack needs of the data, and rank 0's memory budget.
Each problem is one :class:`fedmpi.schema.ConfigError` line (exit status 2, no
results file).
"""

from __future__ import annotations

import math
import os
import resource

from . import data as data_mod
from .aggregation import PRE_STEPS, RULES
from .architectures import ARCHITECTURES, count_params
from .attacks import ATTACKS, resolved_params
from .data import FederatedData
from .schema import Config, ConfigError
from .sharded.layout import BlockLayout
from .system import available_memory


def preflight(cfg: Config, rank: int, new_file: bool = True, ranks: int = 1, local_ranks: int = 1) -> FederatedData:
    """Check ``cfg`` against the world and load this rank's data (training data on
    every rank, the test set on rank 0). ``new_file``: the run creates its results
    file (not a resume). ``ranks``: the world size; ``local_ranks``: ranks on this
    node (they share its memory)."""
    if rank == 0 and new_file:
        check_output_path(cfg)
    data_mod.check_files(cfg)
    check_device(cfg)
    data = data_mod.load(cfg, need_train=True, need_test=rank == 0)
    check_model(cfg, data)
    check_attack(cfg, data)
    if rank == 0 or cfg.transport == "sharded":
        check_memory(cfg, data, rank, ranks, local_ranks)
    return data


def check_output_path(cfg: Config) -> None:
    path = cfg.output.path
    if os.path.exists(path) and not cfg.output.overwrite:
        raise ConfigError("output.path", path, "file exists; pass --overwrite (or output.overwrite: true) "
                          "or choose another path")
    if os.path.isdir(path):
        raise ConfigError("output.path", path, "is a directory; give a file name")


def check_device(cfg: Config) -> None:
    if cfg.device == "cuda":
        import torch  # only where a GPU is asked for: the check needs torch's view of the devices

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda", "no CUDA device is visible to this rank (torch.cuda.is_available() "
                              "is False); use cpu, or auto to take a GPU only where there is one")


def check_model(cfg: Config, data: FederatedData) -> None:
    check = ARCHITECTURES[cfg.model.name].check
    problem = check(data.input_shape) if check else None
    if problem:
        raise ConfigError("model.name", cfg.model.name, f"{problem}; data.name = {cfg.data.name} gives samples of "
                          f"shape {data.input_shape}")


def check_attack(cfg: Config, data: FederatedData) -> None:
    """What the attack needs of the data (the backdoor: images, a target class)."""
    entry = ATTACKS[cfg.attack.name]
    if entry.check is not None:
        entry.check(resolved_params(cfg), data)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _cohort_bound(cfg: Config) -> int:
    k = cfg.clients.per_round
    if cfg.clients.sampling == "poisson":  # the cohort varies: allow for a large one
        k = min(cfg.clients.total, int(k + 6 * math.sqrt(k) + 1))
    return k


def server_memory(cfg: Config, data: FederatedData) -> tuple[int, int, int]:
    """(bytes of update rows, other bytes rank 0 will allocate, parameters d): an estimate
    made before the first round, with ``transport: gather`` or ``reduce``.
    Rows: cohort x d x 4 (none with transport: reduce); the rest from the registries:
    each pre-aggregation step's float64 rows, what the rule allocates, the honest rows
    an omniscient attack copies."""
    d = count_params(cfg.model, data.input_shape, data.num_classes)
    k = _cohort_bound(cfg)
    rows = 0 if cfg.transport == "reduce" else k * d * 4
    return rows, 8 * d * 8 + _rule_memory(cfg, k, d), d


def _rule_memory(cfg: Config, k: int, width: int) -> int:
    """Bytes the steps, the rule and an omniscient attack allocate over ``width`` columns
    of k rows: each step's float64 rows, the rule's own, the honest rows copied."""
    g = cfg.aggregator
    other, n = 0, k
    for step in g.pre:
        n = PRE_STEPS[step.name].rows_after(n, step)
        other += n * width * 8
    other += RULES[g.name].memory(n, width, g.f)
    attack = ATTACKS[cfg.attack.name]
    if attack.needs_rows:
        other += k * width * 4 + attack.memory(k, width)  # the honest rows, copied, and what the attack's search holds
    return other


def sharded_memory(cfg: Config, d: int, rank: int, ranks: int) -> tuple[int, int, int]:
    """(bytes of update columns, bytes of training rows, other bytes) that ``rank`` of
    ``ranks`` will allocate with ``transport: sharded``: its blocks' columns of every
    row (cohort x w x 4, w = its share of the d columns); the rows it trains (k_r x d x
    4, none on rank 0 of several ranks: its share of the cohort is zero); what the steps,
    the rule and an attack allocate over its w columns; the n x n float64 matrices of
    the block tree (at most one partial per tree level, plus rank 0's distances, Krum's
    sorted copy and the Gram matrix: log2(blocks) + 6 of them); whole-model vectors
    (the weights, the model's parameters and gradients, a checkpoint's gathered state:
    4 x d x 8) and its columns of the float64 ones (aggregate, optimizer and rule state:
    8 x w x 8)."""
    from .protocol import slot_counts

    k = _cohort_bound(cfg)
    layout = BlockLayout(d, cfg.shard_block, ranks)
    width = layout.width(rank)
    training = slot_counts(k, ranks)[rank] * d * 4 if ranks > 1 else 0
    matrices = (math.ceil(math.log2(layout.blocks)) + 6) * k * k * 8 if layout.blocks > 1 else 6 * k * k * 8
    return k * width * 4, training, 4 * d * 8 + 8 * width * 8 + _rule_memory(cfg, k, width) + matrices


def check_memory(cfg: Config, data: FederatedData, rank: int = 0, ranks: int = 1, local_ranks: int = 1) -> None:
    """Refuse, before any work, a run whose rows would not fit the budget: rank 0's with
    ``transport: gather`` or ``reduce``; every rank's with ``transport: sharded``, where
    each holds its blocks' columns (the node's available memory is shared among the
    ranks on it unless ``memory_limit_gb`` gives each rank's budget)."""
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sharded = cfg.transport == "sharded"
    d = count_params(cfg.model, data.input_shape, data.num_classes)
    if sharded:
        rows, training, other = sharded_memory(cfg, d, rank, ranks)
    else:
        rows, other, d = server_memory(cfg, data)
        training = 0
    need = rows + training + other + resident + (128 << 20)  # + model, gradients, evaluation batches
    if cfg.memory_limit_gb is not None:
        budget, what = int(cfg.memory_limit_gb * 2**30), f"memory_limit_gb = {cfg.memory_limit_gb:g}"
    elif sharded and local_ranks > 1:
        budget, what = available_memory() // local_ranks + resident, f"this node's available memory / {local_ranks} ranks"
    else:
        budget, what = available_memory() + resident, "the memory available on this node"
    if need <= budget:
        return
    if sharded:
        width = BlockLayout(d, cfg.shard_block, ranks).width(rank)
        raise ConfigError("clients.per_round", cfg.clients.per_round,
                          f"rank {rank} of {ranks} would need about {_gib(need)}: {_gib(rows)} of update columns (cohort x "
                          f"its {width} of the {d} parameters x 4 bytes), {_gib(training)} of the rows it trains, plus "
                          f"{_gib(need - rows - training)} of working memory, over its budget of {_gib(budget)} ({what}); "
                          "lower clients.per_round, use more ranks (on more nodes), or raise memory_limit_gb")
    raise ConfigError("clients.per_round", cfg.clients.per_round,
                      f"rank 0 would need about {_gib(need)}: {_gib(rows)} of update rows (cohort x {d} parameters "
                      f"x 4 bytes) plus {_gib(need - rows)} of working memory, over its budget of {_gib(budget)} "
                      f"({what}); lower clients.per_round, use transport: reduce (FedAvg) or sharded, or raise "
                      "memory_limit_gb")
