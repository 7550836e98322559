"""The experiment configuration as typed, immutable data, and how it is parsed.

A config is nested frozen dataclasses, built once from a mapping (a YAML or
JSON file plus ``--set`` overrides) by :func:`from_dict`. Lists become tuples
and mappings read-only, so a config cannot change after it was validated. The
dataclass defaults *are* the embedded default experiment (digits, MLP
64-200-200-10, 16 IID clients, 20 rounds), so ``python -m fedmpi.run`` needs
no file at all.

Names that select an entry of a registry (``data.name``, ``model.name``,
``aggregator.name``, ``attack.name``, ``server.optimizer``, ``algorithm.name``,
the pre-aggregation steps) are plain strings here; :mod:`fedmpi.config` checks
them against the registries, which are the one place that lists them, or, for
user code named by import path (``"module:attribute"``), against
:mod:`fedmpi.extensions`. The ``params`` of those sections (any YAML values)
are that user code's parameters.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``str()`` is the one-line message."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {_show(value)}: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (str, float)):
        return repr(value)
    if isinstance(value, (tuple, types.MappingProxyType)):
        value = plain(value)
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PartitionConfig:
    """How the training set is split over clients (data sets without a natural split)."""

    name: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = 0.5  # dirichlet concentration: small = strong label skew
    shards_per_client: int = 2  # shards: label-sorted shards per client (McMahan et al. 2017)
    min_samples: int = 1  # dirichlet: redraw until every client holds at least this many


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # an entry of fedmpi.data.DATASETS
    dir: str | None = None  # the data set's files (mnist, fashion_mnist, cifar10, femnist, shakespeare...); default data/<name>
    path: str | None = None  # npz file with x_train, y_train, x_test, y_test
    test_fraction: float = 0.2  # digits and synthetic: share of samples held out for test
    # standard: scale to [0, 1], then subtract the training set's mean and divide by
    # its std, per channel; unit: [0, 1] only; none: values as stored.
    # Default: the data set's own (none for synthetic, femnist and shakespeare, standard for the others).
    normalize: Literal["standard", "unit", "none"] | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # an extension data set's parameters


@dataclass(frozen=True)
class ClientsConfig:
    total: int = 16
    per_round: int = 16  # cohort size (fixed), or its expectation (poisson)
    sampling: Literal["fixed", "poisson"] = "fixed"  # fixed: per_round distinct clients; poisson: each with rate per_round/total


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # an entry of fedmpi.architectures.ARCHITECTURES
    hidden: tuple[int, ...] = (200, 200)  # mlp only
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # an extension model's parameters


@dataclass(frozen=True)
class TrainConfig:
    """Local training of each sampled client: plain SGD on its own shard."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ServerConfig:
    """How rank 0 turns the aggregated update into the next global model."""

    optimizer: str = "avg"  # an entry of fedmpi.optimizers.OPTIMIZERS
    lr: float | None = None  # default: the optimizer's own (1.0 for avg and fedavgm, 0.01 for fedadam)
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99  # fedadam
    tau: float = 1e-3  # fedadam adaptivity (Reddi et al. 2021)
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # an extension optimizer's parameters


@dataclass(frozen=True)
class PreAggregationConfig:
    """One step applied to the update rows before the aggregator (in list order)."""

    name: str = "clip"  # an entry of fedmpi.aggregation.PRE_STEPS
    bucket_size: int = 2  # bucketing: rows per bucket
    max_norm: float | None = None  # clip: required
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # an extension step's parameters


@dataclass(frozen=True)
class AggregatorConfig:
    name: str = "fedavg"  # an entry of fedmpi.aggregation.RULES
    f: int | None = None  # Byzantine rows to tolerate; default: expected Byzantine clients per cohort
    m: int | None = None  # multi_krum: rows averaged (default n - f)
    tau: float = 1.0  # centered_clipping: clipping radius
    iterations: int = 1  # centered_clipping: clipping iterations per round
    smoothing: float = 1e-6  # geometric_median: Weiszfeld smoothing nu
    tol: float = 1e-10  # geometric_median: stop when a step moves less than this (relative)
    max_iter: int = 1000  # geometric_median
    pre: tuple[PreAggregationConfig, ...] = ()
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # an extension rule's parameters


@dataclass(frozen=True)
class AttackConfig:
    name: str = "none"  # an entry of fedmpi.attacks.ATTACKS
    fraction: float | None = None  # share of clients.total that is Byzantine (seeded draw), or
    clients: tuple[int, ...] | None = None  # the Byzantine client ids
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # per attack, typed by its entry


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (docs/privacy.md)."""

    mode: Literal["none", "sample", "client_central", "client_local"] = "none"
    noise_multiplier: float | None = None  # sigma (sample) or z (client); or give target_epsilon
    max_grad_norm: float = 1.0  # C: per-example clip (sample); S: update clip (client modes)
    delta: float = 1e-5
    target_epsilon: float | None = None  # calibrate noise_multiplier to this before training
    accountant: Literal["pld", "rdp"] = "pld"  # for the reported final epsilon; per round: RDP
    batch_sampling: Literal["poisson", "shuffle"] = "poisson"  # sample mode: local batches


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate the global model every k rounds (and after the last)
    batch_size: int = 1000


@dataclass(frozen=True)
class OutputConfig:
    path: str | None = None  # default: results/run-<UTC time>.h5
    overwrite: bool = False
    snapshot_every: int = 0  # keep the global model every k rounds in /model/snapshots (0: off)
    checkpoint_every: int = 5  # checkpoint for --resume every k rounds (0: only on SIGTERM / SIGUSR1)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The federated algorithm: what local training optimises and the state clients keep
    between rounds (docs/algorithms.md)."""

    name: str = "fedavg"  # an entry of fedmpi.algorithms.ALGORITHMS
    mu: float = 0.01  # fedprox: weight of the proximal term mu/2 ||w - w_global||^2
    state_store: Literal["auto", "memory", "file"] = "auto"  # scaffold: where rank 0 keeps the control variates
    state_dir: str | None = None  # scaffold, file store: directory of the store file (default: the results file's)


@dataclass(frozen=True)
class DevicesConfig:
    """Heterogeneous devices: stragglers, dropouts and a deadline (docs/algorithms.md)."""

    stragglers: float = 0.0  # share of each cohort doing less local work (FedProx's systems heterogeneity)
    dropout: float = 0.0  # probability that a sampled client drops out of the round (sends nothing)
    speed_sigma: float = 0.0  # client speed ~ lognormal(0, sigma) steps per time unit, drawn once per client
    deadline: float | None = None  # time units; work past it is cut (partial_work: use) or the update dropped
    partial_work: Literal["use", "drop"] | None = None  # null: the algorithm's own (fedavg: drop; fedprox, scaffold: use)


@dataclass(frozen=True)
class CanaryConfig:
    """Example-level canaries: a one-run audit of DP-SGD (Steinke, Nasr & Jagielski 2023)."""

    count: int = 0  # canaries m (0: off), each included with probability 1/2; needs privacy.mode sample
    kind: Literal["dirac", "input"] = "dirac"  # dirac: gradient +C on one coordinate (white-box); input: mislabelled example
    k: int | None = None  # guesses: the k top scores "in", the k bottom "out"; default count // 10 (at least 1)
    alpha: float = 0.05  # the bound holds with probability 1 - alpha


@dataclass(frozen=True)
class ClientCanaryConfig:
    """Client-level canaries: a one-shot estimate of DP-FedAvg (Andrew et al. 2024)."""

    count: int = 0  # canary clients (0: off), each inserted with probability 1/2; needs a client-level privacy.mode
    scale: float = 2.0  # a canary's update norm in units of the clip norm S (>= 1: clipped to exactly S)
    repeats: int = 1  # rounds an inserted canary takes part in, spread over the run (0: sampled each round like a client)


@dataclass(frozen=True)
class InversionConfig:
    """Gradient inversion by an honest-but-curious server (docs/privacy.md, "What an attacker learns")."""

    # none (off) | analytic | idlg | dlg | inverting_gradients | fedavg_unrolled
    method: Literal["none", "analytic", "idlg", "dlg", "inverting_gradients", "fedavg_unrolled"] = "none"
    rounds: tuple[int, ...] = (0,)  # rounds whose updates rank 0 attacks (0-based)
    slots: int = 1  # cohort slots attacked per round: the first k of the cohort
    iterations: int | None = None  # optimiser steps; default: the paper's (DLG 300 L-BFGS steps, Inverting Gradients 4800)
    restarts: int = 1  # trials from fresh random starts; the lowest gradient distance wins
    step_size: float | None = None  # Adam step (inverting_gradients 0.1, fedavg_unrolled 1.0 by default)
    tv: float = 1e-4  # total-variation weight (inverting_gradients, fedavg_unrolled)
    labels: Literal["recovered", "known"] = "recovered"  # recovered: iDLG / optimised; known: the attacker is given them
    known_order: bool = False  # fedavg_unrolled: the server knows each client's batch order (it holds the run's seed)
    max_examples: int = 8  # the largest client shard the attack reconstructs as one batch; larger shards are refused


@dataclass(frozen=True)
class MembershipConfig:
    """Membership inference on the global model with shadow federations (docs/privacy.md)."""

    level: Literal["none", "example", "client"] = "none"  # none (off) | example: was this example trained on | client
    shadows: int = 16  # shadow federations trained after the run; every example (client) is in half of them
    every: int = 0  # also attack the global model every k rounds (0: only the final model)
    variance: Literal["global", "per_example"] = "global"  # LiRA: one pooled variance, or one per example (many shadows)


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy auditing inside the run, and what an attacker learns from the
    run and the released model (docs/privacy.md, "Auditing" and "What an attacker learns")."""

    canaries: CanaryConfig = field(default_factory=CanaryConfig)
    client_canaries: ClientCanaryConfig = field(default_factory=ClientCanaryConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    rounds: int = 20
    threads: int = 1  # torch threads per rank; ranks are the parallelism
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # cuda: GPU local_rank % GPUs per node; auto: cuda if present
    # gather: every update row reaches rank 0 (any aggregator, per-client records);
    # reduce: workers pre-sum weighted updates, one MPI Reduce (FedAvg only, O(d) memory on rank 0);
    # sharded: every rank holds column blocks of every row and aggregates them (any rule, O(K d / P) per rank)
    transport: Literal["gather", "reduce", "sharded"] = "gather"
    memory_limit_gb: float | None = None  # each rank's budget; default: the node's available memory (shared by its ranks)
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
    shard_block: int = 4096  # transport sharded: columns per block (fixed: results do not depend on the rank count)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (what YAML and JSON hold)."""
        return plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys that were renamed: (section class, old name) -> new name. The old name gets a
# one-line error naming the new one.
RENAMED = {(PreAggregationConfig, "s"): "bucket_size"}


def plain(value: Any) -> Any:
    """A config value as plain Python data: dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def replace(cfg: Any, key: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted ``key`` set to ``value`` (the config is frozen)."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace(getattr(cfg, head), rest, value)})


# --------------------------------------------------------------------------- building


def flatten(config: Mapping, prefix: str = "") -> dict:
    """Nested config mapping -> {"a.b.c": value}; lists and every ``params`` mapping stay values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "params":
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def from_dict(data: Any, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; missing keys take their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", data, "expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            if (cls, key) in RENAMED:
                raise ConfigError(f"{prefix}{key}", data[key], f"renamed: use {prefix}{RENAMED[cls, key]}")
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
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "expected a mapping")
        return types.MappingProxyType({str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()})
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "expected a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
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
    """Parse a YAML or JSON config file into a mapping; every way the file can be
    unusable (missing, a directory, unreadable, not UTF-8 text, malformed) is one
    ConfigError line."""
    kind = "JSON" if path.endswith(".json") else "YAML"
    if os.path.isdir(path):
        raise ConfigError("--config", path, "is a directory; give a YAML or JSON file")
    if not os.path.exists(path):
        raise ConfigError("--config", path, "file not found")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError("--config", path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", path, f"not a {kind} text file (not UTF-8: byte 0x{raw[exc.start]:02x} at "
                          f"offset {exc.start})") from None
    if "\x00" in text:
        raise ConfigError("--config", path, f"not a {kind} text file (holds NUL bytes)")
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError("--config", path, f"not valid {kind}: {detail}") from None
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
