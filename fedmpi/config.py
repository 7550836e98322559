"""Experiment configuration: load, resolve, validate, and the result is frozen.

:func:`load` is the whole path from a file and ``--set`` overrides to a config a
run can use:

1. read the file and apply the overrides (:mod:`fedmpi.schema`);
2. build the typed, immutable config (unknown keys, wrong types and names not
   in a registry are refused here);
3. :func:`resolve` fills the defaults that depend on other keys (``server.lr``,
   ``data.normalize``, ``data.dir``, ``aggregator.f``, ``devices.partial_work``)
   in one step and returns a new config;
4. :func:`validate` checks what types alone cannot, without changing anything.

What each name may be and which keys it reads come from the registries
(:data:`fedmpi.data.DATASETS`, :data:`fedmpi.architectures.ARCHITECTURES`,
:data:`fedmpi.aggregation.RULES` and ``PRE_STEPS``, :data:`fedmpi.attacks.ATTACKS`,
:data:`fedmpi.optimizers.OPTIMIZERS`, :data:`fedmpi.algorithms.ALGORITHMS`): a key
that only another entry reads, set to anything but its default, is refused with
the entries that use it. A name that is an import path
(``"package.module:attribute"``) is user code: step 2 imports it and checks it
against its contract, step 4 binds its ``params`` (:mod:`fedmpi.extensions`).

Data-dependent checks (files, the model against the data, memory, device) are
:mod:`fedmpi.preflight`'s.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

from . import extensions
from .aggregation import PRE_STEPS, RULES, unmet_requirement
from .algorithms import ALGORITHMS
from .architectures import ARCHITECTURES
from .attacks import ATTACKS
from .data import DATASETS
from .extensions import is_path
from .optimizers import OPTIMIZERS
from .schema import (
    Config,
    ConfigError,
    apply_override,
    flatten,
    from_dict,
    plain,
    read_file,
    replace,
)
from .sharded.rules import COLUMNWISE_ATTACKS, SHARDED_RULES, SHARDED_STEPS

__all__ = ["Config", "ConfigError", "apply_override", "build", "flatten", "from_dict", "from_mapping", "load",
           "num_byzantine", "read_file", "resolve", "validate"]

# the key naming an entry -> (its registry, the kind of user code it may name instead)
REGISTRIES: dict[str, tuple[Mapping, str | None]] = {
    "data.name": (DATASETS, "dataset"),
    "model.name": (ARCHITECTURES, "model"),
    "server.optimizer": (OPTIMIZERS, "optimizer"),
    "aggregator.name": (RULES, "rule"),
    "attack.name": (ATTACKS, "attack"),
    "algorithm.name": (ALGORITHMS, None),  # built-in only
}


def load(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- file <- ``--set`` overrides, then built, resolved and validated."""
    data = read_file(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_mapping(data)


def from_mapping(data: Mapping) -> Config:
    """The resolved, validated, frozen config of a mapping (a parsed file)."""
    cfg = resolve(build(data))
    validate(cfg)
    return cfg


def build(data: Mapping) -> Config:
    """The typed config of a mapping, its registry names checked (nothing resolved)."""
    cfg = from_dict(data)
    for key, (registry, kind) in REGISTRIES.items():
        _check_name(key, _get(cfg, key), registry, kind)
    for i, step in enumerate(cfg.aggregator.pre):
        _check_name(f"aggregator.pre[{i}].name", step.name, PRE_STEPS, "pre_step")
    return _typed_attack_params(cfg)


def _typed_attack_params(cfg: Config) -> Config:
    """``attack.params`` converted to the types the attack's entry declares (unknown
    names, wrong types, values outside the allowed ones: one ConfigError line)."""
    a = cfg.attack
    if a.name == "none":  # validate() refuses params without an attack
        return cfg
    entry = extensions.attack(a.name)
    typed = {}
    for key, value in a.params.items():
        if key not in entry.params:
            names = ", ".join(entry.params) or "none"
            raise ConfigError(f"attack.params.{key}", value, f"unknown parameter for {a.name} (allowed: {names})")
        typed[key] = entry.params[key].convert(f"attack.params.{key}", value)
    return replace(cfg, "attack.params", types.MappingProxyType(typed))


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_name(key: str, name: str, registry: Mapping, kind: str | None) -> None:
    """A built-in name, or user code (imported and checked against its contract) where
    the key takes user code of ``kind`` (None: built-in names only)."""
    if kind is None and name not in registry:
        raise ConfigError(key, name, "must be one of " + ", ".join(registry))
    if is_path(name):
        extensions.load(kind, name, key)
    elif name not in registry:
        raise ConfigError(key, name, "must be one of " + ", ".join(registry) + ", or user code as 'package.module:attribute'")


# --------------------------------------------------------------------------- resolve


def num_byzantine(cfg: Config) -> int:
    a = cfg.attack
    if a.name == "none":
        return 0
    return len(a.clients) if a.clients is not None else int(round(a.fraction * cfg.clients.total))


def resolve(cfg: Config) -> Config:
    """A new config with every default that depends on other keys filled in."""
    d, sv, g = cfg.data, cfg.server, cfg.aggregator
    dataset = extensions.dataset(d.name)
    data = dataclasses.replace(
        d,
        normalize=d.normalize or dataset.default_normalize,
        dir=d.dir if d.dir is not None or not dataset.default_dir else f"data/{d.name}",
    )
    server = sv if sv.lr is not None else dataclasses.replace(sv, lr=extensions.optimizer(sv.optimizer, sv.params).default_lr)
    aggregator = g
    if g.f is None:
        byz, c = num_byzantine(cfg) if _attack_counts_known(cfg) else 0, cfg.clients
        aggregator = dataclasses.replace(g, f=math.ceil(c.per_round * byz / c.total) if byz else 0)
    devices = cfg.devices
    if devices.partial_work is None:
        devices = dataclasses.replace(devices, partial_work=ALGORITHMS[cfg.algorithm.name].partial_work)
    audit, canaries = cfg.audit, cfg.audit.canaries
    if canaries.count > 0 and canaries.k is None:
        audit = dataclasses.replace(audit, canaries=dataclasses.replace(canaries, k=max(1, canaries.count // 10)))
    return dataclasses.replace(cfg, data=data, server=server, aggregator=aggregator, devices=devices, audit=audit)


def _attack_counts_known(cfg: Config) -> bool:
    a = cfg.attack
    return a.name == "none" or (a.fraction is None) != (a.clients is None)


# --------------------------------------------------------------------------- validate


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _positive(key: str, value: float) -> None:
    _require(value > 0, key, value, "must be > 0")


def _at_least(key: str, value: float, low: float) -> None:
    _require(value >= low, key, value, f"must be >= {low}")


def _unit_interval(key: str, value: float) -> None:
    _require(0 <= value < 1, key, value, "must be in [0, 1)")


def _only_used_by(section: Any, prefix: str, active: str, registry: Mapping, selector: str,
                  general: tuple[str, ...] = ()) -> None:
    """Refuse a key that the active entry does not read but another entry does, when it
    is set to anything but its default (``general`` keys serve the whole section)."""
    readers: dict[str, list[str]] = {}
    for name, entry in registry.items():
        for key in entry.reads:
            if key not in general:
                readers.setdefault(key, []).append(name)
    defaults = type(section)()
    for f in dataclasses.fields(section):
        users = readers.get(f.name)
        if users and active not in users and getattr(section, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"{prefix}{f.name}", plain(getattr(section, f.name)),
                              f"only used with {selector} = {' or '.join(users)} ({selector} is {active})")


def validate(cfg: Config) -> None:
    """Check values that types alone cannot. ``cfg`` must be resolved; nothing changes."""
    extensions.check_params(cfg)
    _at_least("seed", cfg.seed, 0)
    _at_least("rounds", cfg.rounds, 1)
    _at_least("threads", cfg.threads, 1)

    c = cfg.clients
    _at_least("clients.total", c.total, 1)
    _at_least("clients.per_round", c.per_round, 1)
    _require(c.per_round <= c.total, "clients.per_round", c.per_round, f"must be at most clients.total ({c.total})")

    _validate_data(cfg)

    m = cfg.model
    for i, width in enumerate(m.hidden):
        _at_least(f"model.hidden[{i}]", width, 1)
    _only_used_by(m, "model.", m.name, ARCHITECTURES, "model.name")

    t = cfg.train
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 1)
    _positive("train.lr", t.lr)
    _unit_interval("train.momentum", t.momentum)
    _at_least("train.weight_decay", t.weight_decay, 0)

    sv = cfg.server
    _positive("server.lr", sv.lr)
    _unit_interval("server.momentum", sv.momentum)
    _unit_interval("server.beta1", sv.beta1)
    _unit_interval("server.beta2", sv.beta2)
    _positive("server.tau", sv.tau)
    _only_used_by(sv, "server.", sv.optimizer, OPTIMIZERS, "server.optimizer")

    _validate_attack(cfg)
    _validate_aggregator(cfg)
    _validate_privacy(cfg)
    if cfg.memory_limit_gb is not None:
        _positive("memory_limit_gb", cfg.memory_limit_gb)
    if cfg.transport == "reduce":
        reasons = []
        if extensions.rule(cfg.aggregator.name, cfg.aggregator.params).needs_rows or cfg.aggregator.pre:
            reasons.append(f"aggregator.name = {cfg.aggregator.name} needs every row")
        if extensions.attack(cfg.attack.name).needs_rows:
            reasons.append(f"attack.name = {cfg.attack.name} is computed on rank 0 from the rows")
        if cfg.privacy.mode == "client_central":
            reasons.append("privacy.mode = client_central clips every row on rank 0")
        _require(not reasons, "transport", "reduce", "workers pre-sum FedAvg updates, but " + "; ".join(reasons)
                 + " (use transport: gather)")
    _validate_sharded(cfg)

    _validate_algorithm(cfg)
    _validate_devices(cfg)

    _at_least("eval.every", cfg.eval.every, 1)
    _at_least("eval.batch_size", cfg.eval.batch_size, 1)

    _validate_audit(cfg)
    _validate_leakage(cfg)

    o = cfg.output
    _at_least("output.snapshot_every", o.snapshot_every, 0)
    _at_least("output.checkpoint_every", o.checkpoint_every, 0)
    if o.path is not None:
        _require(o.path.strip() != "", "output.path", o.path, "must not be empty")


def _validate_sharded(cfg: Config) -> None:
    """transport: sharded needs every step, the rule and any server-side attack to work on
    column blocks; shard_block is its key."""
    _at_least("shard_block", cfg.shard_block, 2)
    if cfg.transport != "sharded":
        _require(cfg.shard_block == Config.shard_block, "shard_block", cfg.shard_block,
                 f"only used with transport = sharded (transport is {cfg.transport})")
        return
    g, a = cfg.aggregator, cfg.attack
    for i, step in enumerate(g.pre):
        _require(step.name in SHARDED_STEPS, f"aggregator.pre[{i}].name", step.name,
                 f"has no column-block form for transport: sharded (it has: {', '.join(SHARDED_STEPS)})")
    _require(g.name in SHARDED_RULES, "aggregator.name", g.name,
             f"has no column-block form for transport: sharded (it has: {', '.join(SHARDED_RULES)})")
    _require(extensions.attack(a.name).on_server is None or a.name in COLUMNWISE_ATTACKS, "attack.name", a.name,
             "acts on whole rows on rank 0, which transport: sharded never gathers (coordinate-wise attacks that "
             f"run on column blocks: {', '.join(sorted(COLUMNWISE_ATTACKS))}); use transport: gather")
    _require(cfg.privacy.mode != "client_central", "privacy.mode", "client_central",
             "clips and noises the rows on rank 0; not with transport: sharded (use transport: gather)")
    _require(not is_path(cfg.server.optimizer), "server.optimizer", cfg.server.optimizer,
             "user code steps the whole model on rank 0; transport: sharded steps each rank's columns with the "
             f"built-in optimizers ({', '.join(OPTIMIZERS)}); use transport: gather")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    entry = extensions.dataset(d.name)
    for key, what in entry.required.items():
        _require(bool(getattr(d, key)), f"data.{key}", getattr(d, key), f"data.name = {d.name} needs data.{key}, {what}")
    _require(d.normalize in entry.normalize, "data.normalize", d.normalize,
             f"not for data.name = {d.name}; allowed: {', '.join(entry.normalize)}")
    _require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)")
    p = d.partition
    _positive("data.partition.alpha", p.alpha)
    _at_least("data.partition.shards_per_client", p.shards_per_client, 1)
    _at_least("data.partition.min_samples", p.min_samples, 0)
    s = d.synthetic
    _at_least("data.synthetic.alpha", s.alpha, 0)
    _at_least("data.synthetic.beta", s.beta, 0)
    _at_least("data.synthetic.dim", s.dim, 1)
    _at_least("data.synthetic.classes", s.classes, 2)
    _at_least("data.synthetic.min_samples", s.min_samples, 2)
    _require(s.max_samples >= s.min_samples, "data.synthetic.max_samples", s.max_samples,
             f"must be >= data.synthetic.min_samples ({s.min_samples})")
    _at_least("data.synthetic.samples_sigma", s.samples_sigma, 0)
    _only_used_by(d, "data.", d.name, DATASETS, "data.name", general=("partition",) if is_path(d.name) else ())


def _validate_attack(cfg: Config) -> None:
    a, total = cfg.attack, cfg.clients.total
    if a.name == "none":
        for key in ("fraction", "clients"):
            if getattr(a, key) is not None:
                raise ConfigError(f"attack.{key}", plain(getattr(a, key)), "needs an attack: set attack.name")
        if a.params:
            raise ConfigError("attack.params", plain(a.params), "needs an attack: set attack.name")
        return
    if (a.fraction is None) == (a.clients is None):
        raise ConfigError("attack.name", a.name, "needs exactly one of attack.fraction or attack.clients")
    if a.fraction is not None:
        _require(0 < a.fraction < 1, "attack.fraction", a.fraction, "must be in (0, 1)")
        _require(round(a.fraction * total) >= 1, "attack.fraction", a.fraction,
                 f"makes round({a.fraction} x clients.total {total}) = 0 Byzantine clients")
    else:
        clients = list(a.clients)
        _require(len(clients) > 0, "attack.clients", clients, "must list at least one client id")
        for i, cid in enumerate(clients):
            _require(0 <= cid < total, f"attack.clients[{i}]", cid, f"must be a client id in 0..{total - 1}")
        _require(len(set(clients)) == len(clients), "attack.clients", clients, "must not repeat ids")
        _require(len(clients) < total, "attack.clients", clients, "must leave at least one honest client")


def _validate_aggregator(cfg: Config) -> None:
    g = cfg.aggregator
    n = cfg.clients.per_round
    _at_least("aggregator.f", g.f, 0)
    for i, step in enumerate(g.pre):
        key = f"aggregator.pre[{i}]"
        entry = extensions.pre_step(step.name, step.params, f"{key}.name")
        _only_used_by(step, f"{key}.", step.name, PRE_STEPS, f"{key}.name")
        if "max_norm" in entry.reads:
            _require(step.max_norm is not None and step.max_norm > 0, f"{key}.max_norm", step.max_norm,
                     f"{step.name} needs max_norm > 0")
        if "bucket_size" in entry.reads:
            _at_least(f"{key}.bucket_size", step.bucket_size, 1)
        n = entry.rows_after(n, step)
    if g.m is not None:
        _require(1 <= g.m <= n, "aggregator.m", g.m, f"must be in 1..{n}")
    steps = [extensions.pre_step(s.name, s.params, f"aggregator.pre[{i}].name") for i, s in enumerate(g.pre)]
    problem = unmet_requirement(g, cfg.clients.per_round, g.f, extensions.rule(g.name, g.params), steps)
    _require(problem is None, "aggregator.f", g.f, problem)
    _positive("aggregator.tau", g.tau)
    _at_least("aggregator.iterations", g.iterations, 1)
    _positive("aggregator.smoothing", g.smoothing)
    _positive("aggregator.tol", g.tol)
    _at_least("aggregator.max_iter", g.max_iter, 1)
    _only_used_by(g, "aggregator.", g.name, RULES, "aggregator.name", general=("f",))


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    if p.mode == "none":
        for key in ("noise_multiplier", "target_epsilon"):
            if getattr(p, key) is not None:
                raise ConfigError(f"privacy.{key}", getattr(p, key), "needs privacy.mode: sample, client_central or client_local")
        return
    if p.noise_multiplier is not None and p.target_epsilon is not None:
        raise ConfigError("privacy.target_epsilon", p.target_epsilon, "give either privacy.noise_multiplier or "
                          "privacy.target_epsilon, not both")
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError("privacy.mode", p.mode, "needs privacy.noise_multiplier or privacy.target_epsilon")
    if p.noise_multiplier is not None:
        _at_least("privacy.noise_multiplier", p.noise_multiplier, 0)
    if p.target_epsilon is not None:
        _positive("privacy.target_epsilon", p.target_epsilon)
    _positive("privacy.max_grad_norm", p.max_grad_norm)
    _require(0 < p.delta < 1, "privacy.delta", p.delta, "must be in (0, 1)")
    if p.mode == "client_central":
        g = cfg.aggregator
        _require(g.name == "fedavg" and not g.pre, "privacy.mode", p.mode,
                 f"central client-level DP calibrates its noise to the sum of clipped updates, which only "
                 f"aggregator.name = fedavg without pre-aggregation computes (aggregator.name is {g.name}); use "
                 "privacy.mode = client_local or sample with robust aggregators")
        _require(not (p.accountant == "pld" and cfg.clients.sampling == "fixed"), "privacy.accountant", p.accountant,
                 "PLD accounting of fixed-size cohorts (sampling without replacement) is not supported by dp-accounting; "
                 "set clients.sampling: poisson or privacy.accountant: rdp")


def _validate_audit(cfg: Config) -> None:
    a, p = cfg.audit.canaries, cfg.privacy
    _at_least("audit.canaries.count", a.count, 0)
    if a.count == 0:
        _require(a.k is None, "audit.canaries.k", a.k, "needs canaries: set audit.canaries.count")
    else:
        _at_least("audit.canaries.count", a.count, 2)
        _require(p.mode == "sample", "audit.canaries.count", a.count,
                 f"example-level canaries audit DP-SGD and need privacy.mode = sample (privacy.mode is {p.mode}); "
                 "client-level DP is audited by audit.client_canaries")
        _require(p.batch_sampling == "poisson", "audit.canaries.count", a.count,
                 "canaries are Poisson-sampled like the examples they sit among: needs privacy.batch_sampling = poisson")
        _require(1 <= a.k <= a.count // 2, "audit.canaries.k", a.k,
                 f"must be in 1..{a.count // 2} (k top and k bottom scores among audit.canaries.count = {a.count})")
    _require(0 < a.alpha < 1, "audit.canaries.alpha", a.alpha, "must be in (0, 1)")
    c = cfg.audit.client_canaries
    _at_least("audit.client_canaries.count", c.count, 0)
    _at_least("audit.client_canaries.scale", c.scale, 1)
    _at_least("audit.client_canaries.repeats", c.repeats, 0)
    if c.count > 0:
        _require(p.mode in ("client_central", "client_local"), "audit.client_canaries.count", c.count,
                 f"canary clients estimate client-level DP and need privacy.mode = client_central or client_local "
                 f"(privacy.mode is {p.mode}); DP-SGD is audited by audit.canaries")
        _require(cfg.transport == "gather", "audit.client_canaries.count", c.count,
                 "rank 0 inserts the canary clients' rows: needs transport = gather")
        _require(c.repeats <= cfg.rounds, "audit.client_canaries.repeats", c.repeats,
                 f"must be <= rounds ({cfg.rounds}): an inserted canary takes part in that many distinct rounds "
                 "(0: sampled each round like a client)")


def _validate_algorithm(cfg: Config) -> None:
    a = cfg.algorithm
    _at_least("algorithm.mu", a.mu, 0)
    if a.state_dir is not None:
        _require(a.state_dir.strip() != "", "algorithm.state_dir", a.state_dir, "must not be empty")
    _only_used_by(a, "algorithm.", a.name, ALGORITHMS, "algorithm.name")
    if not ALGORITHMS[a.name].client_state:
        return
    reasons = []
    if cfg.aggregator.name != "fedavg" or cfg.aggregator.pre:
        reasons.append(f"its server control variate averages every client's change, which only aggregator.name = fedavg "
                       f"without pre-aggregation matches (aggregator.name is {cfg.aggregator.name})")
    if cfg.transport in ("reduce", "sharded"):
        reasons.append(f"rank 0 derives each client's control variate from its update row, which transport: "
                       f"{cfg.transport} never gathers (use transport: gather)")
    if cfg.privacy.mode in ("client_central", "client_local"):
        reasons.append(f"privacy.mode = {cfg.privacy.mode} clips and noises the model update only, while the control "
                       "variates would reach the server unprotected (use privacy.mode: sample)")
    _require(not reasons, "algorithm.name", a.name, "; ".join(reasons))


def _validate_devices(cfg: Config) -> None:
    d = cfg.devices
    if cfg.transport == "sharded":
        for key, value in (("dropout", d.dropout), ("deadline", d.deadline)):
            _require(not value, f"devices.{key}", value, "drops updates from the round, which transport: sharded (every "
                     "rank aggregates its columns of the whole cohort) does not support; use transport: gather or reduce")
        _require(not (d.stragglers and d.partial_work == "drop"), "devices.stragglers", d.stragglers,
                 f"with devices.partial_work = drop (algorithm.name = {cfg.algorithm.name}'s default unless set) the "
                 "stragglers' updates are dropped, which transport: sharded does not support; set devices.partial_work: "
                 "use, or use transport: gather or reduce")
    _require(0 <= d.stragglers <= 1, "devices.stragglers", d.stragglers, "must be in [0, 1]")
    _unit_interval("devices.dropout", d.dropout)
    _at_least("devices.speed_sigma", d.speed_sigma, 0)
    if d.deadline is not None:
        _positive("devices.deadline", d.deadline)
    elif d.speed_sigma:
        raise ConfigError("devices.speed_sigma", d.speed_sigma, "only used with devices.deadline (speeds decide who "
                          "misses it)")


def _validate_leakage(cfg: Config) -> None:
    """audit.inversion and audit.membership (what needs the data is fedmpi.preflight's)."""
    v = cfg.audit.inversion
    if v.method != "none":
        _require(cfg.transport == "gather", "audit.inversion.method", v.method,
                 f"rank 0 attacks the update rows it receives, but transport = {cfg.transport} never gives it them "
                 "(use transport: gather)")
        _require(bool(v.rounds), "audit.inversion.rounds", plain(v.rounds), "must name at least one round")
        for i, r in enumerate(v.rounds):
            _require(0 <= r < cfg.rounds, f"audit.inversion.rounds[{i}]", r, f"must be a round index in 0..{cfg.rounds - 1}")
        _at_least("audit.inversion.slots", v.slots, 1)
        _require(v.slots <= cfg.clients.total, "audit.inversion.slots", v.slots,
                 f"must be at most clients.total ({cfg.clients.total})")
        if v.iterations is not None:
            _at_least("audit.inversion.iterations", v.iterations, 1)
        _at_least("audit.inversion.restarts", v.restarts, 1)
        if v.step_size is not None:
            _positive("audit.inversion.step_size", v.step_size)
        _at_least("audit.inversion.tv", v.tv, 0)
        _at_least("audit.inversion.max_examples", v.max_examples, 1)
        if v.method == "analytic":
            _require(cfg.model.name in ("logreg", "mlp"), "audit.inversion.method", v.method,
                     f"analytic recovery reads the input of a fully connected first layer; model.name = {cfg.model.name} "
                     "has none (use logreg or mlp, or an optimisation method)")
        _require(cfg.data.normalize in ("standard", "unit"), "audit.inversion.method", v.method,
                 f"PSNR and SSIM are taken on the [0, 1] pixel scale, which data.normalize = {cfg.data.normalize} does not "
                 "keep (use standard or unit)")
    m = cfg.audit.membership
    if m.level != "none":
        low = 4 if m.variance == "per_example" else 2
        _require(m.shadows >= low, "audit.membership.shadows", m.shadows,
                 f"must be >= {low}: LiRA needs {low // 2} shadow(s) trained with and {low // 2} without every "
                 f"{m.level} ({'per_example variance needs two of each' if low == 4 else 'one of each'})")
        _at_least("audit.membership.every", m.every, 0)
        _require(cfg.transport != "sharded", "audit.membership.level", m.level,
                 "its shadow federations are trained through the gather or reduce transport; not with transport: sharded")
        _require(not ALGORITHMS[cfg.algorithm.name].client_state, "audit.membership.level", m.level,
                 f"its shadow federations reuse the run's server, whose algorithm.name = {cfg.algorithm.name} keeps "
                 "per-client state they would disturb; use algorithm.name: fedavg or fedprox")
