"""The checks that need more than the config, in one step, before any MPI traffic.

:func:`preflight` runs on every rank after the config was validated: the results
path (rank 0), the data files, the device, then the data themselves, the model
against the data, and rank 0's memory budget. Each problem is one
:class:`fedmpi.schema.ConfigError` line (exit status 2, no results file).
"""

from __future__ import annotations

import math
import os
import resource

from . import data as data_mod
from .aggregation import PRE_STEPS, RULES
from .architectures import ARCHITECTURES, count_params
from .attacks import ATTACKS
from .data import FederatedData
from .schema import Config, ConfigError
from .system import available_memory


def preflight(cfg: Config, rank: int, new_file: bool = True) -> FederatedData:
    """Check ``cfg`` against the world and load this rank's data (training data on
    every rank, the test set on rank 0). ``new_file``: the run creates its results
    file (not a resume)."""
    if rank == 0 and new_file:
        check_output_path(cfg)
    data_mod.check_files(cfg)
    check_device(cfg)
    data = data_mod.load(cfg, need_train=True, need_test=rank == 0)
    m = cfg.audit.membership
    if m.level != "none":  # the audited run trains on a keyed half of the examples (clients)
        from .membership import restrict, target_keep

        data = restrict(data, target_keep(cfg.seed, [data.client(c)[1] for c in range(data.num_clients)], m.level))
    check_model(cfg, data)
    if cfg.audit.inversion.method != "none":
        check_inversion(cfg, data)
    if rank == 0:
        check_memory(cfg, data)
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


def check_inversion(cfg: Config, data: FederatedData) -> None:
    """Gradient inversion reconstructs a client's whole shard as one batch of images."""
    v = cfg.audit.inversion
    if len(data.input_shape) != 3:
        raise ConfigError("audit.inversion.method", v.method, f"reconstructs images; data.name = {cfg.data.name} gives "
                          f"samples of shape {data.input_shape}")
    largest = int(data.client_sizes().max())
    if v.method in ("analytic", "idlg") and largest > 1:
        raise ConfigError("audit.inversion.method", v.method, f"recovers the one example behind an update, but clients "
                          f"hold up to {largest} examples; give every client one (clients.total = the training set's size)")
    if largest > v.max_examples:
        raise ConfigError("audit.inversion.max_examples", v.max_examples, f"the attack reconstructs a client's whole "
                          f"shard as one batch, and clients hold up to {largest} examples; raise it or spread the data "
                          "over more clients (clients.total)")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def server_memory(cfg: Config, data: FederatedData) -> tuple[int, int, int]:
    """(bytes of update rows, other bytes rank 0 will allocate, parameters d): an estimate
    made before the first round. Rows: cohort x d x 4 (none with transport: reduce);
    the rest from the registries: each pre-aggregation step's float64 rows, what the
    rule allocates, the honest rows an omniscient attack copies."""
    d = count_params(cfg.model, data.input_shape, data.num_classes)
    k = cfg.clients.per_round
    if cfg.clients.sampling == "poisson":  # the cohort varies: allow for a large one
        k = min(cfg.clients.total, int(k + 6 * math.sqrt(k) + 1))
    rows = 0 if cfg.transport == "reduce" else k * d * 4
    other = 8 * d * 8  # weights, aggregate, optimizer state, checkpoint slots, center...
    g = cfg.aggregator
    n = k
    for step in g.pre:
        n = PRE_STEPS[step.name].rows_after(n, step)
        other += n * d * 8
    other += RULES[g.name].memory(n, d, g.f)
    if ATTACKS[cfg.attack.name].needs_rows:
        other += k * d * 4  # the honest rows, copied
    return rows, other, d


def check_memory(cfg: Config, data: FederatedData) -> None:
    """Rank 0: refuse, before any work, a run whose rows would not fit its budget."""
    rows, other, d = server_memory(cfg, data)
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    need = rows + other + resident + (128 << 20)  # + model, gradients, evaluation batches
    if cfg.memory_limit_gb is not None:
        budget, what = int(cfg.memory_limit_gb * 2**30), f"memory_limit_gb = {cfg.memory_limit_gb:g}"
    else:
        budget, what = available_memory() + resident, "the memory available on this node"
    if need > budget:
        raise ConfigError("clients.per_round", cfg.clients.per_round,
                          f"rank 0 would need about {_gib(need)}: {_gib(rows)} of update rows (cohort x {d} parameters "
                          f"x 4 bytes) plus {_gib(need - rows)} of working memory, over its budget of {_gib(budget)} "
                          f"({what}); lower clients.per_round, use transport: reduce (FedAvg), or raise memory_limit_gb")
