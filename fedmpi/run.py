"""``[mpirun -n P] python -m fedmpi.run [--config FILE] [--set KEY=VALUE ...] [--out FILE]``

Start-up, in this order:

1. every rank parses the arguments, loads and validates the config and loads
   its data, *before* MPI is initialised (heavy yield is enabled first when
   ranks outnumber cores);
2. MPI is initialised and the ranks exchange one small status record, so a
   problem found on any rank stops all of them with one line and exit status 2,
   before any results file exists;
3. rank 0 creates the results file and runs the server loop; ranks >= 1 run
   the worker loop. With P = 1, rank 0 plays both roles.

An exception on any rank prints that rank's traceback and aborts the whole job
(``MPI_Abort``), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import config as config_mod
from . import data as data_mod
from .comm import connect, launcher_rank, prepare_environment
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
    return parser.parse_args(argv)


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
    return cfg


def calibrate(cfg: Config, data, quiet: bool) -> float:
    """Rank 0: the noise multiplier meeting privacy.target_epsilon, printed."""
    from .privacy import calibrate_for_run

    p = cfg.privacy
    sigma = calibrate_for_run(cfg, data.client_sizes())
    if not quiet:
        print(f"privacy: noise multiplier {sigma:.4f} calibrated for epsilon {p.target_epsilon:g} at delta {p.delta:g} "
              f"({p.mode}, {p.accountant.upper()} accountant)", flush=True)
    return sigma


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
    cfg, data, error, calibrated = None, None, None, None
    try:
        cfg = resolve(args, rank)
        if args.print_config:
            if rank == 0:
                sys.stdout.write(cfg.to_yaml())
            return 0
        data = data_mod.load(cfg, need_train=True, need_test=rank == 0)
        check_model(cfg, data)
        if rank == 0 and cfg.privacy.target_epsilon is not None:
            calibrated = calibrate(cfg, data, args.quiet)
    except ConfigError as exc:
        kind = "data error" if isinstance(exc, data_mod.DataError) else "config error"
        error = f"{kind}: {exc}"

    try:
        comm = connect()
    except RuntimeError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    statuses = comm.allgather((error, calibrated))
    failed = [(r, e) for r, (e, _) in enumerate(statuses) if e]
    if failed:
        if comm.rank == 0:
            r, message = failed[0]
            where = "" if r == 0 else f" (on rank {r})"
            print(f"fedmpi: {message}{where}", file=sys.stderr, flush=True)
        comm.close()
        return EXIT_BAD_INPUT
    if statuses[0][1] is not None:  # rank 0 calibrated the noise for a target epsilon
        cfg.privacy.noise_multiplier = statuses[0][1]

    try:
        _run_role(cfg, comm, data, args.quiet)
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        print(f"fedmpi: rank {comm.rank} failed:", file=sys.stderr)
        traceback.print_exc()
        if comm.size > 1:
            comm.abort(1)
        return 1
    comm.close()
    return 0


def _run_attrs(cfg: Config, data) -> dict:
    from .attacks import byzantine_clients

    a = cfg.attack
    attrs = {"model_input_shape": list(data.input_shape), "model_num_classes": data.num_classes,
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


def _run_role(cfg: Config, comm, data, quiet: bool) -> None:
    import torch

    from .models import FlatModel, build_model, init_weights, layout

    torch.set_num_threads(cfg.threads)
    p = cfg.privacy
    if comm.rank == 0 and p.mode == "sample" and p.batch_sampling == "shuffle" and not quiet:
        print("fedmpi: warning: privacy.batch_sampling = shuffle uses fixed-size batches, but the privacy "
              "accounting assumes Poisson sampling; the reported epsilon is then an approximation", flush=True)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    model = FlatModel(module)
    if comm.rank != 0:
        from .worker import run_worker

        run_worker(cfg, comm, data, model)
        return

    from .results import ResultsWriter
    from .server import run_server

    weights = init_weights(module, cfg.seed).copy()
    specs = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in layout(module)]
    writer = ResultsWriter(cfg.output.path, config_yaml=cfg.to_yaml(), world_size=comm.size, seed=cfg.seed,
                           layout=specs, overwrite=cfg.output.overwrite, snapshot_every=cfg.output.snapshot_every,
                           attrs=_run_attrs(cfg, data))
    try:
        run_server(cfg, comm, data, model, weights, writer, quiet)
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(main())
