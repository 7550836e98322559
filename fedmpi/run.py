"""``[mpirun -n P] python -m fedmpi.run [--config FILE] [--set KEY=VALUE ...] [--out FILE]``

Start-up, in this order:

1. every rank parses the arguments, loads and validates the config and loads
   its data, *before* MPI is initialised (heavy yield is enabled first when
   ranks outnumber cores);
2. MPI is initialised and the ranks exchange one small status record, so a
   problem found on any rank stops all of them with one line and exit status 2,
   before any results file exists (the record also carries each rank's host
   name, kept as the ``rank_hosts`` attribute);
3. rank 0 creates the results file and runs the server loop; ranks >= 1 run
   the worker loop. With P = 1, rank 0 plays both roles.

An exception on any rank prints that rank's traceback and aborts the whole job
(``MPI_Abort``), so no rank is left waiting in a collective. SIGTERM or SIGUSR1
stops the run after the current round and a checkpoint (exit status 75);
``--resume FILE`` continues it.

Exit status: 0 done; 1 a rank failed; 2 bad input (config, data, a results file
that exists, a budget the run cannot fit), before any work; 75 checkpointed after
a signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback

from . import config as config_mod
from . import data as data_mod
from .comm import EXIT_CHECKPOINTED, connect, launcher_rank, prepare_environment
from .config import Config, ConfigError

EXIT_BAD_INPUT = 2


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
    return {k: v for k, v in config_mod.flatten(d).items()
            if not any(k == key or k.startswith(key + ".") for key in keys)}


def resolve_resume(args: argparse.Namespace) -> tuple[Config, dict]:
    """The config of the run in ``--resume FILE`` (with the allowed changes), validated.

    Only ``rounds`` may differ from the stored config (and output settings);
    ``--config`` and ``--set`` are compared against it, not applied over it."""
    import yaml

    from .results import ResultsError, open_checked

    path = args.resume
    if args.out or args.overwrite:
        raise ConfigError("--resume", path, "continues in its own file; --out and --overwrite do not apply")
    try:
        with open_checked(path) as f:
            stored_text = f.attrs["config"]
            attrs = dict(f.attrs)
            f["run/finished"].refresh()
            finished = bool(f["run/finished"][()])
    except ResultsError as exc:
        raise ConfigError("--resume", path, str(exc).split(": ", 1)[-1]) from None
    stored = yaml.safe_load(stored_text)
    calibrated = None
    if (stored.get("privacy") or {}).get("target_epsilon") is not None:
        calibrated = stored["privacy"]["noise_multiplier"]  # calibrated when the run started: keep it
        stored["privacy"]["noise_multiplier"] = None
    if args.config:
        wanted = config_mod.read_file(args.config)
        if (wanted.get("privacy") or {}).get("target_epsilon") is not None:
            wanted["privacy"]["noise_multiplier"] = None
    else:
        wanted = yaml.safe_load(yaml.safe_dump(stored))
    for assignment in args.set:
        config_mod.apply_override(wanted, assignment)
    cfg = config_mod.from_dict(wanted)
    config_mod.validate(cfg)
    reference = config_mod.from_dict(stored)
    config_mod.validate(reference)
    ours, theirs = _without(cfg.to_dict(), "rounds", "output"), _without(reference.to_dict(), "rounds", "output")
    changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if changed:
        key = changed[0]
        raise ConfigError(key, ours.get(key), f"differs from the run being resumed ({theirs.get(key)!r} in {path}); "
                          "only rounds may change on --resume")
    cfg.output = reference.output
    cfg.output.path = path
    if calibrated is not None:
        cfg.privacy.noise_multiplier = calibrated
    data_mod.check_files(cfg)
    check_device(cfg)
    return cfg, {"finished": finished, "attrs": attrs}


def resolve(args: argparse.Namespace, rank: int) -> Config:
    """Config from the arguments, fully validated (data files included)."""
    cfg = config_mod.load(args.config, args.set)
    if args.out:
        cfg.output.path = args.out
    if args.overwrite:
        cfg.output.overwrite = True
    if cfg.output.path is None:
        from .results import default_path

        cfg.output.path = default_path()
    if rank == 0 and not args.print_config:
        path = cfg.output.path
        if os.path.exists(path) and not cfg.output.overwrite:
            raise ConfigError("output.path", path, "file exists; pass --overwrite (or output.overwrite: true) "
                              "or choose another path")
        if os.path.isdir(path):
            raise ConfigError("output.path", path, "is a directory; give a file name")
    data_mod.check_files(cfg)
    check_device(cfg)
    return cfg


def check_device(cfg: Config) -> None:
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda", "no CUDA device is visible to this rank (torch.cuda.is_available() "
                              "is False); use cpu, or auto to take a GPU only where there is one")


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
    from .privacy import calibrate_for_run

    p = cfg.privacy
    sigma = calibrate_for_run(cfg, data.client_sizes())
    if not quiet:
        print(f"privacy: noise multiplier {sigma:.4f} calibrated for epsilon {p.target_epsilon:g} at delta {p.delta:g} "
              f"({p.mode}, {p.accountant.upper()} accountant)", flush=True)
    return sigma


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory() -> int:
    """MemAvailable of this node, in bytes (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def server_memory(cfg: Config, data) -> tuple[int, int, int]:
    """(bytes of update rows, other bytes rank 0 will allocate, parameters d): an estimate
    made before the first round. Rows: cohort x d x 4 (none with transport: reduce)."""
    import math as _math

    from .config import count_params

    d = count_params(cfg.model, data.input_shape, data.num_classes)
    k = cfg.clients.per_round
    if cfg.clients.sampling == "poisson":  # the cohort varies: allow for a large one
        k = min(cfg.clients.total, int(k + 6 * _math.sqrt(k) + 1))
    rows = 0 if cfg.transport == "reduce" else k * d * 4
    other = 8 * d * 8  # weights, aggregate, optimizer state, checkpoint slots, center...
    g = cfg.aggregator
    n = k
    for step in g.pre:  # each step returns a float64 copy of its rows
        n = _math.ceil(n / step.s) if step.name == "bucketing" else n
        other += n * d * 8
    if g.name == "bulyan":
        other += max(0, n - 2 * g.f) * d * 4
    if cfg.attack.name in ("alie", "ipm"):
        other += k * d * 4  # the honest rows, copied
    return rows, other, d


def check_memory(cfg: Config, data) -> None:
    """Rank 0: refuse, before any work, a run whose rows would not fit its budget."""
    import resource

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


def check_model(cfg: Config, data) -> None:
    if cfg.model.name == "cnn":
        shape = data.input_shape
        if len(shape) != 3 or shape[1] < 4 or shape[2] < 4:
            raise ConfigError("model.name", "cnn", f"needs image inputs (C, H, W) of at least 4x4; "
                              f"data.name = {cfg.data.name} gives samples of shape {shape}")


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    prepare_environment()
    rank = launcher_rank()
    cfg, data, error, calibrated, resume = None, None, None, None, None
    try:
        if args.resume:
            cfg, resume = resolve_resume(args)
        else:
            cfg = resolve(args, rank)
        if args.print_config:
            if rank == 0:
                sys.stdout.write(cfg.to_yaml())
            return 0
        data = data_mod.load(cfg, need_train=True, need_test=rank == 0)
        check_model(cfg, data)
        if rank == 0:
            check_memory(cfg, data)
        import torch  # noqa: F401 - every rank needs it; importing before MPI starts overlaps the ranks' imports
        if rank == 0 and cfg.privacy.target_epsilon is not None and resume is None:
            calibrated = calibrate(cfg, data, args.quiet)
    except ConfigError as exc:
        kind = "data error" if isinstance(exc, data_mod.DataError) else "config error"
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
    if statuses[0][1] is not None:  # rank 0 calibrated the noise for a target epsilon
        cfg.privacy.noise_multiplier = statuses[0][1]
    if resume is not None and resume["finished"] and cfg.rounds <= _stored_rounds(resume):
        if comm.rank == 0:
            print(f"fedmpi: {args.resume} has finished its {_stored_rounds(resume)} rounds; nothing to resume "
                  "(--set rounds=N extends it)", file=sys.stderr, flush=True)
        comm.close()
        return 0

    stopped = []
    try:
        stopped = _run_role(cfg, comm, data, args.quiet, args.resume, [host for _, _, host in statuses])
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        print(f"fedmpi: rank {comm.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        if comm.size > 1:
            comm.abort(1)
        return 1
    comm.close()
    return EXIT_CHECKPOINTED if stopped else 0


def _stored_rounds(resume: dict) -> int:
    import yaml

    return int(yaml.safe_load(resume["attrs"]["config"])["rounds"])


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


def _run_role(cfg: Config, comm, data, quiet: bool, resume_path: str | None = None, rank_hosts: list | None = None) -> bool:
    """This rank's part of the run. Returns True when a signal stopped it after a checkpoint."""
    import torch

    from .models import FlatModel, build_model, init_weights, layout

    torch.set_num_threads(cfg.threads)
    _single_threaded_blas()
    p = cfg.privacy
    if comm.rank == 0 and p.mode == "sample" and p.batch_sampling == "shuffle" and not quiet:
        print("fedmpi: warning: privacy.batch_sampling = shuffle uses fixed-size batches, but the privacy "
              "accounting assumes Poisson sampling; the reported epsilon is then an approximation", flush=True)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    weights = init_weights(module, cfg.seed).copy() if comm.rank == 0 else None
    model = FlatModel(module, choose_device(cfg, comm))
    if comm.rank != 0:
        from .worker import run_worker

        # rank 0 decides when to stop (after a checkpoint) and tells the workers
        _on_stop_signals(lambda name: None)
        return run_worker(cfg, comm, data, model) == EXIT_CHECKPOINTED

    from .results import ResultsWriter, read_checkpoint
    from .server import ServerLoop

    loop = ServerLoop(cfg, comm, data, model, weights, writer=None, quiet=quiet)
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
    writer = ResultsWriter(path, config_yaml=cfg.to_yaml(), world_size=comm.size, seed=cfg.seed, layout=specs,
                           overwrite=cfg.output.overwrite or bool(resume_path), snapshot_every=cfg.output.snapshot_every,
                           attrs=attrs, state_spec=loop.state_spec(), history=history)
    if resume_path:
        os.replace(path, resume_path)  # the old file stays whole until its copy is complete
        writer.path = resume_path
    loop.writer = writer
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
