"""The checks that need more than the config, in one step, before any MPI traffic.

:func:`preflight` runs on every rank after the config was validated: the results
path (rank 0), the data files, the device, then the data themselves, the model
against the data (a user model is built and tried on a probe batch), what the
attack needs of the data, the user code of :mod:`fedmpi.extensions` (rank 0
tries rules, steps, attack hooks and optimizers on probe inputs), and rank 0's
memory budget, which decides where the clients' state lives (memory, or a file
when it does not fit; refused when the disk cannot hold it either). Each
problem is one :class:`fedmpi.schema.ConfigError` line (exit status 2, no
results file).
"""

from __future__ import annotations

import math
import os
import resource
import shutil

import numpy as np

from . import attacks, extensions, seeding
from . import data as data_mod
from .algorithms import ALGORITHMS, client_state_bytes, state_path
from .architectures import ARCHITECTURES, count_params
from .data import FederatedData
from .extensions import ExtensionFailed, is_path, one_line
from .schema import Config, ConfigError
from .sharded.layout import BlockLayout
from .system import available_memory

PROBE_WIDTH = 6  # parameters of the probe rows that user code on rank 0 is tried on


def preflight(cfg: Config, rank: int, new_file: bool = True, ranks: int = 1,
              local_ranks: int = 1) -> tuple[FederatedData, str | None]:
    """Check ``cfg`` against the world and load this rank's data (training data on
    every rank, the test set on rank 0). ``new_file``: the run creates its results
    file (not a resume). ``ranks``: the world size; ``local_ranks``: ranks on this
    node (they share its memory). Returns the data and, on rank 0 of a run whose
    algorithm keeps client state, where that state lives (``memory`` or ``file``)."""
    if rank == 0 and new_file:
        check_output_path(cfg)
    dataset = extensions.dataset(cfg.data.name)
    data_mod.check_files(cfg, dataset)
    check_device(cfg)
    data = data_mod.load(cfg, need_train=True, need_test=rank == 0, entry=dataset)
    m = cfg.audit.membership
    if m.level != "none":  # the audited run trains on a keyed half of the examples (clients)
        from .membership import restrict, target_keep

        data = restrict(data, target_keep(cfg.seed, [data.client(c)[1] for c in range(data.num_clients)], m.level))
    num_params = check_model(cfg, data)
    check_canaries(cfg, num_params)
    check_attack(cfg, data)
    if cfg.audit.inversion.method != "none":
        check_inversion(cfg, data)
    store = None
    if rank == 0:
        probe_server_code(cfg, data, num_params)
    if rank == 0 or cfg.transport == "sharded":
        store = check_memory(cfg, data, rank, ranks, local_ranks, num_params)
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


def check_model(cfg: Config, data: FederatedData) -> int:
    """The model against the data; returns its number of parameters."""
    arch = extensions.architecture(cfg.model.name)
    if arch.build is not None:
        return check_user_model(cfg, data)
    if arch.tokens != data.tokens:
        takes = "character codes" if arch.tokens else "real-valued inputs"
        gives = "character codes" if data.tokens else "real-valued inputs"
        users = [name for name, a in ARCHITECTURES.items() if a.tokens == data.tokens]
        raise ConfigError("model.name", cfg.model.name, f"takes {takes}, but data.name = {cfg.data.name} gives {gives} "
                          f"(models for these: {', '.join(users)})")
    problem = arch.check(data.input_shape) if arch.check else None
    if problem:
        raise ConfigError("model.name", cfg.model.name, f"{problem}; data.name = {cfg.data.name} gives samples of "
                          f"shape {data.input_shape}")
    return count_params(cfg.model, data.input_shape, data.num_classes)


def check_user_model(cfg: Config, data: FederatedData) -> int:
    """Build a user model and try one training-mode forward pass on two training
    samples: it must be a module of float32 parameters, map (2, *input_shape) to
    (2, classes) logits and change no buffer (buffers do not travel between ranks).
    With DP-SGD, one clipped step on them too (each layer on its per-example path)."""
    import torch
    import torch.nn.functional as F

    from .models import build_model

    path, shape, classes = cfg.model.name, tuple(data.input_shape), data.num_classes

    def refuse(problem: str):
        raise ConfigError("model.name", path, problem)

    try:
        module = build_model(cfg.model, shape, classes, cfg.seed)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, before any MPI traffic
        refuse(f"raised {one_line(exc)} when built for inputs of shape {shape} and {classes} classes")
    if not isinstance(module, torch.nn.Module):
        refuse(f"returned a {type(module).__name__}; a model factory returns a torch.nn.Module")
    named = list(module.named_parameters())
    if not named:
        refuse("has no parameters to train")
    for name, p in named:
        if p.dtype != torch.float32:
            refuse(f"parameter {name} is {p.dtype}; fedmpi moves float32 parameters")
    x, y = _probe_samples(data)
    before = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.train()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # noqa: BLE001
        refuse(f"raised {one_line(exc)} on a batch of {len(x)} training samples of shape {shape} "
               f"(data.name = {cfg.data.name})")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        refuse(f"maps a batch of {len(x)} inputs of shape {shape} to {got}; expected logits of shape ({len(x)}, "
               f"{classes}): data.name = {cfg.data.name} has {classes} classes")
    changed = [name for name, b in module.named_buffers() if name in before and not torch.equal(before[name], b)]
    if changed:
        refuse(f"buffer {changed[0]} changes in a training step; only parameters travel between ranks, so it would "
               "differ between them (BatchNorm: use GroupNorm or LayerNorm, or track_running_stats=False)")
    if cfg.privacy.mode == "sample":
        from .privacy.dpsgd import PerExampleGradients

        try:
            per_example = PerExampleGradients(module)
            per_example.compute(x, y, F.cross_entropy, cfg.privacy.max_grad_norm,
                                [torch.empty_like(p) for _, p in named])
            per_example.remove()
        except Exception as exc:  # noqa: BLE001
            refuse(f"privacy.mode = sample: its per-example gradients failed on {len(x)} training samples: "
                   f"{one_line(exc)}")
    return sum(p.numel() for _, p in named)


def check_canaries(cfg: Config, num_params: int) -> None:
    """Dirac audit canaries need a model coordinate each."""
    a = cfg.audit.canaries
    if a.count and a.kind == "dirac" and a.count > num_params:
        raise ConfigError("audit.canaries.count", a.count, f"dirac canaries need a coordinate each, and the model "
                          f"has {num_params} parameters")


def _probe_samples(data: FederatedData) -> tuple:
    """Two training samples (one where no client holds two), as torch tensors."""
    import torch

    best = None
    for cid in range(data.num_clients):
        x, y = data.client(cid)
        if len(y) >= 2:
            best = (x[:2], y[:2])
            break
        if len(y) and best is None:
            best = (x[:1], y[:1])
    if best is None:
        raise ConfigError("clients.total", data.num_clients, "no client holds a training sample")
    x, y = best
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def probe_server_code(cfg: Config, data: FederatedData, num_params: int) -> None:
    """Rank 0: try the user code that runs on rank 0 or on the clients (rule and steps,
    attack hooks, server optimizer) on small keyed probe inputs: the cohort's number
    of rows of PROBE_WIDTH parameters (an update of the model's size for on_update,
    four training samples for on_data). What it raises or returns against its
    contract is one ConfigError naming the key and the path."""
    from .optimizers import ServerOptimizer
    from .protocol import RECORD, RECORD_FIELDS
    from .rounds import RuleAggregator, Updates

    used = {kind for _, kind, name, _ in extensions.named(cfg) if is_path(name)}
    if not used & {"rule", "pre_step", "attack", "optimizer"}:
        return
    g = seeding.rng(cfg.seed, "probe")
    k = cfg.clients.per_round
    rows = g.normal(size=(k, PROBE_WIDTH)).astype(np.float32)
    byzantine = np.zeros(k, dtype=bool)
    byzantine[:max(1, min(k - 1, cfg.aggregator.f or 1))] = True
    where = f"on a probe input of {k} rows of {PROBE_WIDTH}"
    try:
        if used & {"rule", "pre_step"} and cfg.transport == "gather" and cfg.privacy.mode != "client_central":
            records = np.zeros((k, len(RECORD_FIELDS)))
            records[:, RECORD["num_samples"]] = g.integers(1, 100, k)
            RuleAggregator(cfg, PROBE_WIDTH)(Updates(np.arange(k), records, [k], rows=rows.copy(), byzantine=byzantine), 0)
        if "attack" in used:
            where = _probe_attack(cfg, data, num_params, g, rows, byzantine)
        if "optimizer" in used:
            sv, where = cfg.server, f"on a probe update of {PROBE_WIDTH} parameters"
            optimizer = ServerOptimizer(sv, PROBE_WIDTH, extensions.optimizer(sv.optimizer, sv.params))
            optimizer.step(np.zeros(PROBE_WIDTH, dtype=np.float32), g.normal(size=PROBE_WIDTH))
    except ExtensionFailed as exc:
        raise ConfigError(exc.key, exc.path, f"{exc.problem} {where}") from None
    except Exception as exc:
        mark = getattr(exc, "fedmpi_extension", None)
        if mark is None:
            raise
        raise ConfigError(mark[0], mark[1], f"raised {one_line(exc)} {where}") from None


def _probe_attack(cfg: Config, data: FederatedData, num_params: int, g: np.random.Generator, rows: np.ndarray,
                  byzantine: np.ndarray) -> str:
    """Try a user attack's hooks; returns what the last probe was (for messages)."""
    a = cfg.attack
    entry = extensions.attack(a.name)
    params = attacks.resolved_params(cfg, data, entry)
    rng = attacks.client_rng(cfg.seed, 0, 0)

    def call(hook: str, *args):
        try:
            return getattr(entry, hook)(*args)
        except Exception as exc:
            exc.fedmpi_extension = ("attack.name", a.name)
            raise

    where = ""
    if entry.on_server is not None:
        where = f"(on_server) on a probe input of {len(rows)} rows of {PROBE_WIDTH}, {int(byzantine.sum())} Byzantine"
        if call("on_server", rows.copy(), byzantine.copy(), dict(params), _probe_context(cfg, entry, byzantine)) is not None:
            raise ExtensionFailed("attack.name", a.name, "on_server returned a value; it changes the Byzantine rows "
                                  "in place and returns None")
    if entry.on_update is not None:
        where = f"(on_update) on a probe update of {num_params} parameters"
        if call("on_update", g.normal(size=num_params).astype(np.float32), dict(params), rng) is not None:
            raise ExtensionFailed("attack.name", a.name, "on_update returned a value; it changes the update in place "
                                  "and returns None")
    if entry.on_data is not None:
        x, y = data.client(int(attacks.byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)[0]))
        where = f"(on_data) on {min(4, len(y))} training samples of shape {tuple(data.input_shape)}"
        out = call("on_data", x[:4].copy(), y[:4].copy(), data.num_classes, dict(params), rng)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ExtensionFailed("attack.name", a.name, f"on_data returned {type(out).__name__}; expected (x, y)")
        x2, y2 = (np.asarray(v) for v in out)
        if x2.shape[1:] != tuple(data.input_shape) or len(x2) != len(y2) or not np.issubdtype(y2.dtype, np.integer) \
                or (len(y2) and (y2.min() < 0 or y2.max() >= data.num_classes)):
            raise ExtensionFailed("attack.name", a.name, f"on_data returned x of shape {x2.shape} and y of shape "
                                  f"{y2.shape}, dtype {y2.dtype}; expected samples of shape {tuple(data.input_shape)} "
                                  f"and as many integer labels in 0..{data.num_classes - 1}")
    return where


def _probe_context(cfg: Config, entry: attacks.Attack, byzantine: np.ndarray) -> attacks.ServerContext:
    """The ServerContext of a probe round: every row finite, the run's rule (without
    the user rule's state changes) as the attack's full knowledge."""
    from .rounds import RuleAggregator

    k, f = len(byzantine), cfg.aggregator.f
    rule = RuleAggregator(cfg, PROBE_WIDTH) if cfg.privacy.mode != "client_central" else None

    def aggregate(rows: np.ndarray):
        if rule is None:
            raise attacks.Inapplicable("central DP clips and noises the rows (no rule to simulate)")
        try:
            return rule.simulate(rows, max(0, f - (k - len(rows))), 0)
        except ValueError as exc:
            raise attacks.Inapplicable(str(exc)) from None

    return attacks.ServerContext(round_index=0, cohort=np.arange(k), finite=np.ones(k, dtype=bool), honest=~byzantine,
                                 f=f, aggregate=aggregate, rng=seeding.rng(cfg.seed, "probe"),
                                 state=entry.state(PROBE_WIDTH) if entry.state else {})


def check_attack(cfg: Config, data: FederatedData) -> None:
    """What the attack needs of the data (the backdoor: images, a target class)."""
    entry = extensions.attack(cfg.attack.name)
    if entry.check is not None:
        entry.check(attacks.resolved_params(cfg, None, entry), data)


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


def _cohort_bound(cfg: Config) -> int:
    k = cfg.clients.per_round
    if cfg.clients.sampling == "poisson":  # the cohort varies: allow for a large one
        k = min(cfg.clients.total, int(k + 6 * math.sqrt(k) + 1))
    return k


def server_memory(cfg: Config, data: FederatedData, num_params: int | None = None) -> tuple[int, int, int]:
    """(bytes of update rows, other bytes rank 0 will allocate, parameters d): an estimate
    made before the first round, with ``transport: gather`` or ``reduce``.
    Rows: cohort x d x 4 (none with transport: reduce); the rest from the registries:
    each pre-aggregation step's float64 rows, what the rule allocates, the honest rows
    an omniscient attack copies. ``num_params``: d, when known (a user model's is
    counted by building it)."""
    d = num_params if num_params is not None else count_params(cfg.model, data.input_shape, data.num_classes)
    k = _cohort_bound(cfg)
    canaries = cfg.audit.client_canaries.count  # canary clients' rows (at most all of them) and their directions
    rows = 0 if cfg.transport == "reduce" else (k + canaries) * d * 4
    slot_rows = k * d * 4 if ALGORITHMS[cfg.algorithm.name].client_state else 0  # the per-slot rows sent (SCAFFOLD's c - c_i)
    return rows, 8 * d * 8 + canaries * d * 4 + _rule_memory(cfg, k + canaries, d) + slot_rows, d


def _rule_memory(cfg: Config, k: int, width: int) -> int:
    """Bytes the steps, the rule and an omniscient attack allocate over ``width`` columns
    of k rows: each step's float64 rows, the rule's own, the honest rows copied."""
    g = cfg.aggregator
    other, n = 0, k
    for i, step in enumerate(g.pre):
        n = extensions.pre_step(step.name, step.params, f"aggregator.pre[{i}].name").rows_after(n, step)
        other += n * width * 8
    other += extensions.rule(g.name, g.params).memory(n, width, g.f)
    attack = extensions.attack(cfg.attack.name)
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


def check_memory(cfg: Config, data: FederatedData, rank: int = 0, ranks: int = 1, local_ranks: int = 1,
                 num_params: int | None = None) -> str | None:
    """Refuse, before any work, a run whose rows would not fit the budget: rank 0's with
    ``transport: gather`` or ``reduce``; every rank's with ``transport: sharded``, where
    each holds its blocks' columns (the node's available memory is shared among the
    ranks on it unless ``memory_limit_gb`` gives each rank's budget). Rank 0: decide
    where the clients' state lives (None: the algorithm keeps none)."""
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sharded = cfg.transport == "sharded"
    d = num_params if num_params is not None else count_params(cfg.model, data.input_shape, data.num_classes)
    if sharded:
        rows, training, other = sharded_memory(cfg, d, rank, ranks)
    else:
        rows, other, d = server_memory(cfg, data, d)
        training = 0
    need = rows + training + other + resident + (128 << 20)  # + model, gradients, evaluation batches
    if cfg.memory_limit_gb is not None:
        budget, what = int(cfg.memory_limit_gb * 2**30), f"memory_limit_gb = {cfg.memory_limit_gb:g}"
    elif sharded and local_ranks > 1:
        budget, what = available_memory() // local_ranks + resident, f"this node's available memory / {local_ranks} ranks"
    else:
        budget, what = available_memory() + resident, "the memory available on this node"
    if need > budget and cfg.audit.client_canaries.count:
        raise ConfigError("audit.client_canaries.count", cfg.audit.client_canaries.count,
                          f"rank 0 would need about {_gib(need)} with the canary clients' directions and rows "
                          f"({d} parameters x 4 bytes each), over its budget of {_gib(budget)} ({what}); use fewer "
                          "canary clients or raise memory_limit_gb")
    if need > budget:
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
    state = client_state_bytes(cfg, d) if rank == 0 else 0
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
