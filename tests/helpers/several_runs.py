"""Several short runs in one MPI job: python several_runs.py RUN_ARGS [++ RUN_ARGS ...]

Each group of ``fedmpi.run`` arguments is validated, preflighted and run with
:func:`fedmpi.run.run_experiment` over the job's communicator, one after another,
so a test of many configurations pays the job's start-up once. Rank 0 prints one
line per run: ``status <index> <exit status>``. A configuration error or an
exception aborts the job, as ``python -m fedmpi.run`` would.
"""

import sys

from fedmpi import comm as comm_mod
from fedmpi import run
from fedmpi.preflight import preflight

groups, current = [], []
for arg in sys.argv[1:]:
    if arg == "++":
        groups.append(current)
        current = []
    else:
        current.append(arg)
groups.append(current)

comm_mod.prepare_environment()
comm = comm_mod.connect()
for index, argv in enumerate(groups):
    args = run.parse_args(argv)
    cfg = run.resolve(args)
    data = preflight(cfg, comm.rank)
    try:
        status = run.run_experiment(cfg, comm, data, config_yaml=cfg.to_yaml(), quiet=True)
    except BaseException:
        import traceback

        traceback.print_exc()
        comm.abort(1)
    if comm.rank == 0:
        print(f"status {index} {status}", flush=True)
comm.barrier_idle()
comm.close()
