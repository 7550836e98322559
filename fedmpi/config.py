"""Typed experiment configuration: defaults, YAML/JSON loading, overrides, validation.

A config is plain data: nested dataclasses built once from a mapping, checked once,
then passed to every part of the run. The dataclass defaults *are* the embedded
default experiment (digits, MLP 64-200-200-10, 16 IID clients, 20 rounds), so
``python -m fedmpi.run`` needs no file at all.

Every problem is reported as one :class:`ConfigError` line that names the dotted
key, the offending value and what is allowed, e.g.::

    clients.per_round = 20: must be at most clients.total (16)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``str()`` is the one-line message."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {_show(value)}: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- sections


@dataclass
class PartitionConfig:
    """How the training set is split over clients (not used by ``synthetic``)."""

    name: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = 0.5  # dirichlet concentration: small = strong label skew
    shards_per_client: int = 2  # shards: label-sorted shards per client (McMahan et al. 2017)
    min_samples: int = 1  # dirichlet: redraw until every client holds at least this many


@dataclass
class SyntheticConfig:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020)."""

    alpha: float = 1.0  # spread of the per-client model means
    beta: float = 1.0  # spread of the per-client input means
    dim: int = 60
    classes: int = 10
    samples_mu: float = 4.0  # client sizes: int(lognormal(mu, sigma)) + min_samples
    samples_sigma: float = 2.0
    min_samples: int = 50
    max_samples: int = 5000  # cap on one client's size, keeps the heavy tail bounded


@dataclass
class DataConfig:
    name: Literal["synthetic", "digits", "mnist", "fashion_mnist", "npz"] = "digits"
    dir: str | None = None  # mnist / fashion_mnist IDX files; default data/<name>
    path: str | None = None  # npz file with x_train, y_train, x_test, y_test
    test_fraction: float = 0.2  # digits and synthetic: share of samples held out for test
    # standard: scale to [0, 1], then subtract the training set's mean and divide by
    # its std, per channel; unit: [0, 1] only; none: values as stored.
    # Default: standard, except none for synthetic (used as generated).
    normalize: Literal["standard", "unit", "none"] | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ClientsConfig:
    total: int = 16
    per_round: int = 16  # cohort size (fixed), or its expectation (poisson)
    sampling: Literal["fixed", "poisson"] = "fixed"  # fixed: per_round distinct clients; poisson: each with rate per_round/total


@dataclass
class ModelConfig:
    name: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [200, 200])  # mlp only


def count_params(model: ModelConfig, input_shape: tuple, num_classes: int) -> int:
    """Parameters of the model fedmpi.models.build_model builds, without building it
    (rank 0 sizes its memory before torch is even imported)."""
    features = int(math.prod(input_shape))
    if model.name == "logreg":
        return (features + 1) * num_classes
    if model.name == "mlp":
        widths = [features, *model.hidden, num_classes]
        return sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    return (channels * 25 + 1) * 32 + (32 * 25 + 1) * 64 + (flat + 1) * 512 + (512 + 1) * num_classes


@dataclass
class TrainConfig:
    """Local training of each sampled client: plain SGD on its own shard."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class ServerConfig:
    """How rank 0 turns the aggregated update into the next global model."""

    optimizer: Literal["avg", "fedavgm", "fedadam"] = "avg"
    lr: float | None = None  # default: 1.0 for avg and fedavgm, 0.01 for fedadam
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99  # fedadam
    tau: float = 1e-3  # fedadam adaptivity (Reddi et al. 2021)


AGGREGATORS = ("fedavg", "krum", "multi_krum", "median", "trimmed_mean", "geometric_median", "bulyan", "centered_clipping")


@dataclass
class PreAggregationConfig:
    """One step applied to the update rows before the aggregator (in list order)."""

    name: Literal["nnm", "bucketing", "clip"] = "clip"
    s: int = 2  # bucketing: rows per bucket
    max_norm: float | None = None  # clip: required


@dataclass
class AggregatorConfig:
    name: Literal[AGGREGATORS] = "fedavg"  # type: ignore[valid-type]
    f: int | None = None  # Byzantine rows to tolerate; default: expected Byzantine clients per cohort
    m: int | None = None  # multi_krum: rows averaged (default n - f)
    tau: float = 1.0  # centered_clipping: clipping radius
    iterations: int = 1  # centered_clipping: clipping iterations per round
    smoothing: float = 1e-6  # geometric_median: Weiszfeld smoothing nu
    tol: float = 1e-10  # geometric_median: stop when the objective improves by less (relative)
    max_iter: int = 1000  # geometric_median
    pre: list[PreAggregationConfig] = field(default_factory=list)


ATTACKS = ("none", "label_flip", "sign_flip", "scaling", "gaussian", "alie", "ipm")


@dataclass
class AttackConfig:
    name: Literal[ATTACKS] = "none"  # type: ignore[valid-type]
    fraction: float | None = None  # share of clients.total that is Byzantine (seeded draw), or
    clients: list[int] | None = None  # the Byzantine client ids
    params: dict[str, float] = field(default_factory=dict)  # sign_flip/scaling: lambda; gaussian: std; alie: z; ipm: eps


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/privacy.md)."""

    mode: Literal["none", "sample", "client_central", "client_local"] = "none"
    noise_multiplier: float | None = None  # sigma (sample) or z (client); or give target_epsilon
    max_grad_norm: float = 1.0  # C: per-example clip (sample); S: update clip (client modes)
    delta: float = 1e-5
    target_epsilon: float | None = None  # calibrate noise_multiplier to this before training
    accountant: Literal["pld", "rdp"] = "pld"  # for the reported final epsilon; per round: RDP
    batch_sampling: Literal["poisson", "shuffle"] = "poisson"  # sample mode: local batches


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every k rounds (and after the last)
    batch_size: int = 1000


@dataclass
class OutputConfig:
    path: str | None = None  # default: results/run-<UTC time>.h5
    overwrite: bool = False
    snapshot_every: int = 0  # keep the global model every k rounds in /model/snapshots (0: off)
    checkpoint_every: int = 5  # checkpoint for --resume every k rounds (0: only on SIGTERM / SIGUSR1)


@dataclass
class Config:
    seed: int = 0
    rounds: int = 20
    threads: int = 1  # torch threads per rank; ranks are the parallelism
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # cuda: GPU local_rank % GPUs per node; auto: cuda if present
    # gather: every update row reaches rank 0 (any aggregator, per-client records);
    # reduce: workers pre-sum weighted updates, one MPI Reduce (FedAvg only, O(d) memory on rank 0)
    transport: Literal["gather", "reduce"] = "gather"
    memory_limit_gb: float | None = None  # rank 0's budget; default: the node's available memory
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SERVER_LR_DEFAULTS = {"avg": 1.0, "fedavgm": 1.0, "fedadam": 0.01}


# --------------------------------------------------------------------------- building


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config mapping -> {"a.b.c": value}; lists and ``attack.params`` stay values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "params":
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def from_dict(data: Any, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; missing keys take their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{prefix}{key}", data[key], f"unknown key (allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)})"
            )
    kwargs = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key + ".")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, value, "must be one of " + ", ".join(map(str, args)))
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "expected a mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, value, "expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "expected a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "expected a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # programming error


def read_file(path: str) -> dict:
    """Parse a YAML or JSON config file into a mapping."""
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "file not found")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError("--config", path, f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", path, "the file must hold a mapping of keys at the top level")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=VALUE`` (VALUE parsed as YAML) to ``data`` in place."""
    if "=" not in assignment:
        raise ConfigError("--set", assignment, "expected KEY=VALUE, e.g. train.lr=0.1")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", assignment, "expected KEY=VALUE with a dotted key, e.g. train.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), child, f"is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def load(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- file <- ``--set`` overrides, then :func:`validate`."""
    data = read_file(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _positive(key: str, value: float) -> None:
    _require(value > 0, key, value, "must be > 0")


def _at_least(key: str, value: float, low: float) -> None:
    _require(value >= low, key, value, f"must be >= {low}")


def _unit_interval(key: str, value: float) -> None:
    _require(0 <= value < 1, key, value, "must be in [0, 1)")


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; resolve defaults that depend on others."""
    _at_least("seed", cfg.seed, 0)
    _at_least("rounds", cfg.rounds, 1)
    _at_least("threads", cfg.threads, 1)

    c = cfg.clients
    _at_least("clients.total", c.total, 1)
    _at_least("clients.per_round", c.per_round, 1)
    _require(c.per_round <= c.total, "clients.per_round", c.per_round, f"must be at most clients.total ({c.total})")

    d = cfg.data
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
    if d.normalize is None:
        d.normalize = "none" if d.name == "synthetic" else "standard"
    if d.name == "synthetic":
        _require(d.normalize == "none", "data.normalize", d.normalize, "synthetic data is used as generated; allowed: none")
    if d.name == "npz":
        _require(bool(d.path), "data.path", d.path, "data.name = npz needs data.path, an .npz file with x_train, y_train, x_test, y_test")
        _require(os.path.isfile(d.path), "data.path", d.path, "file not found")
    elif d.path is not None:
        raise ConfigError("data.path", d.path, f"only used with data.name = npz (data.name is {d.name})")
    if d.name in ("mnist", "fashion_mnist"):
        if d.dir is None:
            d.dir = os.path.join("data", d.name)
    elif d.dir is not None:
        raise ConfigError("data.dir", d.dir, f"only used with data.name = mnist or fashion_mnist (data.name is {d.name})")

    m = cfg.model
    if m.name == "mlp":
        for i, width in enumerate(m.hidden):
            _at_least(f"model.hidden[{i}]", width, 1)

    t = cfg.train
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 1)
    _positive("train.lr", t.lr)
    _unit_interval("train.momentum", t.momentum)
    _at_least("train.weight_decay", t.weight_decay, 0)

    sv = cfg.server
    if sv.lr is None:
        sv.lr = SERVER_LR_DEFAULTS[sv.optimizer]
    _positive("server.lr", sv.lr)
    _unit_interval("server.momentum", sv.momentum)
    _unit_interval("server.beta1", sv.beta1)
    _unit_interval("server.beta2", sv.beta2)
    _positive("server.tau", sv.tau)

    _validate_attack(cfg)
    _validate_aggregator(cfg)
    _validate_privacy(cfg)
    if cfg.memory_limit_gb is not None:
        _positive("memory_limit_gb", cfg.memory_limit_gb)
    if cfg.transport == "reduce":
        reasons = []
        if cfg.aggregator.name != "fedavg" or cfg.aggregator.pre:
            reasons.append(f"aggregator.name = {cfg.aggregator.name} needs every row")
        if cfg.attack.name in ("alie", "ipm"):
            reasons.append(f"attack.name = {cfg.attack.name} is computed on rank 0 from the rows")
        if cfg.privacy.mode == "client_central":
            reasons.append("privacy.mode = client_central clips every row on rank 0")
        _require(not reasons, "transport", "reduce", "workers pre-sum FedAvg updates, but " + "; ".join(reasons)
                 + " (use transport: gather)")

    _at_least("eval.every", cfg.eval.every, 1)
    _at_least("eval.batch_size", cfg.eval.batch_size, 1)

    o = cfg.output
    _at_least("output.snapshot_every", o.snapshot_every, 0)
    _at_least("output.checkpoint_every", o.checkpoint_every, 0)
    if o.path is not None:
        _require(o.path.strip() != "", "output.path", o.path, "must not be empty")


def _validate_attack(cfg: Config) -> None:
    from .attacks import PARAMS

    a, total = cfg.attack, cfg.clients.total
    if a.name == "none":
        for key in ("fraction", "clients"):
            if getattr(a, key) is not None:
                raise ConfigError(f"attack.{key}", getattr(a, key), "needs an attack: set attack.name")
        if a.params:
            raise ConfigError("attack.params", a.params, "needs an attack: set attack.name")
        return
    if (a.fraction is None) == (a.clients is None):
        raise ConfigError("attack.name", a.name, "needs exactly one of attack.fraction or attack.clients")
    if a.fraction is not None:
        _require(0 < a.fraction < 1, "attack.fraction", a.fraction, "must be in (0, 1)")
        _require(round(a.fraction * total) >= 1, "attack.fraction", a.fraction,
                 f"makes round({a.fraction} x clients.total {total}) = 0 Byzantine clients")
    else:
        _require(len(a.clients) > 0, "attack.clients", a.clients, "must list at least one client id")
        for i, cid in enumerate(a.clients):
            _require(0 <= cid < total, f"attack.clients[{i}]", cid, f"must be a client id in 0..{total - 1}")
        _require(len(set(a.clients)) == len(a.clients), "attack.clients", a.clients, "must not repeat ids")
        _require(len(a.clients) < total, "attack.clients", a.clients, "must leave at least one honest client")
    allowed = PARAMS[a.name]
    for key, value in a.params.items():
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            raise ConfigError(f"attack.params.{key}", value, f"unknown parameter for {a.name} (allowed: {names})")
        if key in ("lambda", "std", "eps"):
            _positive(f"attack.params.{key}", value)


def num_byzantine(cfg: Config) -> int:
    a = cfg.attack
    if a.name == "none":
        return 0
    return len(a.clients) if a.clients is not None else int(round(a.fraction * cfg.clients.total))


def _validate_aggregator(cfg: Config) -> None:
    from .aggregation import check_f

    g = cfg.aggregator
    n = cfg.clients.per_round
    if g.f is None:
        byz = num_byzantine(cfg)
        g.f = math.ceil(n * byz / cfg.clients.total) if byz else 0
    _at_least("aggregator.f", g.f, 0)
    for i, step in enumerate(g.pre):
        key = f"aggregator.pre[{i}]"
        if step.name == "clip":
            _require(step.max_norm is not None and step.max_norm > 0, f"{key}.max_norm", step.max_norm,
                     "clip needs max_norm > 0")
        elif step.name == "bucketing":
            _at_least(f"{key}.s", step.s, 1)
            n = math.ceil(n / step.s)
        else:
            _require(g.f < n, "aggregator.f", g.f, f"nnm needs f < n (rows reaching it: {n})")
    try:
        check_f(g.name, n, g.f)
    except ValueError as exc:
        raise ConfigError("aggregator.f", g.f, f"{exc} (n: rows per round reaching the aggregator)") from None
    if g.m is not None:
        _require(g.name == "multi_krum", "aggregator.m", g.m, "only used by multi_krum")
        _require(1 <= g.m <= n, "aggregator.m", g.m, f"must be in 1..{n}")
    _positive("aggregator.tau", g.tau)
    _at_least("aggregator.iterations", g.iterations, 1)
    _positive("aggregator.smoothing", g.smoothing)
    _positive("aggregator.tol", g.tol)
    _at_least("aggregator.max_iter", g.max_iter, 1)


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
