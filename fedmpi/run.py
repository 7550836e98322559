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

An exception on any rank prints that rank's traceback and aborts the whole job
(``MPI_Abort``), so no rank is left waiting in a collective. SIGTERM or SIGUSR1
stops the run after the current round and a checkpoint (exit status 75);
``--resume FILE`` continues it. The exit statuses are :mod:`fedmpi.protocol`'s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback

import yaml

from . import config as config_mod
from .comm import connect, launcher_rank, prepare_environment
from .data import DataError
from .preflight import preflight
from .protocol import EXIT_BAD_INPUT, EXIT_CHECKPOINTED, EXIT_FAILED, EXIT_OK
from .results import ResultsError, default_path, run_info
from .schema import Config, ConfigError, flatten, replace


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

    Only ``rounds`` may differ from the stored config (and output settings);
    ``--config`` and ``--set`` are compared against it, not applied over it."""
    path = args.resume
    if args.out or args.overwrite:
        raise ConfigError("--resume", path, "continues in its own file; --out and --overwrite do not apply")
    try:
        info = run_info(path)
    except ResultsError as exc:
        raise ConfigError("--resume", path, str(exc).split(": ", 1)[-1]) from None
    stored = yaml.safe_load(info["config"])
    wanted = config_mod.read_file(args.config) if args.config else yaml.safe_load(info["config"])
    for assignment in args.set:
        config_mod.apply_override(wanted, assignment)
    cfg, reference = config_mod.from_mapping(wanted), config_mod.from_mapping(stored)
    ours, theirs = _without(cfg.to_dict(), "rounds", "output"), _without(reference.to_dict(), "rounds", "output")
    changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if changed:
        key = changed[0]
        raise ConfigError(key, ours.get(key), f"differs from the run being resumed ({theirs.get(key)!r} in {path}); "
                          "only rounds may change on --resume")
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


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    prepare_environment()
    rank = launcher_rank()
    cfg, data, error, calibrated, resume = None, None, None, None, None
    try:
        if args.resume:
            cfg, resume = resolve_resume(args)
        else:
            cfg = resolve(args)
        if args.print_config:
            if rank == 0:
                sys.stdout.write(cfg.to_yaml())
            return EXIT_OK
        data = preflight(cfg, rank, new_file=resume is None)
        import torch  # noqa: F401 - every rank needs it; importing before MPI starts overlaps the ranks' imports
        if rank == 0 and cfg.privacy.target_epsilon is not None:
            calibrated = (resume["attrs"]["dp_noise_multiplier"] if resume is not None
                          else calibrate(cfg, data, args.quiet))
    except ConfigError as exc:
        kind = "data error" if isinstance(exc, DataError) else "config error"
        error = f"{kind}: {exc}"

    try:
        comm = connect()
    except RuntimeError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    comm.barrier_idle()  # ranks done early sleep here instead of spinning while others load
    statuses = comm.allgather((error, calibrated, socket.gethostname()))
    failed = [(r, e) for r, (e, _, _) in enumerate(statuses) if e]
    if failed:
        if comm.rank == 0:
            r, message = failed[0]
            where = "" if r == 0 else f" (on rank {r})"
            print(f"fedmpi: {message}{where}", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_BAD_INPUT
    run_cfg = cfg
    if statuses[0][1] is not None:  # rank 0 calibrated the noise for a target epsilon: the same on every rank
        run_cfg = replace(cfg, "privacy.noise_multiplier", float(statuses[0][1]))
    if resume is not None and resume["finished"] and cfg.rounds <= _stored_rounds(resume):
        if comm.rank == 0:
            print(f"fedmpi: {args.resume} has finished its {_stored_rounds(resume)} rounds; nothing to resume "
                  "(--set rounds=N extends it)", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_OK

    stopped = False
    try:
        stopped = run_experiment(run_cfg, comm, data, config_yaml=cfg.to_yaml(), quiet=args.quiet,
                                 resume_path=args.resume, rank_hosts=[host for _, _, host in statuses])
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        print(f"fedmpi: rank {comm.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        if comm.size > 1:
            comm.abort(EXIT_FAILED)
        return EXIT_FAILED
    comm.close()
    return EXIT_CHECKPOINTED if stopped else EXIT_OK


def _stored_rounds(resume: dict) -> int:
    return int(yaml.safe_load(resume["config"])["rounds"])


def _run_attrs(cfg: Config, data, rank_hosts: list) -> dict:
    from .attacks import byzantine_clients

    a = cfg.attack
    attrs = {"rank_hosts": rank_hosts, "model_input_shape": list(data.input_shape), "model_num_classes": data.num_classes,
             "byzantine_clients": byzantine_clients(cfg.seed, cfg.clients.total, a.fraction, a.clients)}
    if data.norm_mean is not None:
        attrs["data_norm_mean"], attrs["data_norm_std"] = data.norm_mean, data.norm_std
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
                   rank_hosts: list | None = None) -> bool:
    """This rank's part of one run of ``cfg`` (the noise multiplier already calibrated)
    over ``comm``; ``config_yaml``: the config as the user gave it, stored in the file;
    ``rank_hosts``: each rank's host name. Returns True when a signal stopped the run
    after a checkpoint."""
    import torch

    from .models import FlatModel, build_model, init_weights, layout
    from .protocol import RoundMessages
    from .worker import ClientHost, LocalClients, RemoteClients, serve

    torch.set_num_threads(cfg.threads)
    _single_threaded_blas()
    p = cfg.privacy
    if comm.rank == 0 and p.mode == "sample" and p.batch_sampling == "shuffle" and not quiet:
        print("fedmpi: warning: privacy.batch_sampling = shuffle uses fixed-size batches, but the privacy "
              "accounting assumes Poisson sampling; the reported epsilon is then an approximation", flush=True)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    weights = init_weights(module, cfg.seed).copy() if comm.rank == 0 else None
    model = FlatModel(module, choose_device(cfg, comm))
    reduce = cfg.transport == "reduce"
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
        _on_stop_signals(lambda name: None)
        return serve(RoundMessages(comm, model.size, reduce), host, host_for) == EXIT_CHECKPOINTED

    from .results import ResultsWriter, read_checkpoint
    from .server import ServerLoop

    if comm.size == 1:
        clients = LocalClients(host, model.size, reduce, host_for)
    else:
        clients = RemoteClients(RoundMessages(comm, model.size, reduce))
    loop = ServerLoop(cfg, clients, data, model, weights, writer=None, quiet=quiet)
    audit = None
    if cfg.audit.inversion.method != "none" or cfg.audit.membership.level != "none":
        from .leakage_audit import LeakageAudit

        audit = LeakageAudit(cfg, data, lambda: build_model(cfg.model, data.input_shape, data.num_classes), model.size)
    _on_stop_signals(lambda name: setattr(loop, "stop_signal", name))
    specs = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in layout(module)]
    attrs = _run_attrs(cfg, data, rank_hosts or [socket.gethostname()])
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
            start_round = round_index + 1
        path = resume_path + ".resume-tmp"
        if not quiet:
            where = f"after round {start_round}" if start_round else "from the start (no checkpoint was written)"
            print(f"resuming {resume_path} {where}", flush=True)
    writer = ResultsWriter(path, config_yaml=config_yaml, world_size=comm.size, seed=cfg.seed, layout=specs,
                           overwrite=cfg.output.overwrite or bool(resume_path), snapshot_every=cfg.output.snapshot_every,
                           attrs=attrs, state_spec=loop.state_spec(), history=history,
                           extra=audit.specs() if audit is not None else None)
    if resume_path:
        os.replace(path, resume_path)  # the old file stays whole until its copy is complete
        writer.path = resume_path
    loop.writer = writer
    if audit is not None:
        audit.start(writer)
        loop.leakage = audit
    try:
        return not loop.run(start_round)
    finally:
        writer.close()


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


def _on_stop_signals(callback) -> None:
    """SIGTERM and SIGUSR1 (SLURM's warning before a time limit) call ``callback(name)``."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: callback(signal.Signals(signum).name))


if __name__ == "__main__":
    sys.exit(main())
