"""In-job sweeps (python -m fedmpi.sweep --in-job): real mpirun jobs, files compared
byte for byte with stand-alone runs, a failing run, signals, a killed job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest
import yaml

from conftest import REPO, fedmpi_env, mpirun_path, rank_pid, run_job
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, load

INJECT = REPO / "tests" / "helpers" / "sweep_inject.py"
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}
SEEDS = [0, 1, 2]
# state a resume must carry (FedAdam's moments), a checkpoint after every round
COMMON = {"rounds": 3, "clients.total": 8, "clients.per_round": 8, "server.optimizer": "fedadam",
          "aggregator.name": "median", "output.checkpoint_every": 1}


def _grid(directory, seeds=SEEDS):
    path = directory / "grid.yaml"
    path.write_text(yaml.safe_dump({"out": str(directory / "sweep"), "seeds": seeds, "set": COMMON}, sort_keys=False))
    return path


def _in_job(ranks, per_run, grid, cwd, inject=(), timeout=300):
    return run_job(ranks, [*inject, "--", grid, "--in-job", "--ranks-per-run", per_run], cwd, script=INJECT,
                   timeout=timeout)


def _start_in_job(ranks, per_run, grid, cwd, inject=()):
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, str(INJECT), *inject, "--", str(grid), "--in-job",
           "--ranks-per-run", str(per_run)]
    return subprocess.Popen(cmd, cwd=cwd, env=fedmpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each entry run on its own: python -m fedmpi.run with 2 ranks, one mpirun per run."""
    cwd = tmp_path_factory.mktemp("standalone")
    proc = run_job(None, [_grid(cwd), "--run", "--launcher", f"{mpirun_path()} -n 2"], cwd, module="fedmpi.sweep",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [cwd / "sweep" / f"run-{i:04d}.h5" for i in range(len(SEEDS))]


def _files(cwd, count=None):
    return [cwd / "sweep" / f"run-{i:04d}.h5" for i in range(count or len(SEEDS))]


def _manifest(cwd):
    return {e["index"]: e for e in json.loads((cwd / "sweep" / "manifest.json").read_text())["entries"]}


def _assert_same_run(path, reference, ranks):
    """Bit for bit: the final model, every non-timing /rounds and /clients column, the config
    but its output path; world_size is the group's."""
    with h5py.File(path, "r", libver="latest", swmr=True) as a, h5py.File(reference, "r", libver="latest", swmr=True) as b:
        assert a["run/finished"][()] == 1 and b["run/finished"][()] == 1
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes(), f"{path}: /model/final differs"
        for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
            for name in fields:
                if name not in TIMING:
                    x, y = a[group][name][:], b[group][name][:]
                    assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"{path}: /{group}/{name} differs"
        ours, theirs = yaml.safe_load(a.attrs["config"]), yaml.safe_load(b.attrs["config"])
        assert ours.pop("output").pop("path") == str(path) and theirs.pop("output").pop("path") == str(reference)
        assert ours == theirs
        assert a.attrs["world_size"] == ranks and len(a.attrs["rank_hosts"]) == ranks


def test_in_job_runs_equal_standalone_ones_and_a_failing_run_stays_in_its_run(tmp_path, reference):
    grid = _grid(tmp_path, seeds=[*SEEDS, 3])
    files = _files(tmp_path, 4)
    files[3].mkdir(parents=True)  # the fourth run's results file cannot be used: refused before its MPI traffic
    # 2 groups of 2 ranks. The run with seed 1 fails on its worker in round 1, while its server
    # waits for the round's updates; the run with seed 0 is slowed (3 s before round 0) so that
    # the failing group is the one free to take the third run.
    job = _in_job(4, 2, grid, tmp_path, inject=["--fail", "1:1", "--slow", "0:0:3"])
    assert job.returncode == 1, job.stderr
    assert "injected failure in round 1 of the run with seed 1" in job.stderr  # the rank's traceback
    manifest = _manifest(tmp_path)
    assert [manifest[i]["state"] for i in range(4)] == ["done", "failed", "done", "failed"]
    assert manifest[1]["error"] == "RuntimeError: injected failure in round 1 of the run with seed 1 (on rank 1)"
    assert manifest[3]["error"] == f"config error: --resume = {str(files[3])!r}: is a directory"
    assert manifest[2]["group"] == manifest[1]["group"] != manifest[0]["group"]  # the failing group moved on
    for i in (0, 2):
        _assert_same_run(files[i], reference[i], ranks=2)
    failed = load(str(files[1]))
    assert not failed.finished and failed.rounds["round"].tolist() == [0]  # round 0 written, checkpointed
    listing = run_job(None, [grid], tmp_path, module="fedmpi.sweep")
    assert "   1  failed (1 rounds)" in listing.stdout and "(on rank 1)]" in listing.stdout

    # resubmitted (now 2 groups of 1 rank): failed runs are retried, finished ones left alone
    files[3].rmdir()
    stamps = {i: files[i].stat().st_mtime_ns for i in (0, 2)}
    again = _in_job(2, 1, grid, tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(line.split(": ", 1)[1] for line in _run_lines(again.stdout)) == ["done", "resumed, done"]
    assert all(files[i].stat().st_mtime_ns == stamp for i, stamp in stamps.items())
    _assert_same_run(files[1], reference[1], ranks=1)  # one rank: equal to the 2-rank run (rank-count invariance)
    assert [e["state"] for e in _manifest(tmp_path).values()] == ["done"] * 4
    assert len(load(str(files[1])).attrs["resumed_at"]) == 1


def test_bad_ranks_per_run_is_one_line_before_mpi(tmp_path):
    grid = _grid(tmp_path)
    proc = run_job(None, [grid, "--in-job", "--ranks-per-run", "2"], tmp_path, module="fedmpi.sweep")
    assert proc.returncode == 2 and proc.stderr == ("fedmpi: --ranks-per-run 2: must divide the number of ranks (1); "
                                                    "start 2 ranks, or choose another G\n")
    assert not (tmp_path / "sweep").exists()


def _run_lines(stdout):
    """The per-run lines ("[index] group g: ..."), without their timing."""
    return [line.split(" in ")[0] for line in stdout.splitlines() if line.startswith("[")]


def _wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds(path):
    try:
        return len(load(str(path)).rounds)
    except Exception:  # not created yet
        return 0


def _states(cwd):
    try:
        return [entry["state"] for entry in _manifest(cwd).values()]
    except (OSError, ValueError):  # not written yet
        return []


def test_killed_in_job_sweep_resubmitted_finishes_exact(tmp_path, reference):
    grid = _grid(tmp_path)
    files = _files(tmp_path)
    # 2 groups of 1 rank; the run with seed 1 sleeps before its round 2 (a checkpoint follows
    # every round), while the other group finishes the other two runs; then a rank is killed
    job = _start_in_job(2, 1, grid, tmp_path, inject=["--slow", "1:2:60"])
    _wait_for(lambda: _rounds(files[1]) >= 2 and _states(tmp_path) == ["done", "running", "done"],
              "two runs done and one in its third round")
    stamps = {i: files[i].stat().st_mtime_ns for i in (0, 2)}
    os.kill(rank_pid(0, str(grid)), signal.SIGKILL)
    job.communicate(timeout=60)  # the launcher ends the whole job
    assert job.returncode != 0
    killed = load(str(files[1]))
    assert not killed.finished and killed.rounds["round"].tolist() == [0, 1]

    # resubmitted with one group of 2 ranks: the killed run is resumed, finished ones are left alone
    again = _in_job(2, 2, grid, tmp_path)
    assert again.returncode == 0, again.stderr
    assert _run_lines(again.stdout) == ["[1] group 0: resumed, done"]
    assert all(files[i].stat().st_mtime_ns == stamp for i, stamp in stamps.items())
    for i, ranks in enumerate([1, 2, 1]):  # the group size that finished each run
        _assert_same_run(files[i], reference[i], ranks)
    assert len(load(str(files[1])).attrs["resumed_at"]) == 1
    assert _states(tmp_path) == ["done"] * 3
