"""``mpirun -n P python -m fedmpi.sweep GRID.yaml --in-job --ranks-per-run G``: a whole
sweep inside one allocation, with warm interpreters.

Started once (``mpirun`` or ``srun``), the world is split into P / G groups of G
consecutive ranks. Each group takes the next unfinished run from the sweep
directory (:class:`fedmpi.sweep.SweepQueue`: claim files, so no MPI traffic
between groups), runs it exactly as ``python -m fedmpi.run`` started on its own
with G ranks would (the same arguments, config checks, preflight and status
exchange, then :func:`fedmpi.run.run_experiment` with the group's rank 0 as the
server), and moves on; torch and the interpreter are loaded once per rank, not
once per run. Each run's file therefore holds the same bytes as a stand-alone
G-rank run's, apart from ``start_time`` (and ``rank_hosts`` names the group's hosts).

Failures stay inside their group:

- a config or data problem of one run (``fedmpi.run``'s one-line error) is
  recorded as that run's failure before any of its MPI traffic;
- a Python exception on any rank of a running run is caught on that rank, which
  sends its peers a failure notice; they are waiting in a collective of the run
  or reach one, see the notice there (:class:`fedmpi.comm.RunComm`) and abandon
  the run. The group then agrees (on its own communicator) on what happened, the
  group's rank 0 records the run as failed with the first rank's message, and
  the group takes the next run. Other groups never notice;
- not recoverable: a rank that dies (a signal, a segfault, the out-of-memory
  killer: the launcher then ends the whole job, as it would any MPI job) and a
  rank that never returns (a deadlock in native code: its group waits until the
  job's time limit). Resubmitting the job resumes what they interrupted.

SIGTERM or SIGUSR1 (``--signal=B:USR1@...``) reaches every rank: each group's
running run writes a checkpoint after its current round and stops, no group
takes another run, and the job exits with status 75, so the job scripts requeue
it; the resubmitted job skips finished runs and resumes partial ones. The exit
status is 0 when every run of the sweep has ended (finished, or diverged: exit
status 4 is a result), 75 after a signal, else 1 (some run failed: the manifest
holds its message; resubmitting retries it).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from .comm import PeerFailed, connect, launcher_rank, launcher_size, prepare_environment
from .protocol import EXIT_BAD_INPUT, EXIT_CHECKPOINTED, EXIT_DIVERGED, EXIT_FAILED, EXIT_OK
from .run import Prepared, StopSignals, exchange_status, fail_job, parse_args, prepare, run_experiment


@dataclass
class Outcome:
    """What became of one run, as its group agreed on it."""

    state: str  # done | partial (stopped by a signal, after a checkpoint) | diverged | failed
    error: str | None = None
    hosts: list = field(default_factory=list)


def check_ranks(ranks_per_run: int, world_size: int) -> str | None:
    """The one-line problem with G and P, or None."""
    if ranks_per_run < 1:
        return f"--ranks-per-run {ranks_per_run}: must be at least 1"
    if world_size % ranks_per_run:
        lower = world_size - world_size % ranks_per_run
        fits = f"{lower} or {lower + ranks_per_run}" if lower else f"{ranks_per_run}"
        return (f"--ranks-per-run {ranks_per_run}: must divide the number of ranks ({world_size}); "
                f"start {fits} ranks, or choose another G")
    return None


def run_in_job(queue, ranks_per_run: int) -> int:
    """This rank's part of the in-job sweep over ``queue`` (every rank holds the same,
    validated entries). Returns the job's exit status, the same on every rank."""
    problem = check_ranks(ranks_per_run, launcher_size())
    if problem:
        if launcher_rank() == 0:
            print(f"fedmpi: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stop = StopSignals()
    prepare_environment()
    import torch  # noqa: F401 - once per rank, before MPI starts (overlapping the ranks' imports)

    try:
        world = connect()
    except RuntimeError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _run_groups(queue, ranks_per_run, world, stop)
    except BaseException as exc:  # noqa: BLE001 - the sweep itself failed (not a run): take the whole job down
        return fail_job(world, exc, f"in-job sweep, rank {world.rank}")


def _run_groups(queue, ranks_per_run: int, world, stop: StopSignals) -> int:
    start = time.perf_counter()
    opened = None
    if world.rank == 0:
        try:
            opened = queue.open_session()
        except OSError as exc:
            opened = f"the sweep directory cannot be written: {exc}"
    world.barrier_idle()
    opened = world.allgather(opened)[0]
    if isinstance(opened, str):
        if world.rank == 0:
            print(f"fedmpi: {opened}", file=sys.stderr, flush=True)
        world.close()
        return EXIT_BAD_INPUT
    queue.join(*opened)
    node_rank = world.local_rank()  # over the whole job, so that groups on one node spread over its GPUs
    group_index = world.rank // ranks_per_run
    group = world.split(group_index)
    if world.rank == 0:
        runs, groups = len(queue.entries), world.size // ranks_per_run
        print(f"in-job sweep: {_count(runs, 'run')}, {_count(groups, 'group')} of {_count(ranks_per_run, 'rank')}; "
              f"{queue.session}", flush=True)
    runner = GroupRunner(queue, group, group_index, node_rank, stop)  # holds abandoned communicators to the end
    runner.run()
    world.barrier_idle()  # groups done early sleep here
    signalled = any(world.allgather(stop.name is not None))
    code = None
    if world.rank == 0:
        manifest = queue.write_manifest(final=True)
        with open(manifest, encoding="utf-8") as fh:
            states = [e.get("state") for e in json.load(fh)["entries"]]
        counts = {s: states.count(s) for s in ("done", "diverged", "partial", "failed", "pending") if states.count(s)}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        print(f"in-job sweep: {summary} after {time.perf_counter() - start:.1f} s; manifest: {manifest}", flush=True)
        ended = counts.get("done", 0) + counts.get("diverged", 0)  # a diverged run is a result, not a failure
        code = EXIT_OK if ended == len(states) else EXIT_CHECKPOINTED if signalled else EXIT_FAILED
    code = world.allgather(code)[0]
    world.close()
    return code


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


class GroupRunner:
    """One group: runs taken from the queue by the group's rank 0 and run by every rank
    of it, one after another."""

    def __init__(self, queue, group, group_index: int, node_rank: int, stop: StopSignals):
        self.queue, self.group, self.group_index, self.stop = queue, group, group_index, stop
        self.node_rank = node_rank
        self.leader = group.rank == 0
        self.abandoned: list = []  # communicators of failed runs, kept with their unfinished requests

    def run(self) -> None:
        """Until the queue is empty or a signal came."""
        while True:
            order = self._next()
            if order is None:
                return
            index, argv = order
            started = time.perf_counter()
            if self.leader:
                self._record(index, {"state": "running", "group": self.group_index})
            outcome = self._run_one(index, argv)
            if self.leader:
                wall_s = round(time.perf_counter() - started, 3)
                record = {"state": outcome.state, "group": self.group_index, "hosts": outcome.hosts, "wall_s": wall_s}
                if outcome.error:
                    record["error"] = outcome.error
                self._record(index, record)
                shown = {"done": f"done in {wall_s:.1f} s", "partial": "checkpointed after a signal",
                         "diverged": f"diverged (exit status {EXIT_DIVERGED}) in {wall_s:.1f} s",
                         "failed": f"FAILED: {outcome.error}"}[outcome.state]
                how = "resumed, " if argv[:1] == ["--resume"] else ""
                print(f"[{index}] group {self.group_index}: {how}{shown}", flush=True)

    def _record(self, index: int, record: dict) -> None:
        try:
            self.queue.record(index, record)
        except OSError as exc:  # the record and the manifest are a report: the runs' files hold the results
            print(f"fedmpi: cannot record run {index} ({record['state']}): {exc}", file=sys.stderr, flush=True)

    def _next(self) -> tuple[int, list] | None:
        """The group's rank 0 takes the next run and tells the others (who wait asleep)."""
        header = np.zeros(2, dtype=np.int64)
        payload = b""
        if self.leader:
            order = None
            if self.stop.name is None:
                try:
                    order = self.queue.take()
                except OSError as exc:  # the sweep directory cannot be written: this group stops
                    print(f"fedmpi: group {self.group_index} cannot take a run: {exc}", file=sys.stderr, flush=True)
            payload = json.dumps(order).encode()
            header[:] = (order is not None, len(payload))
        self.group.bcast_idle(header)
        if not header[0]:
            return None
        buffer = np.frombuffer(payload, dtype=np.uint8).copy() if self.leader else np.empty(header[1], dtype=np.uint8)
        self.group.bcast(buffer)
        index, argv = json.loads(buffer.tobytes())
        return index, argv

    def _run_one(self, index: int, argv: list) -> Outcome:
        """Every rank of the group: ``python -m fedmpi.run`` with ``argv``, on the group."""
        args = parse_args([*argv, "--quiet"])
        try:
            prepared = prepare(args, self.group.rank, ranks=self.group.size)
        except Exception as exc:  # noqa: BLE001 - not a config problem (those are in .error) but a bug: report it
            traceback.print_exc()
            prepared = Prepared(error=f"{type(exc).__name__}: {exc}")
        problem, run_cfg, hosts = exchange_status(self.group, prepared)
        if problem:
            return Outcome("failed", problem, hosts)
        comm = self.group.for_run(self.node_rank)
        error, aborted, status = None, False, EXIT_OK
        try:
            status = run_experiment(run_cfg, comm, prepared.data, config_yaml=prepared.cfg.to_yaml(), quiet=True,
                                    resume_path=args.resume, rank_hosts=hosts, stop=self.stop)
        except PeerFailed:
            aborted = True
        except Exception as exc:  # noqa: BLE001 - one run's failure: recorded, and the group moves on
            error = f"{type(exc).__name__}: {exc}"
            print(f"fedmpi: sweep entry {index}, rank {self.group.rank} of group {self.group_index} failed:",
                  file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            comm.notify_failure()
        self.group.barrier_idle()
        reports = self.group.allgather((error, aborted, status))
        clean = not any(e or a for e, a, _ in reports)
        if not comm.release(clean):
            self.abandoned.append(comm)
        if not clean:
            rank, message = next((r, e) for r, (e, _, _) in enumerate(reports) if e)
            return Outcome("failed", message + ("" if rank == 0 else f" (on rank {rank})"), hosts)
        ended = {EXIT_OK: "done", EXIT_CHECKPOINTED: "partial", EXIT_DIVERGED: "diverged"}
        return Outcome(ended[reports[0][2]], None, hosts)
