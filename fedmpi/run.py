"""``[mpirun -n P] python -m fedmpi.run [--config FILE] [--set KEY=VALUE ...] [--out FILE]``

Start-up, in this order:

1. every rank parses the arguments, loads, resolves and validates the config
   and runs the preflight checks (results path, data files, device, the data
   themselves, the model against the data, rank 0's memory budget), *before*
   MPI is initialised (heavy yield is enabled first when ranks outnumber cores);
   rank 0 calibrates the noise to ``privacy.target_epsilon``;
2. MPI is initialised and the ranks exchange one small status record, so a
   problem found on any rank stops all of them with one line and exit status 2,
   before any results file exists; the calibrated noise multiplier travels with
   it and gives every rank the same run config, and each rank's host name is
   kept as the ``rank_hosts`` attribute;
3. rank 0 creates the results file and runs the server loop; ranks >= 1 serve
   rounds. With P = 1, rank 0 trains the clients itself.

Steps 1 and 2 are :func:`prepare` and :func:`exchange_status`, step 3
:func:`run_experiment`; ``fedmpi.sweep --in-job`` runs the same three on each
group of ranks, one run after another.

An exception on any rank prints that rank's traceback and aborts the whole job
(``MPI_Abort``), so no rank is left waiting in a collective. User code that
breaks its contract during the run (:class:`fedmpi.extensions.ExtensionFailed`)
stops every rank with one line instead (exit status 1). SIGTERM or SIGUSR1
stops the run after the current round and a checkpoint (exit status 75);
``--resume FILE`` continues it. A run that diverges (a non-finite global model)
stops after that round with exit status 4. The exit statuses are
:mod:`fedmpi.protocol`'s.

:func:`simulate` is the same run in the calling process, for notebooks and
scripts (``fedmpi.simulate``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import yaml

from . import config as config_mod
from . import extensions
from .comm import SingleProcess, connect, launcher_local_size, launcher_rank, launcher_size, prepare_environment
from .data import DataError
from .extensions import ExtensionFailed
from .preflight import preflight
from .privacy.hooks import NOISE_SCALE_ENV, noise_scale
from .protocol import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAILED, EXIT_OK
from .results import ResultsError, RunResults, default_path, load, run_info
from .schema import Config, ConfigError, flatten, plain, replace


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.run", description="Run one federated-learning experiment.")
    parser.add_argument("--config", help="YAML or JSON config (default: the embedded digits/MLP experiment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.1 (repeatable; VALUE is YAML)")
    parser.add_argument("--out", help="results file (overrides output.path)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results file if it exists")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--resume", metavar="FILE", help="continue the run in FILE from its last checkpoint "
                        "(--set rounds=N may extend it; nothing else may change)")
    return parser.parse_args(argv)


def _without(d: dict, *keys: str) -> dict:
    """The flattened config without ``keys`` and the keys below them."""
    return {k: v for k, v in flatten(d).items() if not any(k == key or k.startswith(key + ".") for key in keys)}


def resolve_resume(args: argparse.Namespace) -> tuple[Config, dict]:
    """The config of the run in ``--resume FILE`` (with the allowed changes), validated,
    and what the file says about the run (``run_info``).

    Only ``rounds`` may differ from the stored config (and output settings, and where
    the clients' state is kept: ``algorithm.state_store``, ``algorithm.state_dir``);
    ``--config`` and ``--set`` are compared against it, not applied over it."""
    path = args.resume
    if args.out or args.overwrite:
        raise ConfigError("--resume", path, "continues in its own file; --out and --overwrite do not apply")
    try:
        info = run_info(path)
    except ResultsError as exc:
        raise ConfigError("--resume", path, str(exc).split(": ", 1)[-1]) from None
    if info["exit_status"] == EXIT_DIVERGED:
        raise ConfigError("--resume", path, f"the run diverged and stopped (exit status {EXIT_DIVERGED}); resuming "
                          "it would diverge again")
    stored = yaml.safe_load(info["config"])
    wanted = config_mod.read_file(args.config) if args.config else yaml.safe_load(info["config"])
    for assignment in args.set:
        config_mod.apply_override(wanted, assignment)
    cfg, reference = config_mod.from_mapping(wanted), config_mod.from_mapping(stored)
    free = ("rounds", "output", "algorithm.state_store", "algorithm.state_dir")
    ours, theirs = _without(cfg.to_dict(), *free), _without(reference.to_dict(), *free)
    changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if changed:
        key = changed[0]
        raise ConfigError(key, ours.get(key), f"differs from the run being resumed ({theirs.get(key)!r} in {path}); "
                          "only rounds may change on --resume")
    canaries = reference.audit.client_canaries
    if canaries.count and canaries.repeats and cfg.rounds != reference.rounds:
        raise ConfigError("rounds", cfg.rounds, f"cannot change on --resume with audit.client_canaries.repeats = "
                          f"{canaries.repeats}: each canary's rounds are spread over the {reference.rounds} rounds "
                          f"planned in {path} (repeats = 0 samples canaries round by round and can be extended)")
    used = {r["key"]: r for r in json.loads(info["attrs"].get("extensions", "[]"))}
    for record in extensions.records(cfg):
        before = used.get(record["key"], {})
        for what in ("version", "sha256"):
            if before.get(what) != record[what]:
                raise ConfigError(record["key"], record["path"], f"the user code changed since the run started ({what} "
                                  f"{before.get(what)} in {path}, {record[what]} now); a resumed run would not continue "
                                  "the same experiment")
    return replace(cfg, "output", replace(reference.output, "path", path)), info


def resolve(args: argparse.Namespace) -> Config:
    """The config from the arguments, validated (nothing data-dependent yet)."""
    cfg = config_mod.load(args.config, args.set)
    if args.out:
        cfg = replace(cfg, "output.path", args.out)
    if args.overwrite:
        cfg = replace(cfg, "output.overwrite", True)
    if cfg.output.path is None:
        cfg = replace(cfg, "output.path", default_path())
    return cfg


def choose_device(cfg: Config, comm):
    """cpu; or the GPU local_rank % GPUs on this node (cuda, or auto with a GPU present)."""
    import torch

    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = comm.local_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def calibrate(cfg: Config, data, quiet: bool) -> float:
    """Rank 0: the noise multiplier meeting privacy.target_epsilon, printed."""
    from .privacy.accounting import calibrate_for_run

    p = cfg.privacy
    sigma = calibrate_for_run(cfg, data.client_sizes())
    if not quiet:
        print(f"privacy: noise multiplier {sigma:.4f} calibrated for epsilon {p.target_epsilon:g} at delta {p.delta:g} "
              f"({p.mode}, {p.accountant.upper()} accountant)", flush=True)
    return sigma


def prepare_data(cfg: Config, rank: int, resume: dict | None, quiet: bool, ranks: int = 1,
                 local_ranks: int = 1) -> tuple:
    """This rank's (data, calibrated noise multiplier or None, where rank 0 keeps the
    clients' state): preflight, then on rank 0 the calibration to
    ``privacy.target_epsilon`` (taken from the file on resume).
    ``ranks`` / ``local_ranks``: the run's ranks, and those on this node."""
    data, state_store = preflight(cfg, rank, new_file=resume is None, ranks=ranks, local_ranks=local_ranks)
    import torch  # noqa: F401 - every rank needs it; importing before MPI starts overlaps the ranks' imports
    calibrated = None
    if rank == 0 and cfg.privacy.target_epsilon is not None:
        calibrated = resume["attrs"]["dp_noise_multiplier"] if resume is not None else calibrate(cfg, data, quiet)
    return data, calibrated, state_store


@dataclass
class Prepared:
    """One rank's start of a run, before any MPI traffic: the config (and what the
    file of a resumed run says), this rank's data, rank 0's calibrated noise, or the
    one-line error that stops the run."""

    cfg: Config | None = None
    resume: dict | None = None
    data: object = None
    calibrated: float | None = None
    error: str | None = None
    state_store: str | None = None  # rank 0: where the clients' state lives (preflight's memory check)


def prepare(args: argparse.Namespace, rank: int, ranks: int | None = None, local_ranks: int | None = None) -> Prepared:
    """Step 1 of the start-up: config, preflight and calibration; a config or data
    problem becomes ``error``. With ``--print-config`` only the config is resolved.
    ``ranks`` / ``local_ranks``: the run's ranks, and those on this node (default:
    the launcher's)."""
    prepared = Prepared()
    try:
        if args.resume:
            prepared.cfg, prepared.resume = resolve_resume(args)
        else:
            prepared.cfg = resolve(args)
        if args.print_config:
            return prepared
        prepared.data, prepared.calibrated, prepared.state_store = prepare_data(
            prepared.cfg, rank, prepared.resume, args.quiet, ranks or launcher_size(), local_ranks or launcher_local_size())
    except ConfigError as exc:
        kind = "data error" if isinstance(exc, DataError) else "config error"
        prepared.error = f"{kind}: {exc}"
    return prepared


def exchange_status(comm, prepared: Prepared) -> tuple[str | None, Config | None, list]:
    """Step 2: every rank's error, rank 0's calibrated noise and every host name, over
    ``comm``. Returns (the first error, naming its rank unless 0, or None; the run's
    config, the same on every rank; each rank's host name)."""
    comm.barrier_idle()  # ranks done early sleep here instead of spinning while others load
    statuses = comm.allgather((prepared.error, prepared.calibrated, socket.gethostname()))
    hosts = [host for _, _, host in statuses]
    failed = [(r, e) for r, (e, _, _) in enumerate(statuses) if e]
    if failed:
        r, message = failed[0]
        return message + ("" if r == 0 else f" (on rank {r})"), None, hosts
    run_cfg = prepared.cfg
    if statuses[0][1] is not None:  # rank 0 calibrated the noise for a target epsilon: the same on every rank
        run_cfg = replace(run_cfg, "privacy.noise_multiplier", float(statuses[0][1]))
    return None, run_cfg, hosts


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    prepare_environment()
    rank = launcher_rank()
    prepared = prepare(args, rank)
    cfg, resume = prepared.cfg, prepared.resume
    if args.print_config and prepared.error is None:
        if rank == 0:
            sys.stdout.write(cfg.to_yaml())
        return EXIT_OK

    try:
        comm = connect()
    except RuntimeError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem, run_cfg, rank_hosts = exchange_status(comm, prepared)
    if problem:
        if comm.rank == 0:
            print(f"fedmpi: {problem}", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_BAD_INPUT
    if resume is not None and resume["finished"] and cfg.rounds <= _stored_rounds(resume):
        if comm.rank == 0:
            print(f"fedmpi: {args.resume} has finished its {_stored_rounds(resume)} rounds; nothing to resume "
                  "(--set rounds=N extends it)", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_OK

    try:
        status = run_experiment(run_cfg, comm, prepared.data, config_yaml=cfg.to_yaml(), quiet=args.quiet,
                                resume_path=args.resume, rank_hosts=rank_hosts, state_store=prepared.state_store)
    except ExtensionFailed as exc:  # rank 0 has told the workers to stop
        print(f"fedmpi: {exc}", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_FAILED
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        return fail_job(comm, exc, f"rank {comm.rank}")
    comm.close()
    return status


def fail_job(comm, exc: BaseException, who: str) -> int:
    """``exc`` ends the whole job: print ``who`` failed with the traceback, then
    MPI_Abort, so that no rank is left waiting in a collective (a clean SystemExit
    passes through)."""
    if isinstance(exc, SystemExit) and not exc.code:
        raise exc
    print(f"fedmpi: {who} failed:", file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()  # before MPI_Abort ends the process
    if comm.size > 1:
        comm.abort(EXIT_FAILED)
    return EXIT_FAILED


def _stored_rounds(resume: dict) -> int:
    return int(yaml.safe_load(resume["config"])["rounds"])


def _run_attrs(cfg: Config, data, rank_hosts: list) -> dict:
    from .attacks import byzantine_clients

    a = cfg.attack
    attrs = {"rank_hosts": rank_hosts, "model_input_shape": list(data.input_shape), "model_num_classes": data.num_classes,
             "byzantine_clients": byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)}
    used = extensions.records(cfg)
    if used:
        attrs["extensions"] = json.dumps(used)
    if data.norm_mean is not None:
        attrs["data_norm_mean"], attrs["data_norm_std"] = data.norm_mean, data.norm_std
    if data.client_names is not None:
        attrs["data_client_names"] = [str(name) for name in data.client_names]
    if noise_scale() != 1.0:  # a test injected a bug (fedmpi.privacy.hooks): say so in the file
        attrs["test_only_noise_scale"] = noise_scale()
    p = cfg.privacy
    attrs["dp_mode"] = p.mode
    if p.mode != "none":
        attrs["dp_accountant"] = f"{p.accountant} (final); rdp (per round)"
        if p.mode == "client_central" and cfg.clients.sampling == "fixed":
            attrs["dp_accountant"] = "rdp, sampling without replacement, replace-one neighbours"
        attrs["dp_noise_multiplier"] = p.noise_multiplier
        attrs["dp_delta"] = p.delta
        attrs["dp_clip_norm"] = p.max_grad_norm
    return attrs


def run_experiment(cfg: Config, comm, data, config_yaml: str, quiet: bool = False, resume_path: str | None = None,
                   rank_hosts: list | None = None, stop: StopSignals | None = None,
                   state_store: str | None = None) -> int:
    """This rank's part of one run of ``cfg`` (the noise multiplier already calibrated)
    over ``comm``; ``config_yaml``: the config as the user gave it, stored in the file;
    ``rank_hosts``: each rank's host name; ``stop``: the process's signal handlers when
    it runs several experiments (else this run installs its own); ``state_store``:
    where rank 0 keeps the clients' state (as :func:`fedmpi.preflight.check_memory`
    decided). Returns the exit status rank 0 decided, the same on every rank: EXIT_OK,
    EXIT_CHECKPOINTED (a signal stopped the run after a checkpoint), EXIT_DIVERGED, or
    EXIT_FAILED (rank 0 stopped the workers because user code broke its contract; rank
    0 itself then raises :class:`ExtensionFailed`)."""
    import torch

    from .algorithms import ALGORITHMS
    from .models import FlatModel, build_model, init_weights, layout
    from .protocol import RoundMessages
    from .sharded.layout import BlockLayout
    from .sharded.round import ShardContext, ShardedWorker
    from .worker import ClientHost, LocalClients, RemoteClients, ShardedClients, serve

    torch.set_num_threads(cfg.threads)
    _single_threaded_blas()
    p = cfg.privacy
    if comm.rank == 0 and p.mode != "none" and noise_scale() != 1.0:
        print(f"fedmpi: warning: {NOISE_SCALE_ENV} = {noise_scale():g} (test only): every DP noise draw is scaled by "
              "it, so the reported epsilon is wrong", file=sys.stderr, flush=True)
    if comm.rank == 0 and p.mode == "sample" and p.batch_sampling == "shuffle" and not quiet:
        print("fedmpi: warning: privacy.batch_sampling = shuffle uses fixed-size batches, but the privacy "
              "accounting assumes Poisson sampling; the reported epsilon is then an approximation", flush=True)
    module = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    if comm.rank == 0 and p.mode == "sample" and not quiet:
        from .privacy.dpsgd import describe_plan, per_example_plan

        plan = per_example_plan(module)
        if any(step.path == "vmap" for step in plan):
            print(f"fedmpi: DP-SGD per-example gradients: {describe_plan(plan)}", flush=True)
    weights = init_weights(module, cfg.seed).copy() if comm.rank == 0 else None
    model = FlatModel(module, choose_device(cfg, comm))
    reduce = cfg.transport == "reduce"
    per_slot = bool(ALGORITHMS[cfg.algorithm.name].client_state)
    blocks = BlockLayout(model.size, cfg.shard_block, comm.size) if cfg.transport == "sharded" else None
    messages = RoundMessages(comm, model.size, reduce, blocks, per_slot) if comm.size > 1 else None
    host = ClientHost(cfg, data, model) if comm.rank != 0 or comm.size == 1 else None
    host_for = None
    if cfg.audit.membership.level != "none":  # RUN orders switch between the audited run and its shadows
        from .leakage_audit import shadow_config, shadow_data

        shadow_hosts: list = []

        def host_for(run: int) -> ClientHost:
            while shadow_hosts:
                shadow_hosts.pop().close()
            if run:
                shadow_hosts.append(ClientHost(shadow_config(cfg, run), shadow_data(cfg, data, run), model))
            return shadow_hosts[-1] if run else host
    if comm.rank != 0:
        # rank 0 decides when to stop (after a checkpoint) and tells the workers
        if stop is None:
            _on_stop_signals(lambda name: None)
        sharded = ShardedWorker(cfg, model.size, messages) if blocks is not None else None
        return serve(messages, host, sharded, host_for)

    from .results import ResultsWriter, read_checkpoint
    from .server import ServerLoop

    if comm.size == 1:
        clients = LocalClients(host, model.size, reduce, host_for)
    else:
        clients = RemoteClients(messages)
    if blocks is not None:
        clients = ShardedClients(cfg, ShardContext(blocks, comm, messages), clients if comm.size == 1 else None)
    loop = ServerLoop(cfg, clients, data, model, weights, writer=None, quiet=quiet, state_store=state_store)
    audit = None
    if cfg.audit.inversion.method != "none" or cfg.audit.membership.level != "none":
        from .leakage_audit import LeakageAudit

        audit = LeakageAudit(cfg, data, lambda: build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed),
                             model.size)
    if stop is None:
        _on_stop_signals(lambda name: setattr(loop, "stop_signal", name))
    else:
        stop.loop, loop.stop_signal = loop, stop.name
    specs = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in layout(module)]
    attrs = _run_attrs(cfg, data, rank_hosts or [socket.gethostname()])
    if loop.client_state is not None:
        attrs["client_state_store"] = loop.client_state.kind
    path, history, start_round = cfg.output.path, None, 0
    if resume_path:
        info = read_checkpoint(resume_path)
        previous = info["attrs"]
        attrs["start_time"] = previous["start_time"]
        attrs["resumed_at"] = [*list(previous.get("resumed_at", [])), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
        if info["history"]["checkpoint"] is not None:
            history = info["history"]
            round_index, saved_weights, state = history["checkpoint"]
            loop.load_state(saved_weights, state)
            loop.load_client_state(resume_path, info["slot"])
            start_round = round_index + 1
        path = resume_path + ".resume-tmp"
        if not quiet:
            where = f"after round {start_round}" if start_round else "from the start (no checkpoint was written)"
            print(f"resuming {resume_path} {where}", flush=True)
    writer = ResultsWriter(path, config_yaml=config_yaml, world_size=comm.size, seed=cfg.seed, layout=specs,
                           overwrite=cfg.output.overwrite or bool(resume_path), snapshot_every=cfg.output.snapshot_every,
                           attrs=attrs, state_spec=loop.state_spec(), history=history, clients=loop.client_state,
                           extra={**loop.audit_specs(), **(audit.specs() if audit is not None else {})})
    if resume_path:
        os.replace(path, resume_path)  # the old file stays whole until its copy is complete
        writer.path = resume_path
    loop.writer = writer
    loop.write_audit_definitions()
    if audit is not None:
        audit.start(writer)
        loop.leakage = audit
    try:
        return loop.run(start_round)
    finally:
        writer.close()
        if loop.client_state is not None:
            loop.client_state.close()
        if stop is not None:
            stop.loop = None


def _single_threaded_blas() -> None:
    """One BLAS thread per rank, like one torch thread: ranks are the parallelism, and
    idle OpenBLAS threads spin after each call, taking cores from the ranks that
    train (measured: rounds 1.5x slower). The aggregation kernels that want several
    cores start their own threads (see fedmpi.aggregation)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return
    threadpool_limits(1, user_api="blas")


class StopSignals:
    """SIGTERM and SIGUSR1 for a process that runs one experiment after another
    (``fedmpi.sweep --in-job``): ``name`` holds the first signal received; the run in
    progress on this rank (``loop``, set by :func:`run_experiment` on a run's rank 0)
    checkpoints and stops after its current round."""

    def __init__(self):
        self.name: str | None = None
        self.loop = None
        _on_stop_signals(self._received)

    def _received(self, name: str) -> None:
        self.name = self.name or name
        if self.loop is not None:
            self.loop.stop_signal = name


def _on_stop_signals(callback) -> None:
    """SIGTERM and SIGUSR1 (SLURM's warning before a time limit) call ``callback(name)``
    (only the main thread may set handlers: from another thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: callback(signal.Signals(signum).name))


def simulate(config: str | os.PathLike | Mapping | Config | None = None, *, overrides: Sequence[str] = (),
             out: str | os.PathLike | None = None, overwrite: bool = False, quiet: bool = True) -> RunResults:
    """Run one experiment in this process and return its results, as
    :func:`fedmpi.results.load` reads them from the file it wrote.

    ``config``: a YAML or JSON file, a mapping (what such a file holds), a
    :class:`fedmpi.schema.Config`, or None (the embedded default experiment);
    ``overrides``: ``"KEY=VALUE"`` strings, as ``--set``; ``out``: the results file
    (default ``output.path``, else ``results/run-<UTC time>.h5``); ``overwrite``:
    replace it if it exists. The config is validated, checked (preflight) and the
    noise calibrated exactly as ``python -m fedmpi.run`` does, and the run is the
    one ``mpirun`` gives: the same ``/model/final`` bytes on any number of ranks.
    A bad config raises :class:`fedmpi.schema.ConfigError` (one line) before any
    file exists; user code that breaks its contract mid-run raises
    :class:`fedmpi.extensions.ExtensionFailed`, the rounds before it kept. torch's
    and BLAS's thread counts and the SIGTERM / SIGUSR1 handlers (a signal stops
    the run after a checkpoint) are restored when it returns.

    >>> import fedmpi
    >>> run = fedmpi.simulate({"rounds": 3}, out="digits.h5")  # doctest: +SKIP
    >>> run.rounds["test_accuracy"].iloc[-1]  # doctest: +SKIP
    """
    if isinstance(config, (str, os.PathLike)):
        data = config_mod.read_file(os.fspath(config))
    else:
        data = plain(config or {})  # a fresh copy as plain dicts and lists (overrides change it)
    for assignment in overrides:
        config_mod.apply_override(data, assignment)
    cfg = config_mod.from_mapping(data)
    if out is not None:
        cfg = replace(cfg, "output.path", os.fspath(out))
    if overwrite:
        cfg = replace(cfg, "output.overwrite", True)
    if cfg.output.path is None:
        cfg = replace(cfg, "output.path", default_path())
    data, calibrated, state_store = prepare_data(cfg, 0, None, quiet)
    run_cfg = cfg if calibrated is None else replace(cfg, "privacy.noise_multiplier", float(calibrated))
    with _process_settings_restored():
        run_experiment(run_cfg, SingleProcess(), data, config_yaml=cfg.to_yaml(), quiet=quiet, state_store=state_store)
    return load(cfg.output.path)


@contextmanager
def _process_settings_restored() -> Iterator[None]:
    """What run_experiment changes for the whole process, put back afterwards: torch's
    thread count, the BLAS thread limits and the stop-signal handlers."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with threadpool_limits(limits=None):
            yield
    finally:
        torch.set_num_threads(threads)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
