"""The checks that need more than the config, in one step, before any MPI traffic.

:func:`preflight` runs on every rank after the config was validated: the results
path (rank 0), the data files, the device, then the data themselves, the model
against the data, and rank 0's memory budget, which decides where the clients'
state lives (memory, or a file when it does not fit; refused when the disk
cannot hold it either). Each problem is one :class:`fedmpi.schema.ConfigError`
line (exit status 2, no results file).
"""

from __future__ import annotations

import math
import os
import resource
import shutil

from . import data as data_mod
from .aggregation import PRE_STEPS, RULES
from .algorithms import ALGORITHMS, client_state_bytes, state_path
from .architectures import ARCHITECTURES, count_params
from .attacks import ATTACKS
from .data import FederatedData
from .schema import Config, ConfigError
from .system import available_memory


def preflight(cfg: Config, rank: int, new_file: bool = True) -> tuple[FederatedData, str | None]:
    """Check ``cfg`` against the world and load this rank's data (training data on
    every rank, the test set on rank 0). ``new_file``: the run creates its results
    file (not a resume). Returns the data and, on rank 0 of a run whose algorithm
    keeps client state, where that state lives (``memory`` or ``file``)."""
    if rank == 0 and new_file:
        check_output_path(cfg)
    data_mod.check_files(cfg)
    check_device(cfg)
    data = data_mod.load(cfg, need_train=True, need_test=rank == 0)
    check_model(cfg, data)
    store = None
    if rank == 0:
        store = check_memory(cfg, data)
    return data, store


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


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def server_memory(cfg: Config, data: FederatedData) -> tuple[int, int, int]:
    """(bytes of update rows, other bytes rank 0 will allocate, parameters d): an estimate
    made before the first round. Rows: cohort x d x 4 (none with transport: reduce);
    the rest from the registries: each pre-aggregation step's float64 rows, what the
    rule allocates, the honest rows an omniscient attack copies, the per-slot rows an
    algorithm with client state sends (the state itself: :func:`place_client_state`)."""
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
    if ALGORITHMS[cfg.algorithm.name].client_state:
        other += k * d * 4  # the per-slot rows sent with the round (SCAFFOLD's c - c_i)
    return rows, other, d


def check_memory(cfg: Config, data: FederatedData) -> str | None:
    """Rank 0: refuse, before any work, a run whose rows would not fit its budget; decide
    where the clients' state lives (None: the algorithm keeps none)."""
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
    state = client_state_bytes(cfg, d)
    if not state:
        return None
    return place_client_state(cfg, d, state, budget - need, f"{_gib(budget)}, {what}")


def _free_bytes(directory: str) -> tuple[int, int]:
    """(free bytes, device id) of the file system holding ``directory`` (or its nearest existing parent)."""
    while directory and not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    directory = directory or "."
    return shutil.disk_usage(directory).free, os.stat(directory).st_dev


def place_client_state(cfg: Config, d: int, state: int, memory_left: int, budget_text: str) -> str:
    """``memory`` or ``file`` for ``state`` bytes of client state, given what is left of rank
    0's memory budget; a ConfigError when neither memory nor disk can hold it. The
    results file holds two checkpoint copies of the state (its two slots) at worst."""
    a = cfg.algorithm
    results_dir = os.path.dirname(os.path.abspath(cfg.output.path))
    results_free, results_dev = _free_bytes(results_dir)
    store_dir = os.path.dirname(state_path(cfg))
    store_free, store_dev = _free_bytes(store_dir)
    checkpoint_ok = results_free >= 2 * state
    if store_dev == results_dev:
        file_ok = results_free >= 3 * state
    else:
        file_ok = checkpoint_ok and store_free >= state
    fits_memory = state <= memory_left
    size = (f"algorithm.name = {a.name} keeps {len(ALGORITHMS[a.name].client_state)} row(s) of {d} parameters per client: "
            f"{cfg.clients.total} clients x {d} x 4 bytes = {_gib(state)}")
    if a.state_store == "memory" and not fits_memory:
        raise ConfigError("algorithm.state_store", "memory", f"{size}, over the {_gib(max(memory_left, 0))} left of rank "
                          f"0's memory budget ({budget_text}); use auto or file (a file-backed store)")
    if a.state_store == "memory" or (a.state_store == "auto" and fits_memory):
        if not checkpoint_ok:
            raise ConfigError("clients.total", cfg.clients.total, f"{size}; its checkpoint copies need up to "
                              f"{_gib(2 * state)} in {results_dir}, which has {_gib(results_free)} free")
        return "memory"
    if not file_ok:
        where = (f"{_gib(results_free)} free in {results_dir}, which needs {_gib(3 * state)} for the store and the two "
                 "checkpoint copies in the results file" if store_dev == results_dev else
                 f"{_gib(store_free)} free in {store_dir} for the store, {_gib(results_free)} in {results_dir} for the "
                 f"two checkpoint copies ({_gib(2 * state)})")
        fits = ("does not fit on the disk" if a.state_store == "file" else
                f"fits neither rank 0's memory ({_gib(max(memory_left, 0))} left of {budget_text}) nor the disk")
        raise ConfigError("clients.total", cfg.clients.total, f"{size}, which {fits} ({where}); lower "
                          "clients.total or the model size, or set algorithm.state_dir to a larger disk")
    return "file"
