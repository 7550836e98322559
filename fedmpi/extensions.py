"""User code named by import path: aggregation rules, pre-aggregation steps, attacks,
data sets, models and server optimizers (docs/extending.md is the tutorial).

A config names user code where it names a built-in entry, as ``"module.path:attribute"``::

    aggregator: {name: "fedmpi_ext.rules:dnc", params: {iterations: 3}}

Why import paths, and not a ``plugins:`` list of modules that register entries:
the name says where the code is, so a config (and every results file, which
stores it) is complete on its own; nothing has to run at import time to fill a
global table, so two packages cannot shadow each other's names and the
built-in registries stay exactly what the docs list; and an error names the
key that pulled the code in. A name without ``:`` is a built-in entry.

When the config is loaded (on every rank, before any MPI traffic) each path is
imported, its attribute looked up, its signature compared with the contract of
its kind and the section's ``params`` bound to it; preflight then builds the
model and tries the rule, steps, attack hooks and optimizer on small probe
inputs on rank 0. Every problem is one :class:`fedmpi.schema.ConfigError` line
naming the key and the path (exit status 2, no results file). During the run,
a result that breaks the contract (a non-finite aggregate, a wrong shape)
raises :class:`ExtensionFailed`: the run stops with one line naming the code
and the round; the rounds before it stay in the file.

The contracts. fedmpi passes a value when the callable has a parameter of that
name (the "passed" names below); every other keyword parameter is a user
parameter, filled from the section's ``params`` (missing required ones and
unknown keys are refused; a parameter annotated ``int``, ``float``, ``bool`` or
``str``, optionally ``| None``, is type-checked).

rule, ``aggregator.name``: ``rule(rows, *, weights, f, rng, state, **params) -> AggregationResult``
    ``rows``: (n, d) float32 updates in cohort order (float64 after a
    pre-aggregation step), read-only. ``weights``: (n,) float64 client sample
    counts. ``f``: int, ``aggregator.f``. ``rng``: ``numpy.random.Generator``
    keyed (seed, "rule", round). ``state``: see below. Returns the
    :class:`fedmpi.aggregation.AggregationResult` of the built-in rules:
    ``vector`` (d,) finite, ``selected`` (indices of the rows used) or None (all),
    ``scores`` (n,) or None.
pre-aggregation step, ``aggregator.pre[i].name``: ``step(rows, *, f, rng, **params)``
    Returns (n, d) rows (row j stands for input row j), or a
    :class:`fedmpi.aggregation.Regrouped` whose ``groups`` say which input rows
    each output row averages; a step whose output has another number of rows
    declares ``rows_after(n)``. ``rng``: keyed (seed, "bucketing", round, i).
attack, ``attack.name``: a :class:`fedmpi.attacks.Attack`, written like the built-in ones
    ``paper``, ``params`` (name -> :class:`fedmpi.attacks.Param`: type,
    default, allowed values; ``attack.params`` are converted and checked
    against them), and the hooks ``on_data(x, y, num_classes, params, rng) ->
    (x, y)`` (client, before training), ``on_update(update, params, rng) ->
    None`` (client, in place, after training), ``on_server(updates, byzantine,
    params, context) -> None`` (rank 0, in place, every row of the cohort;
    ``context``: a :class:`fedmpi.attacks.ServerContext`). ``rng``: keyed
    (seed, "attack", round, client id).
data set, ``data.name``: ``load(*, rng, num_clients, **params)``
    Returns ``(x_train, y_train, x_test, y_test)`` (then normalised by
    ``data.normalize`` and split by ``data.partition``, like ``npz``), or
    ``(clients, (x_test, y_test))`` with ``clients`` a sequence of
    ``clients.total`` pairs ``(x, y)`` (data that come split). Inputs (N, D),
    (N, H, W) or (N, C, H, W), integer labels 0..C-1. ``rng``: keyed (seed,
    "dataset"), the same on every rank, which must all load the same data.
model, ``model.name``: ``factory(*, input_shape, num_classes, **params) -> torch.nn.Module``
    float32 parameters; ``forward`` maps a (B, *input_shape) float32 batch to
    (B, num_classes) logits; no buffer may change in a training step
    (BatchNorm's running statistics would differ between ranks: use GroupNorm
    or LayerNorm). The factory runs under torch's generator keyed (seed,
    "init"), then every submodule's ``reset_parameters()`` under the same key,
    so custom initialisation belongs in ``reset_parameters``. While a client
    trains, torch's global generator (dropout) is keyed (seed, "client_torch",
    round, client id); the model is in ``train()`` mode then, ``eval()`` mode
    when rank 0 evaluates.
server optimizer, ``server.optimizer``: ``direction(update, *, state, **params) -> ndarray``
    ``update``: the (d,) float64 aggregate, read-only; returns the (d,) finite
    direction; the server steps w <- w + ``server.lr`` * direction.

What fedmpi knows beyond the signature is declared with :func:`declare`: the
paper, the rows a rule or step needs for a given f, a step's rows out, an
optimizer's default learning rate, and state.

State (rules and optimizers): ``@declare(state=init)`` with ``init(d, params) ->
dict[str, numpy.ndarray]``, called once per run with the model size d. The
callable receives the dict as ``state`` and updates the arrays in place or
replaces them with arrays of the same shape and dtype. fedmpi writes them into
every checkpoint with the global weights and restores them on ``--resume``, so a
resumed run equals an uninterrupted one bit for bit. Nothing else may persist
between rounds: a module-level variable is not checkpointed, so it would differ
between a resumed run and an uninterrupted one (and between rank layouts).

The results file records every extension a run used: root attribute
``extensions``, JSON, one ``{key, path, version, sha256}`` per extension (the
package version where one is found, the SHA-256 of the module's source file).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import seeding
from .aggregation import PRE_STEPS, RULES, AggregationResult, PreStep, Regrouped, Rule
from .architectures import ARCHITECTURES, Architecture
from .attacks import ATTACKS, Attack, Param
from .data import DATASETS, DataError, Dataset, check_arrays, from_arrays
from .optimizers import OPTIMIZERS, Optimizer
from .schema import Config, ConfigError, PartitionConfig, plain

EMPTY: Mapping = types.MappingProxyType({})
PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Contract:
    """What a kind of extension is: ``first``, the argument passed positionally (None:
    none); ``passed``, the keyword arguments fedmpi passes by name."""

    what: str
    signature: str
    first: str | None
    passed: tuple[str, ...]


CONTRACTS = {
    "rule": Contract("aggregation rule", "rule(rows, *, weights, f, rng, state, **params) -> AggregationResult",
                     "rows", ("weights", "f", "rng", "state")),
    "pre_step": Contract("pre-aggregation step", "step(rows, *, f, rng, **params) -> ndarray or Regrouped",
                         "rows", ("f", "rng")),
    "attack": Contract("attack", "a fedmpi.attacks.Attack with hooks on_data, on_update, on_server", None, ()),
    "dataset": Contract("data set", "load(*, rng, num_clients, **params) -> (x_train, y_train, x_test, y_test) "
                        "or (clients, (x_test, y_test))", None, ("rng", "num_clients")),
    "model": Contract("model", "factory(*, input_shape, num_classes, **params) -> torch.nn.Module", None,
                      ("input_shape", "num_classes")),
    "optimizer": Contract("server optimizer", "direction(update, *, state, **params) -> ndarray", "update", ("state",)),
}

# An attack's hooks are called with these arguments, in this order.
HOOKS = {"on_data": ("x", "y", "num_classes", "params", "rng"), "on_update": ("update", "params", "rng"),
         "on_server": ("updates", "byzantine", "params", "context")}


@dataclass(frozen=True)
class Options:
    """What :func:`declare` says about an extension (see there)."""

    paper: str = ""
    state: Callable[[int, dict], dict] | None = None
    min_rows: Callable[[int], int] | None = None
    requirement: str = ""
    rows_after: Callable[[int], int] | None = None
    default_lr: float = 1.0


def declare(*, paper: str = "", state: Callable[[int, dict], dict] | None = None,
            min_rows: Callable[[int], int] | None = None, requirement: str = "",
            rows_after: Callable[[int], int] | None = None, default_lr: float = 1.0) -> Callable:
    """Decorator: what fedmpi should know about a rule, step or optimizer beyond its
    signature. ``paper``: what it implements (shown in messages). ``state(d, params)``:
    the rule's or optimizer's state, a dict of numpy arrays (checkpointed).
    ``min_rows(f)`` and ``requirement`` (e.g. ``"n >= 2f + 3"``): the rows a rule or
    step needs to tolerate f, checked with the config. ``rows_after(n)``: rows a step
    hands on (default n). ``default_lr``: an optimizer's ``server.lr`` when none is
    given. The function itself is returned unchanged::

        @declare(paper="Shejwalkar and Houmansadr 2021", min_rows=lambda f: 2 * f + 1, requirement="2f < n")
        def dnc(rows, *, f, rng, iterations: int = 5): ...
    """
    options = Options(paper, state, min_rows, requirement, rows_after, default_lr)

    def mark(target):
        target.__fedmpi__ = options
        return target

    return mark


class ExtensionFailed(RuntimeError):
    """User code broke its contract during a run: ``str()`` is one line naming the key
    and the import path."""

    def __init__(self, key: str, path: str, problem: str):
        self.key, self.path, self.problem = key, path, problem
        super().__init__(f"{key} = {path!r} {problem}")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Spec:
    """An imported extension: ``obj`` (the callable or the Attack), the names fedmpi
    passes it (``takes``), its user parameters, whether it takes ``**params``, the
    resolved annotations and its :class:`Options`."""

    kind: str
    path: str
    module: str
    obj: Any
    takes: tuple[str, ...]
    params: Mapping[str, inspect.Parameter]
    any_params: bool
    hints: Mapping[str, Any]
    options: Options


class _Problem(Exception):
    """Why a path cannot be used; the caller turns it into a ConfigError with its key."""


def is_path(name: str) -> bool:
    """Whether a registry name is user code (``module:attribute``) rather than a built-in."""
    return ":" in name


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load(kind: str, path: str, key: str) -> Spec:
    """Import ``path`` as an extension of ``kind`` and check it against its contract; a
    problem is a ConfigError naming ``key`` and the path. Nothing is cached beyond
    Python's own modules: a module reloaded in a notebook (``importlib.reload``) is
    what the next run uses."""
    try:
        return _load(kind, path)
    except _Problem as problem:
        raise ConfigError(key, path, str(problem)) from None


def _load(kind: str, path: str) -> Spec:
    contract = CONTRACTS[kind]
    if not PATH.fullmatch(path):
        raise _Problem("not an import path: user code is named as 'package.module:attribute'")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _Problem(f"cannot import {module_name}: no module named {exc.name!r} (is the directory that holds it "
                           "on PYTHONPATH on every rank, or the package installed?)") from None
        raise _Problem(f"importing {module_name} failed: {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any error of the user's module is reported in one line
        raise _Problem(f"importing {module_name} failed: {one_line(exc)}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise _Problem(f"module {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    options = getattr(obj, "__fedmpi__", None) or Options()
    if kind == "attack":
        _check_attack(obj)
        return Spec(kind, path, module_name, obj, (), {}, False, {}, options)
    takes, params, any_params = _signature(contract, obj)
    if options.state is not None and "state" not in takes:
        raise _Problem(f"declares state but takes no 'state' parameter; {_a(contract.what)} is {contract.signature}")
    if "state" in takes and options.state is None:
        raise _Problem("takes 'state' but declares none: add @fedmpi.extensions.declare(state=init), "
                       "init(d, params) -> dict of arrays")
    return Spec(kind, path, module_name, obj, takes, params, any_params, _hints(obj), options)


def _a(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


def _signature(contract: Contract, obj: Any) -> tuple[tuple[str, ...], dict, bool]:
    if not callable(obj):
        raise _Problem(f"is a {type(obj).__name__}, not callable; {_a(contract.what)} is {contract.signature}")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        raise _Problem(f"its signature cannot be read; {_a(contract.what)} is {contract.signature}") from None
    shown = sig.replace(return_annotation=inspect.Signature.empty)
    wrong = _Problem(f"wrong signature {shown}; {_a(contract.what)} is {contract.signature}")
    items = list(sig.parameters.values())
    if contract.first is not None:
        if not items or items[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise wrong
        items = items[1:]
    takes, params, any_params = [], {}, False
    for p in items:
        if p.kind is p.VAR_POSITIONAL or (p.kind is p.POSITIONAL_ONLY and p.default is p.empty):
            raise wrong
        if p.kind is p.VAR_KEYWORD:
            any_params = True
        elif p.name in contract.passed:
            takes.append(p.name)
        else:
            params[p.name] = p
    return tuple(takes), params, any_params


def _hints(obj: Any) -> dict:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - annotations that do not resolve are simply not checked
        return {}


def _check_attack(obj: Any) -> None:
    if not isinstance(obj, Attack):
        raise _Problem(f"is a {type(obj).__name__}; an attack is a fedmpi.attacks.Attack(paper, params, "
                       "on_data=..., on_update=..., on_server=...)")
    if obj.on_data is None and obj.on_update is None and obj.on_server is None:
        raise _Problem("has none of the hooks on_data, on_update, on_server")
    for hook, args in HOOKS.items():
        fn = getattr(obj, hook)
        if fn is None:
            continue
        try:
            inspect.signature(fn).bind(*args)
        except TypeError:
            raise _Problem(f"wrong signature of {hook}{inspect.signature(fn)}: it is called as {hook}({', '.join(args)})") from None
        except ValueError:
            pass  # a callable whose signature cannot be read is taken as it is
    if not all(isinstance(v, Param) for v in obj.params.values()):
        raise _Problem("params must map names to fedmpi.attacks.Param(type, default, ...), which type and check "
                       "attack.params")


# --------------------------------------------------------------------------- params


_SIMPLE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_problem(value: Any, tp: Any) -> tuple[str | None, Any]:
    """(what is wrong with ``value`` for annotation ``tp``, or None; the value to pass)."""
    if tp is None:
        return None, value
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if any(o not in _SIMPLE and o is not type(None) for o in options):
        return None, value  # not a simple annotation: not checked
    if value is None:
        return (None if type(None) in options else "expected a value, not null"), value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for o in options:
        if o is bool and isinstance(value, bool) or o is str and isinstance(value, str):
            return None, value
        if o is int and number and isinstance(value, int):
            return None, value
        if o is float and number:
            return None, float(value) if int not in options else value
    return "expected " + " or ".join(_SIMPLE[o] for o in options if o in _SIMPLE), value


def bind(spec: Spec, section: str, given: Mapping) -> dict:
    """The ``params`` of ``section`` checked against the extension's parameters, as the
    keyword arguments it is called with."""
    contract = CONTRACTS[spec.kind]
    values = plain(given)
    for name, value in list(values.items()):
        key = f"{section}.params.{name}"
        if name in contract.passed or name == contract.first:
            raise ConfigError(key, value, f"{name} is passed by fedmpi to {spec.path}; it is not a parameter")
        if name not in spec.params:
            if not spec.any_params:
                names = ", ".join(spec.params) or "none"
                raise ConfigError(key, value, f"not a parameter of {spec.path} (its parameters: {names})")
            continue
        problem, values[name] = _type_problem(value, spec.hints.get(name))
        if problem:
            raise ConfigError(key, value, f"{problem} (the annotation in {spec.path})")
    missing = [name for name, p in spec.params.items() if p.default is p.empty and name not in values]
    if missing:
        raise ConfigError(f"{section}.params", values, f"{spec.path} needs {', '.join(missing)}")
    return values


def named(cfg: Config) -> list[tuple[str, str, str, Mapping | None]]:
    """(key, kind, name, params) of every registry name in ``cfg``; ``params`` is the
    section's, None for attacks (their parameters are ``attack.params``)."""
    g = cfg.aggregator
    return [("data.name", "dataset", cfg.data.name, cfg.data.params),
            ("model.name", "model", cfg.model.name, cfg.model.params),
            ("server.optimizer", "optimizer", cfg.server.optimizer, cfg.server.params),
            ("aggregator.name", "rule", g.name, g.params),
            *((f"aggregator.pre[{i}].name", "pre_step", s.name, s.params) for i, s in enumerate(g.pre)),
            ("attack.name", "attack", cfg.attack.name, None)]


def check_params(cfg: Config) -> None:
    """Every extension's ``params`` bound to its parameters; ``params`` given to a
    built-in entry are refused (they only go to user code)."""
    for key, kind, name, params in named(cfg):
        if params is None:
            continue
        section = key.rsplit(".", 1)[0]
        if is_path(name):
            bind(load(kind, name, key), section, params)
        elif params:
            raise ConfigError(f"{section}.params", plain(params), f"only used by user code named by import path "
                              f"({key} = 'package.module:attribute'); {key} is {name}")


# --------------------------------------------------------------------------- registry entries


def _call(key: str, path: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception it raises is marked with the extension
    (``fedmpi_extension``) so that a probe can name it, and propagates unchanged."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        exc.fedmpi_extension = (key, path)
        raise


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _passed(spec: Spec, available: Mapping) -> dict:
    return {name: available[name] for name in spec.takes}


def _state(key: str, spec: Spec, d: int, params: dict) -> tuple[dict, dict]:
    """The initial state of a rule or optimizer and its layout {name: (shape, dtype)}."""
    state = _call(key, spec.path, spec.options.state, d, dict(params))
    if not isinstance(state, dict) or not all(isinstance(k, str) and re.fullmatch(r"\w+", k) for k in state):
        raise ExtensionFailed(key, spec.path, f"declared state that is not a dict with word keys: {state!r:.80}")
    state = {k: np.array(v) for k, v in state.items()}
    if any(v.dtype.kind not in "biuf" for v in state.values()):
        raise ExtensionFailed(key, spec.path, "declared state that is not numeric arrays")
    return state, {k: (v.shape, v.dtype) for k, v in state.items()}


def _check_state(key: str, path: str, state: dict, layout: dict) -> None:
    now = {k: (np.shape(v), getattr(v, "dtype", None)) for k, v in state.items()}
    if now != layout:
        raise ExtensionFailed(key, path, f"changed the layout of its state: {layout} became {now} (state arrays "
                              "keep their names, shapes and dtypes: they are checkpointed)")


def _finite_vector(key: str, path: str, value: Any, d: int, what: str) -> np.ndarray:
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ExtensionFailed(key, path, f"returned {type(value).__name__} as {what}, not an array of numbers") from None
    if vector.shape != (d,):
        raise ExtensionFailed(key, path, f"returned {what} of shape {vector.shape}; expected ({d},)")
    bad = int((~np.isfinite(vector)).sum())
    if bad:
        raise ExtensionFailed(key, path, f"returned non-finite values: {bad} of {d} coordinates of {what} are NaN or inf")
    return vector


def _checked_result(key: str, path: str, result: Any, n: int, d: int) -> AggregationResult:
    if not isinstance(result, AggregationResult):
        raise ExtensionFailed(key, path, f"returned a {type(result).__name__}; a rule returns "
                              "fedmpi.aggregation.AggregationResult(vector, selected, scores)")
    vector = _finite_vector(key, path, result.vector, d, "the aggregate")
    selected = result.selected
    if selected is not None:
        selected = np.asarray(selected)
        if selected.ndim != 1 or not np.issubdtype(selected.dtype, np.integer) or (len(selected) and (
                selected.min() < 0 or selected.max() >= n)):
            raise ExtensionFailed(key, path, f"returned selected = {selected!r:.60}; expected indices of rows, in 0..{n - 1}")
    scores = result.scores
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n,):
            raise ExtensionFailed(key, path, f"returned scores of shape {scores.shape}; expected one per row ({n},)")
    return AggregationResult(vector, selected, scores, dict(result.info))


def rule(name: str, params: Mapping = EMPTY, key: str = "aggregator.name") -> Rule:
    """The registry entry of rule ``name``: built-in, or user code adapted to the
    :class:`fedmpi.aggregation.Rule` interface with its ``params`` bound in."""
    if name in RULES:
        return RULES[name]
    spec = load("rule", name, key)
    values, opts, layout = bind(spec, key.rsplit(".", 1)[0], params), spec.options, {}

    def init_state(d: int) -> dict:
        state, shapes = _state(key, spec, d, values)
        layout.update(shapes)
        return state

    def aggregate(rows: np.ndarray, **given) -> AggregationResult:
        n, d = rows.shape
        result = _call(key, name, spec.obj, _read_only(rows), **given, **values)
        if "state" in given:
            _check_state(key, name, given["state"], layout)
        return _checked_result(key, name, result, n, d)

    return Rule(aggregate, opts.paper or name, reads=spec.takes, min_rows=opts.min_rows, requirement=opts.requirement,
                init_state=init_state if opts.state else None)


def pre_step(name: str, params: Mapping = EMPTY, key: str = "aggregator.pre[0].name") -> PreStep:
    """The registry entry of pre-aggregation step ``name`` (built-in or user code)."""
    if name in PRE_STEPS:
        return PRE_STEPS[name]
    spec = load("pre_step", name, key)
    values, opts = bind(spec, key.rsplit(".", 1)[0], params), spec.options

    def step(rows: np.ndarray, **given) -> Regrouped:
        out = _call(key, name, spec.obj, _read_only(rows), **given, **values)
        return _checked_regroup(key, name, out, *rows.shape)

    return PreStep(step, opts.paper or name, reads=spec.takes,
                   rows_after=(lambda n, cfg: opts.rows_after(n)) if opts.rows_after else (lambda n, cfg: n),
                   min_rows=opts.min_rows, requirement=opts.requirement)


def _checked_regroup(key: str, path: str, out: Any, n: int, d: int) -> Regrouped:
    regrouped = out if isinstance(out, Regrouped) else Regrouped(out)
    rows = np.asarray(regrouped.rows)
    if rows.ndim != 2 or rows.shape[1] != d or not np.issubdtype(rows.dtype, np.floating):
        raise ExtensionFailed(key, path, f"returned rows of shape {rows.shape} and dtype {rows.dtype}; expected "
                              f"(rows, {d}) floats (an ndarray, or a fedmpi.aggregation.Regrouped)")
    groups = regrouped.groups
    if groups is None:
        if len(rows) != n:
            raise ExtensionFailed(key, path, f"returned {len(rows)} rows for {n} without groups; a step that changes "
                                  "the number of rows returns Regrouped(rows, groups) and declares rows_after")
    else:
        groups = [np.asarray(group, dtype=np.int64) for group in groups]
        if len(groups) != len(rows) or any(len(g) == 0 or g.min() < 0 or g.max() >= n for g in groups):
            raise ExtensionFailed(key, path, f"returned groups that do not give each of its {len(rows)} rows a non-empty "
                                  f"list of input rows in 0..{n - 1}")
    row_of = regrouped.row_of
    if row_of is not None:
        row_of = np.asarray(row_of, dtype=np.int64)
        if row_of.shape != (n,) or row_of.min() < 0 or row_of.max() >= len(rows):
            raise ExtensionFailed(key, path, f"returned row_of of shape {row_of.shape}; expected ({n},) indices of its rows")
    return Regrouped(rows, groups, row_of)


def attack(name: str, key: str = "attack.name") -> Attack:
    """The registry entry of attack ``name`` (built-in, or the user's Attack)."""
    return ATTACKS[name] if name in ATTACKS else load("attack", name, key).obj


def optimizer(name: str, params: Mapping = EMPTY, key: str = "server.optimizer") -> Optimizer:
    """The registry entry of server optimizer ``name`` (built-in or user code)."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    spec = load("optimizer", name, key)
    values, opts, layout = bind(spec, "server", params), spec.options, {}

    def init_state(size: int, cfg) -> dict:
        if opts.state is None:
            return {}
        state, shapes = _state(key, spec, size, values)
        layout.update(shapes)
        return state

    def direction(update: np.ndarray, state: dict, cfg) -> np.ndarray:
        out = _call(key, name, spec.obj, _read_only(update), **_passed(spec, {"state": state}), **values)
        if "state" in spec.takes:
            _check_state(key, name, state, layout)
        return _finite_vector(key, name, out, len(update), "the direction")

    return Optimizer(direction, opts.paper or name, opts.default_lr, init_state=init_state)


def architecture(name: str, key: str = "model.name") -> Architecture:
    """The registry entry of model ``name``: built-in layer specs, or user code that
    builds the torch module (``build``)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    spec = load("model", name, key)

    def build(cfg, input_shape: tuple, num_classes: int):
        values = bind(spec, "model", cfg.params)
        passed = _passed(spec, {"input_shape": tuple(input_shape), "num_classes": int(num_classes)})
        return _call(key, name, spec.obj, **passed, **values)

    return Architecture(None, spec.options.paper or name, build=build)


def dataset(name: str, key: str = "data.name") -> Dataset:
    """The registry entry of data set ``name`` (built-in, or user code as a loader)."""
    if name in DATASETS:
        return DATASETS[name]
    spec = load("dataset", name, key)

    def federated(cfg: Config, need_test: bool):
        values = bind(spec, "data", cfg.data.params)
        passed = _passed(spec, {"rng": seeding.rng(cfg.seed, "dataset"), "num_clients": cfg.clients.total})
        try:
            out = spec.obj(**passed, **values)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line, before any MPI traffic
            raise DataError(key, name, f"raised {one_line(exc)}") from None
        return _user_data(cfg, key, name, out, need_test)

    return Dataset(spec.options.paper or name, federated=federated, reads=("partition",))


_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _user_data(cfg: Config, key: str, name: str, out: Any, need_test: bool):
    expected = "a data set returns (x_train, y_train, x_test, y_test) or (clients, (x_test, y_test))"
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise DataError(key, name, f"returned {type(out).__name__}{f' of length {len(out)}' if hasattr(out, '__len__') else ''}; "
                        f"{expected}")
    if len(out) == 4:
        arrays = check_arrays(key, name, {k: np.asarray(v) for k, v in zip(_ARRAYS, out)})
        return from_arrays(cfg, arrays, need_test=need_test)
    clients, test = out
    total = cfg.clients.total
    if not isinstance(test, (tuple, list)) or len(test) != 2 or len(clients) != total:
        raise DataError(key, name, f"returned {len(clients)} clients and a test set of {len(test)} parts; clients.total "
                        f"is {total} and {expected}")
    if cfg.data.partition != PartitionConfig():
        raise DataError("data.partition", plain(cfg.data.partition), f"{name} returns its data split over clients; "
                        "data.partition does not apply")
    xs, ys = [], []
    for k, client in enumerate(clients):
        x, y = (np.asarray(v) for v in client)
        if len(x) != len(y):
            raise DataError(key, name, f"client {k} has {len(x)} inputs but {len(y)} labels")
        xs.append(x)
        ys.append(y)
    arrays = check_arrays(key, name, {"x_train": np.concatenate(xs), "y_train": np.concatenate(ys),
                                      "x_test": np.asarray(test[0]), "y_test": np.asarray(test[1])})
    offsets = np.cumsum([0] + [len(y) for y in ys])
    indices = [np.arange(offsets[k], offsets[k + 1]) for k in range(total)]
    return from_arrays(cfg, arrays, need_test=need_test, client_indices=indices)


# --------------------------------------------------------------------------- what a run used


def records(cfg: Config) -> list[dict]:
    """One record per extension ``cfg`` names: key, import path, package version (None
    where none is found) and the SHA-256 of the module's source file."""
    out = []
    for key, kind, name, _ in named(cfg):
        if is_path(name):
            spec = load(kind, name, key)
            out.append({"key": key, "path": name, "version": _version(spec.module), "sha256": _source_hash(spec.module)})
    return out


def _version(module_name: str) -> str | None:
    """The ``__version__`` of the module's top-level package, else the version of the
    installed distribution that provides it, else None."""
    top = module_name.split(".")[0]
    version = getattr(sys.modules.get(top), "__version__", None)
    if version is not None:
        return str(version)
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _source_hash(module_name: str) -> str | None:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None
